"""Dataset summary: the counts a user checks before training (``alseg data summary``)."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from alseg.data.imageio import image_size, read_mask
from alseg.data.sources import Dataset


def summarize(dataset: Dataset) -> dict:
    """Counts of samples, masks, non-empty masks, groups and image sizes ("WxH" -> count).

    Every mask is decoded and validated (so a bad mask is reported here, not mid-training);
    image sizes come from file headers.
    """
    def one(sample):
        positive = bool(read_mask(sample.mask).any()) if sample.mask is not None else False
        return positive, image_size(sample.image)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, dataset.samples))
    sizes = Counter(f"{w}x{h}" for _, (w, h) in results)
    return {
        "format": dataset.format,
        "samples": len(dataset.samples),
        "with_mask": sum(s.mask is not None for s in dataset.samples),
        "positive": sum(p for p, _ in results),
        "groups": len({s.group for s in dataset.samples if s.group is not None}),
        "image_sizes": dict(sorted(sizes.items())),
    }
