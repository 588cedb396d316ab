"""Dataset summary: the counts a user checks before training (``alseg data summary``), and the
image facts a preset is chosen by (:func:`image_facts`)."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from alseg.data.cache import infer_channels
from alseg.data.samples import sample_header, sample_image, sample_mask
from alseg.data.sources import Dataset
from alseg.errors import AlsegError


def summarize(dataset: Dataset) -> dict:
    """Counts of samples, masks, non-empty masks, groups and image sizes ("WxH" -> count); for
    volumes also ``volumes`` (how many) and ``channels``.

    Every image and mask is decoded and checked as training would (unreadable or truncated
    files, non-binary masks, a mask of another size than its image), so bad input is reported
    here rather than mid-training.
    """
    def one(sample):
        h, w = sample_image(sample).shape[:2]
        positive = False
        if sample.mask is not None:
            mask = sample_mask(sample)
            if mask.shape != (h, w):
                raise AlsegError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}", sample.mask)
            positive = bool(mask.any())
        return positive, (w, h)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, dataset.samples))
    sizes = Counter(f"{w}x{h}" for _, (w, h) in results)
    volumes = {"volumes": len(dataset.volumes), "channels": dataset.volumes[0].channels} if dataset.volumes else {}
    return {
        "format": dataset.format,
        "samples": len(dataset.samples),
        "with_mask": sum(s.mask is not None for s in dataset.samples),
        "positive": sum(p for p, _ in results),
        "groups": len({s.group for s in dataset.samples if s.group is not None}),
        "image_sizes": dict(sorted(sizes.items())),
        **volumes,
    }


def image_facts(dataset: Dataset, limit: int = 64) -> dict:
    """``{"channels", "short_side"}``: 1 or 3 (as the cache will decode them) and the median shorter
    side in pixels of up to ``limit`` images spread over the dataset, from their headers only."""
    samples = dataset.samples
    step = max(1, len(samples) // limit)
    sides = [min(sample_header(s)[:2]) for s in samples[::step][:limit]]
    return {"channels": infer_channels(dataset), "short_side": int(np.median(sides))}
