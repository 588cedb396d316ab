"""A generated, deterministic lesion-like dataset in the ``folder`` layout, for the demo and tests.

Each image is a skin-toned background with smooth shading and noise, one darker blob with an
irregular (Fourier-perturbed) border, and a few hair-like dark lines that are not lesion. It is
synthetic: results on it say nothing about real data.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def _one(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.array([200, 160, 140], np.float32) + rng.normal(0, 12, 3)
    shade = 1 + 0.15 * ((xx - rng.uniform()) * rng.normal() + (yy - rng.uniform()) * rng.normal())
    img = base[None, None, :] * shade[:, :, None]
    cy, cx = rng.uniform(0.3, 0.7, 2)
    r0 = rng.uniform(0.08, 0.25)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r0 * (1 + sum(rng.uniform(0, 0.12) * np.sin(k * angle + rng.uniform(0, 6.28)) for k in range(2, 6)))
    dist = np.hypot(yy - cy, xx - cx)
    mask = dist < radius
    depth = rng.uniform(0.35, 0.65)
    soft = np.clip((radius - dist) / (0.02 + 0.03 * rng.uniform()), 0, 1)
    img = img * (1 - depth * soft[:, :, None]) + depth * soft[:, :, None] * np.array([90, 60, 50], np.float32)
    for _ in range(rng.integers(0, 4)):  # hairs: dark thin lines that are not lesion
        a, b = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
        t = np.linspace(0, 1, size * 2)
        px = ((a[0] + (b[0] - a[0]) * t) * (size - 1)).astype(int)
        py = ((a[1] + (b[1] - a[1]) * t) * (size - 1)).astype(int)
        img[py, px] *= 0.45
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_synthetic(out_dir: str | Path, n: int = 160, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` image/mask pairs to ``out_dir/images`` and ``out_dir/masks`` (skipped when present)."""
    out = Path(out_dir)
    if (out / "images").is_dir() and len(list((out / "images").iterdir())) == n:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        rng = np.random.default_rng(seed)
        for i in range(n):
            img, mask = _one(rng, size)
            Image.fromarray(img).save(tmp / "images" / f"lesion_{i:04d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "masks" / f"lesion_{i:04d}.png")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
