"""Dice as pure functions over binary masks: per image, pooled, and per volume (group).

Empty-mask convention (per image and per volume): when both the prediction and the ground
truth are empty the Dice is 1.0 (nothing to find, nothing found); when exactly one is empty
it is 0.0. Pooled Dice sums intersections and sizes over all images first, so it weights
large lesions more and is defined whenever any pixel is foreground.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _flat(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1).astype(bool)


def dice_per_image(pred, truth) -> np.ndarray:
    """Dice of each image in a batch ``(N, ...)`` of binary predictions against binary truth."""
    p, t = _flat(pred), _flat(truth)
    inter = np.count_nonzero(p & t, axis=1).astype(np.float64)
    total = (np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)).astype(np.float64)
    out = np.ones(len(p))
    nz = total > 0
    out[nz] = 2.0 * inter[nz] / total[nz]
    return out


def dice_counts(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (intersection, |pred| + |truth|) pixel counts: what pooled and volume Dice add up."""
    p, t = _flat(pred), _flat(truth)
    return (np.count_nonzero(p & t, axis=1).astype(np.int64),
            (np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)).astype(np.int64))


def pooled_dice(intersections, totals) -> float:
    """Dice over all pixels of all images together (1.0 when nothing is foreground anywhere)."""
    total = float(np.sum(totals))
    return 1.0 if total == 0 else 2.0 * float(np.sum(intersections)) / total


def volume_dice(intersections, totals, groups: Sequence[str | None]) -> dict[str, float]:
    """Dice per group (a patient's slices stacked into one volume); ungrouped images are skipped."""
    inter: dict[str, int] = {}
    tot: dict[str, int] = {}
    for i, t, g in zip(intersections, totals, groups):
        if g is None:
            continue
        inter[g] = inter.get(g, 0) + int(i)
        tot[g] = tot.get(g, 0) + int(t)
    return {g: pooled_dice([inter[g]], [tot[g]]) for g in sorted(inter)}


def summarize_dice(intersections, totals, groups: Sequence[str | None] | None = None) -> dict:
    """Mean, median and pooled Dice of the images, and the mean per-volume Dice (None when ungrouped)."""
    inter = np.asarray(intersections, np.float64)
    tot = np.asarray(totals, np.float64)
    per = np.where(tot > 0, 2 * inter / np.maximum(tot, 1), 1.0)
    vols = volume_dice(intersections, totals, groups) if groups is not None else {}
    return {
        "images": int(len(per)),
        "mean_dice": float(per.mean()) if len(per) else float("nan"),
        "median_dice": float(np.median(per)) if len(per) else float("nan"),
        "pooled_dice": pooled_dice(inter, tot),
        "volume_dice_mean": float(np.mean(list(vols.values()))) if vols else None,
    }
