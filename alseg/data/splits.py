"""Seeded train/val/test and labelled/pool splits, grouped by default, and the paper's presets.

Pure functions over plain lists (ids, groups, flags): nothing here reads files.

Presets (the paper's Tables 1-2):

* ``isic``: train 1600 / val 400 / test 600, 600 of train labelled (37.5 %). When the official
  test set has masks it is the test split and the official training (+ validation) pairs give
  train/val 80/20. With only the 2000 official training pairs (our ``../shared`` copy), the test
  split is carved from them in the paper's proportions 1600:400:600 of 2600: on 2000 pairs that
  is train 1230 / val 308 / test 462, labelled 461. ``test_source="validation"`` uses the official
  validation set (when it has masks) as the test split instead.
* ``lgg``: tumour-positive slices only; 20 % test, then 20 % of the rest validation (the paper's
  878 / 220 / 275 of 1373), 37.5 % of train labelled. Split by patient unless ``split_by="sample"``
  (the paper's slice-level split).
* ``lgg-volume``: whole LGG patients, every slice with its mask, tumour-free ones included (Buda
  et al.'s setting: a lab cannot filter slices by a ground truth it does not have); the ``lgg``
  proportions (20 % test, 20 % of the rest validation), always by patient unless
  ``split_by="sample"``.
* ``default``: any dataset; samples with masks, 70 / 15 / 15, 37.5 % labelled.

Grouped splits assign whole groups greedily (shuffled by the seed) to reach each target count,
so the sizes are close to, not exactly, the proportions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from alseg.errors import AlsegError

SPLIT_PRESETS = ("isic", "lgg", "lgg-volume", "default")
LABELLED_FRACTION = 0.375  # 600 of 1600 (ISIC), 37.5 % (LGG)


@dataclass(frozen=True)
class Split:
    """Which sample ids are train / val / test, and which train ids start labelled."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    labelled: tuple[str, ...]
    pool: tuple[str, ...]
    split_by: str
    preset: str
    seed: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(**{k: tuple(v) if k in ("train", "val", "test", "labelled", "pool") else v for k, v in d.items()})

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "test", "labelled", "pool")}


def _pick(ids: list[str], groups: list[str | None], target: int, rng: np.random.Generator,
          by_group: bool) -> tuple[list[str], list[str]]:
    """Take about ``target`` ids (whole groups when ``by_group``); return (taken, rest)."""
    if not by_group:
        order = rng.permutation(len(ids))
        taken = sorted(ids[i] for i in order[:target])
        chosen = set(taken)
        return taken, [i for i in ids if i not in chosen]
    members: dict[str, list[str]] = {}
    for sid, g in zip(ids, groups):
        members.setdefault(g if g is not None else f"\0{sid}", []).append(sid)
    keys = sorted(members)
    taken_keys: list[str] = []
    count = 0
    for k in (keys[i] for i in rng.permutation(len(keys))):
        size = len(members[k])
        # add the group when it brings the count closer to the target than leaving it out
        if count < target and abs(count + size - target) <= abs(count - target):
            taken_keys.append(k)
            count += size
    taken = {sid for k in taken_keys for sid in members[k]}
    return [i for i in ids if i in taken], [i for i in ids if i not in taken]


def make_split(ids: Sequence[str], *, has_mask: Sequence[bool], positive: Sequence[bool],
               groups: Sequence[str | None] | None = None, subsets: Sequence[str | None] | None = None,
               preset: str = "default", seed: int = 0, split_by: str = "group",
               labelled_fraction: float = LABELLED_FRACTION, test_source: str = "auto",
               test_seed: int | None = None) -> Split:
    """Split ``ids`` for the ``preset``; see the module docstring for each preset's rule.

    ``test_seed`` carves the test split with its own seed, so that runs with different ``seed`` s
    share one test set and differ in validation, the labelled start and training (None: ``seed``
    draws everything, test included; ``test_seed == seed`` gives the same split as None)."""
    if preset not in SPLIT_PRESETS:
        raise AlsegError(f"unknown split preset {preset!r}; choose one of {', '.join(SPLIT_PRESETS)}")
    if split_by not in ("group", "sample"):
        raise AlsegError(f"split_by must be 'group' or 'sample', not {split_by!r}")
    if not 0 < labelled_fraction <= 1:
        raise AlsegError(f"labelled fraction must be in (0, 1], got {labelled_fraction}")
    n = len(ids)
    groups = list(groups) if groups is not None else [None] * n
    subsets = list(subsets) if subsets is not None else [None] * n
    rng = np.random.default_rng(seed if test_seed is None else test_seed)
    keep = [i for i in range(n) if has_mask[i] and (preset != "lgg" or positive[i])]
    notes: list[str] = []
    if n - len(keep):
        why = "without a mask or with an empty mask" if preset == "lgg" else "without a mask"
        notes.append(f"{n - len(keep)} samples {why} are left out of the split")
    by_group = split_by == "group" and any(groups[i] is not None for i in keep)
    if len(keep) < 3:
        raise AlsegError(f"need at least 3 samples with masks to split, found {len(keep)}")

    test: list[str]
    if preset == "isic" and test_source in ("auto", "validation"):
        wanted = "test" if test_source == "auto" else "validation"
        official = [ids[i] for i in keep if subsets[i] == wanted]
        if test_source == "validation" and not official:
            raise AlsegError("test_source='validation' but the official validation set has no masks here")
        if official:
            test = official
            rest_idx = [i for i in keep if subsets[i] != wanted]
            notes.append(f"test split = the official {wanted} set ({len(official)} images)")
        else:
            test = []
    else:
        test = []
    if not test:
        rest_idx = keep
        test_frac = {"isic": 600 / 2600, "lgg": 0.2, "lgg-volume": 0.2, "default": 0.15}[preset]
        test, _ = _pick([ids[i] for i in keep], [groups[i] for i in keep], max(1, round(test_frac * len(keep))), rng, by_group)
        if preset == "isic":
            notes.append(f"no official test masks: test carved from the {len(keep)} training pairs "
                         "in the paper's proportions 1600:400:600")
        chosen = set(test)
        rest_idx = [i for i in keep if ids[i] not in chosen]
    if test_seed is not None and test_seed != seed:  # the rest of the split is the run's own draw
        rng = np.random.default_rng(seed)
        notes.append(f"test split fixed by test seed {test_seed}; validation and labelled set drawn with seed {seed}")
    val_frac = {"isic": 0.2, "lgg": 0.2, "lgg-volume": 0.2, "default": 0.15 / 0.85}[preset]
    rest_ids = [ids[i] for i in rest_idx]
    val, train = _pick(rest_ids, [groups[i] for i in rest_idx], max(1, round(val_frac * len(rest_ids))), rng, by_group)
    if not train:
        raise AlsegError("the split leaves no training images; the dataset is too small")
    n_lab = max(1, round(labelled_fraction * len(train)))
    order = rng.permutation(len(train))
    lab_set = {train[i] for i in order[:n_lab]}
    labelled = tuple(i for i in train if i in lab_set)
    pool = tuple(i for i in train if i not in lab_set)
    return Split(tuple(train), tuple(val), tuple(test), labelled, pool,
                 "group" if by_group else "sample", preset, seed, notes)


def make_project_split(ids: Sequence[str], *, has_mask: Sequence[bool], groups: Sequence[str | None] | None = None,
                       seed: int = 0, split_by: str = "group", val_fraction: float = 0.2) -> Split:
    """A lab's project: the images with masks are the labelled set, every other image is the pool.

    ``val_fraction`` of the masked images (whole groups, at least one image when there are two or
    more) become the validation set that picks each round's best model and reports its Dice; the
    rest start labelled. There is no test split: a lab measures on validation. With fewer than two
    masks the validation set is carved later from the first ingested batch
    (:func:`carve_validation`).
    """
    if split_by not in ("group", "sample"):
        raise AlsegError(f"split_by must be 'group' or 'sample', not {split_by!r}")
    groups = list(groups) if groups is not None else [None] * len(ids)
    rng = np.random.default_rng(seed)
    masked = [i for i, m in zip(ids, has_mask) if m]
    by_group = split_by == "group" and any(groups[k] is not None for k, m in enumerate(has_mask) if m)
    val: list[str] = []
    labelled = masked
    if len(masked) >= 2:
        group_of = dict(zip(ids, groups))
        val, labelled = _pick(masked, [group_of[i] for i in masked], max(1, round(val_fraction * len(masked))),
                              rng, by_group)
        if not labelled:  # one group holds every mask: keep them for training, carve validation later
            val, labelled = [], masked
    val_set = set(val)
    train = [i for i in ids if i not in val_set]
    pool = tuple(i for i, m in zip(ids, has_mask) if not m)
    notes = [f"project: {len(labelled)} labelled, {len(val)} for validation, {len(pool)} in the pool"]
    return Split(tuple(train), tuple(val), (), tuple(labelled), pool, "group" if by_group else "sample",
                 "project", seed, notes)


def carve_validation(labelled: Sequence[str], groups: Sequence[str | None], seed: int,
                     val_fraction: float = 0.2) -> list[str]:
    """Validation ids taken from the first labelled batch of a project that started without masks."""
    if len(labelled) < 2:
        raise AlsegError("a project needs at least 2 labelled images to validate a model")
    by_group = any(g is not None for g in groups)
    val, rest = _pick(list(labelled), list(groups), max(1, round(val_fraction * len(labelled))),
                      np.random.default_rng(seed), by_group)
    if not rest or not val:
        val, rest = _pick(list(labelled), list(groups), max(1, round(val_fraction * len(labelled))),
                          np.random.default_rng(seed), False)
    return val
