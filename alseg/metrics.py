"""Dice as pure functions over binary masks: per image, pooled, and per volume (group).

Empty-mask convention (per image and per volume): when both the prediction and the ground
truth are empty the Dice is 1.0 (nothing to find, nothing found); when exactly one is empty
it is 0.0. Pooled Dice sums intersections and sizes over all images first, so it weights
large lesions more and is defined whenever any pixel is foreground.

Volumes (Buda et al. 2019, their ``inference.py``/``utils.py::dsc``): a group's slices are
stacked in slice order into one 3D mask (:func:`stack_slices`, gaps left empty) and scored
as one volume, tumour-free slices included; the mean over volumes is the paper's figure.
Their code optionally keeps only the largest 3D connected component of the prediction first
(:func:`largest_component_3d`). Two differences from their code, both reported:

* a volume with no lesion and no prediction: their formula divides 0 by 0 (NaN, which makes
  their mean NaN); here it scores 1.0 as every other empty case, and
  :func:`summarize_volumes` also gives the mean over the other volumes only
  (``volume_dice_mean_nonempty``), which is their figure wherever theirs is defined.
* connectivity: their ``medpy.filter.binary.largest_connected_component`` labels with scipy's
  default structure (faces only: 6-connectivity in 3D); the default here is 26-connectivity
  (faces, edges and corners), ``connectivity=6`` gives theirs.

Beside the volume Dice: per-slice Dice on lesion slices only (:func:`lesion_slice_dice`), and
the false-positive volume on lesion-free slices (:func:`false_positive_voxels`, in mL when the
voxel size is known). "Lesion slice" means the truth has foreground at the size scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


def _flat(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:]))).astype(bool)  # not -1: zero images is fine


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


CONNECTIVITY = {6: 1, 18: 2, 26: 3}  # neighbours in 3D -> scipy's generate_binary_structure rank


def largest_component_3d(volume, connectivity: int = 26) -> np.ndarray:
    """``volume`` (``(Z, H, W)``, binary) with only its largest connected component kept.

    ``connectivity`` is 26 (faces, edges, corners; default), 18 or 6 (faces: Buda's code). An
    empty volume comes back empty; of equally large components the first in label order stays.
    """
    from scipy import ndimage

    vol = np.asarray(volume).astype(bool)
    if vol.ndim != 3:
        raise ValueError(f"largest_component_3d needs a (Z, H, W) volume, got shape {vol.shape}")
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity must be one of {sorted(CONNECTIVITY)}, not {connectivity}")
    labels, count = ndimage.label(vol, ndimage.generate_binary_structure(3, CONNECTIVITY[connectivity]))
    if count <= 1:
        return vol
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def stack_slices(masks, slice_indices: Sequence[int]) -> np.ndarray:
    """One volume ``(Z, H, W)`` from its slices ``(N, H, W)`` in any order: slice ``k`` lands on
    plane ``k - min(slice_indices)``; planes with no slice stay empty (so a missing slice
    separates components rather than gluing its neighbours together)."""
    masks = np.asarray(masks).astype(bool)
    idx = np.asarray(slice_indices, dtype=np.int64)
    if masks.ndim != 3 or len(idx) != len(masks) or len(idx) == 0:
        raise ValueError("stack_slices needs (N, H, W) masks and N slice indices, N > 0")
    if len(np.unique(idx)) != len(idx):
        raise ValueError("stack_slices got the same slice index twice")
    out = np.zeros((int(idx.max() - idx.min()) + 1, *masks.shape[1:]), bool)
    out[idx - idx.min()] = masks
    return out


def volume_dice_3d(pred, truth, empty: float = 1.0) -> float:
    """Dice of two binary volumes taken whole; ``empty`` when both are empty (1.0 here, NaN
    reproduces Buda's 0/0)."""
    p, t = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    total = np.count_nonzero(p) + np.count_nonzero(t)
    return float(empty) if total == 0 else 2.0 * np.count_nonzero(p & t) / total


def _lesion_rows(truth) -> np.ndarray:
    return _flat(truth).any(axis=1)


def lesion_slice_dice(pred, truth) -> np.ndarray:
    """Dice of each slice ``(N, H, W)`` whose truth has foreground, in slice order (others left out)."""
    keep = _lesion_rows(truth)
    return dice_per_image(np.asarray(pred)[keep], np.asarray(truth)[keep])


def false_positive_voxels(pred, truth) -> int:
    """Predicted voxels on the slices ``(N, H, W)`` whose truth is empty (every one a false positive)."""
    free = ~_lesion_rows(truth)
    return int(np.count_nonzero(_flat(pred)[free]))


@dataclass(frozen=True)
class VolumeScore:
    """One volume's figures: its 3D Dice (empty and empty = 1.0), whether both were empty, the
    Dice of each lesion slice, the lesion-free slices and the voxels predicted on them."""

    dice: float
    empty: bool
    lesion_slice_dice: tuple[float, ...]
    lesion_free_slices: int
    false_positive_voxels: int


def score_volume(pred, truth, *, largest_component: bool = False, connectivity: int = 26) -> VolumeScore:
    """Score one stacked volume ``(Z, H, W)``; with ``largest_component`` the prediction keeps only
    its largest 3D component first (the truth is never changed)."""
    p, t = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"score_volume needs two (Z, H, W) volumes of one shape, got {p.shape} and {t.shape}")
    if largest_component:
        p = largest_component_3d(p, connectivity)
    lesion = _lesion_rows(t)
    return VolumeScore(dice=volume_dice_3d(p, t), empty=not (p.any() or t.any()),
                       lesion_slice_dice=tuple(float(d) for d in lesion_slice_dice(p, t)),
                       lesion_free_slices=int(np.count_nonzero(~lesion)),
                       false_positive_voxels=false_positive_voxels(p, t))


def per_volume_scores(pred, truth, groups: Sequence[str | None], slice_indices: Sequence[int], *,
                      largest_component: bool = False, connectivity: int = 26) -> dict[str, VolumeScore]:
    """Each group's slices ``(N, H, W)`` stacked by slice index and scored (ungrouped slices skipped)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            rows.setdefault(g, []).append(i)
    idx = np.asarray(slice_indices, dtype=np.int64)
    return {g: score_volume(stack_slices(pred[r], idx[r]), stack_slices(truth[r], idx[r]),
                            largest_component=largest_component, connectivity=connectivity)
            for g, r in sorted(rows.items())}


def summarize_volumes(scores: Mapping[str, VolumeScore], voxel_ml: Mapping[str, float] | None = None) -> dict:
    """The per-volume figures of a set of volumes.

    ``volume_dice_mean``: mean 3D Dice over volumes (empty and empty = 1.0);
    ``volume_dice_mean_nonempty``: the same over the volumes where truth or prediction has a
    voxel (Buda's mean where his is defined; None when there is none); ``empty_volumes``: how
    many were left out of it; ``lesion_slice_dice_mean`` over every lesion slice of every volume
    (None without any); ``false_positive_voxels`` on lesion-free slices, summed, and
    ``false_positive_ml`` when ``voxel_ml`` gives every volume's voxel size in mL (else None).
    """
    dice = [s.dice for s in scores.values()]
    nonempty = [s.dice for s in scores.values() if not s.empty]
    lesion = [d for s in scores.values() for d in s.lesion_slice_dice]
    known = voxel_ml is not None and all(g in voxel_ml for g in scores)
    return {
        "volumes": len(dice),
        "volume_dice_mean": float(np.mean(dice)) if dice else None,
        "volume_dice_mean_nonempty": float(np.mean(nonempty)) if nonempty else None,
        "empty_volumes": len(dice) - len(nonempty),
        "lesion_slices": len(lesion),
        "lesion_slice_dice_mean": float(np.mean(lesion)) if lesion else None,
        "lesion_free_slices": int(sum(s.lesion_free_slices for s in scores.values())),
        "false_positive_voxels": int(sum(s.false_positive_voxels for s in scores.values())),
        "false_positive_ml": (float(sum(s.false_positive_voxels * voxel_ml[g] for g, s in scores.items()))
                              if known and scores else None),
    }
