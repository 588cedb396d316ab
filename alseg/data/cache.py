"""The decoded-pixel cache: each dataset decoded once into uint8 ``.npy`` memmaps.

Owns the working-size arrays every later stage reads. Images are resized with Pillow's
antialiased bilinear filter (area-like when shrinking), masks with nearest neighbour and
then binarised. The cache folder is keyed by a fingerprint of the source files (paths,
sizes, mtimes), the working size and the channel count, so it is reused across runs and
rebuilt when any input changes. It is built in a temporary folder and renamed into place
only when every file decoded, so a failed read leaves nothing behind.

Default location: ``$ALSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/alseg``, else ``~/.cache/alseg``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from alseg.data.imageio import read_image, read_mask
from alseg.data.sources import Dataset
from alseg.errors import AlsegError

CACHE_VERSION = 2
ProgressFn = Callable[[int, int], None]


def default_cache_dir() -> Path:
    if os.environ.get("ALSEG_CACHE_DIR"):
        return Path(os.environ["ALSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alseg"


@dataclass
class CachedData:
    """Working-size pixels of a dataset plus per-sample facts, aligned by index.

    ``images`` is ``(N, S, S, C)`` uint8, ``masks`` ``(N, S, S)`` uint8 in {0, 1} (all zero
    where ``has_mask`` is False). ``positive`` says whether the mask at native size has any
    foreground (a tiny lesion can vanish at a small working size). ``orig_sizes`` holds each source image's (width, height).
    """

    ids: list[str]
    images: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    positive: np.ndarray
    groups: list[str | None]
    subsets: list[str | None]
    orig_sizes: list[tuple[int, int]]
    size: int
    channels: int
    path: Path

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        lookup = {sid: i for i, sid in enumerate(self.ids)}
        return np.array([lookup[i] for i in ids], dtype=np.int64)


def fingerprint(dataset: Dataset, size: int, channels: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, dataset.format, size, channels]).encode())
    for s in dataset.samples:
        for p in (s.image, s.mask):
            if p is None:
                h.update(b"-")
                continue
            try:
                st = p.stat()
            except OSError:
                raise AlsegError("file not found", p) from None
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(f"{s.id}|{s.group}|{s.subset}".encode())
    return h.hexdigest()


def infer_channels(dataset: Dataset) -> int:
    """3 when the first image is colour (ISIC RGB, LGG's three MRI channels), 1 for grey."""
    return read_image(dataset.samples[0].image).shape[2]


def fit_image(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """An ``(H, W, C)`` uint8 image at the working size: ``(size, size, channels)`` uint8.

    Grey becomes RGB by repeating the plane, RGB becomes grey by the rounded channel mean;
    then each plane is resized with Pillow's antialiased bilinear filter (skipped when the
    image already has the working size). Training, evaluation and prediction all see pixels
    prepared by this one function.
    """
    if img.shape[2] != channels:
        img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img.mean(axis=2, keepdims=True).round().astype(np.uint8)
    if img.shape[:2] != (size, size):
        planes = [np.asarray(Image.fromarray(img[:, :, c]).resize((size, size), Image.BILINEAR)) for c in range(channels)]
        img = np.stack(planes, axis=2)
    return img


def _decode(sample, size: int, channels: int):
    img = read_image(sample.image)
    h, w = img.shape[:2]
    mask, positive = None, False
    if sample.mask is not None:
        m = read_mask(sample.mask)
        if m.shape != (h, w):
            raise AlsegError(f"mask is {m.shape[1]}x{m.shape[0]} but its image is {w}x{h}", sample.mask)
        positive = bool(m.any())  # at native size: a tiny lesion may vanish when shrunk
        mask = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) >= 128
    return fit_image(img, size, channels), mask, positive, (w, h)


def load_cached(dataset: Dataset, size: int, channels: int | None = None, cache_dir: str | Path | None = None,
                progress: ProgressFn | None = None, workers: int = 4) -> CachedData:
    """Return the dataset's pixels at ``size`` x ``size``, decoding only when no valid cache exists."""
    if size < 8:
        raise AlsegError(f"working size must be at least 8 pixels, got {size}")
    channels = channels or infer_channels(dataset)
    fp = fingerprint(dataset, size, channels)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"{dataset.format}-{size}px-{channels}ch-{fp[:20]}"
    if not (final / "meta.json").is_file():
        _build(dataset, size, channels, final, progress, workers)
    return _open(final)


def _build(dataset: Dataset, size: int, channels: int, final: Path, progress, workers: int) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    try:
        n = len(dataset.samples)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, channels))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
        orig: list[tuple[int, int]] = [(0, 0)] * n
        positive = np.zeros(n, bool)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # Pillow and tifffile release the GIL while decoding, so threads overlap the I/O and codecs.
            for i, (img, mask, pos, wh) in enumerate(pool.map(lambda s: _decode(s, size, channels), dataset.samples)):
                images[i] = img
                positive[i] = pos
                if mask is not None:
                    masks[i] = mask
                orig[i] = wh
                if progress:
                    progress(i + 1, n)
        images.flush()
        masks.flush()
        del images, masks
        meta = {
            "version": CACHE_VERSION, "format": dataset.format, "size": size, "channels": channels,
            "ids": [s.id for s in dataset.samples],
            "has_mask": [s.mask is not None for s in dataset.samples],
            "positive": positive.tolist(),
            "groups": [s.group for s in dataset.samples],
            "subsets": [s.subset for s in dataset.samples],
            "orig_sizes": orig,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # another process did not win the race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open(folder: Path) -> CachedData:
    meta = json.loads((folder / "meta.json").read_text())
    return CachedData(
        ids=meta["ids"],
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        has_mask=np.array(meta["has_mask"], bool),
        positive=np.array(meta["positive"], bool),
        groups=meta["groups"],
        subsets=meta["subsets"],
        orig_sizes=[tuple(x) for x in meta["orig_sizes"]],
        size=meta["size"],
        channels=meta["channels"],
        path=folder,
    )
