"""Selection across volumes: a strategy's choice made to respect volumes (patients, scans).

Owns the rules ``active.volume_selection``, ``active.volume_score`` and ``active.max_per_volume``
(issue 30). Pure: pool ids, their groups (the volume of each slice), one score per slice and a
seeded generator in, expert ids out; nothing here touches a model, a file or the store. The loop
applies them to what the strategy chose (:func:`apply_volume_rules`); the strategy's pseudo-labels
are left as they are, and never become expert slices here.

* Each pool slice's score is the strategy's own scalar (``Strategy.score_name``: the MC variance
  for CEAL, ``uncertainty``, ``diverse`` and ``suggestive``; entropy or BALD for ``entropy`` and
  ``bald``); ``random`` has none. A volume's score (:func:`volume_scores`) is the ``mean`` of its
  pool slices' scores, or ``top3``: the mean of its 3 highest (all of them when it has fewer), so
  a large volume with a few hard slices is not diluted by its many easy ones.
* ``slices`` mode (the default) with a cap (``max_per_volume``): the strategy's slices beyond the
  cap in one volume are dropped (its lowest-scored ones; for ``random``, at random) and each is
  replaced by the free pool slice nearest to it in score from a volume under the cap, which for a
  top-k strategy is its next-best candidate and for CEAL keeps the region (missed, uncertain,
  low) the dropped slice came from; for ``random``, by another random slice. The replacement
  keeps the dropped slice's reason. Without a cap nothing changes.
* ``volumes`` mode: volumes are ranked by their score (``random``: in random order) and the batch
  is filled with the best-scored slices (``random``: random slices) of the top-ranked volumes,
  at most the cap from each, in rank order; the batch's slices are listed volume by volume, each
  volume's in slice order. Without ``max_per_volume`` the cap is ``ceil(batch / 3)``: a batch
  from three volumes, few enough for an expert to label volume by volume, enough to spread the
  risk of one unrepresentative volume. Reasons ``volume`` (scored) and ``random volume``.
* The batch keeps the strategy's size unless the cap leaves too few slices (a shortfall note).
* A slice with no group counts as a volume of its own; when no slice has a group (2D images)
  the strategy's choice is returned unchanged in either mode.

The loop's first batch (round 0 of a project without masks) is not subject to these rules: it is
already spread over groups one slice at a time, mostly-air slices left out
(``ActiveRun.select_initial``, :func:`alseg.active.coldstart.tissue_candidates`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from alseg.errors import AlsegError

VOLUME_MODES = ("slices", "volumes")
VOLUME_SCORES = ("mean", "top3")
TOP = 3  # slices averaged by the "top3" volume score
VOLUMES_PER_BATCH = 3  # volumes mode without a cap: a batch from (at least) this many volumes
SCORED_REASON = "volume"  # reasons recorded in volumes mode (labels: alseg.active.strategies.REASONS)
RANDOM_REASON = "random volume"


@dataclass
class VolumeChoice:
    """The expert ids after the volume rules, their reasons, and notes when the cap left too few."""

    expert_ids: list[str]
    reasons: dict[str, str]
    notes: list[str] = field(default_factory=list)


def check_volume_rules(mode: str, how: str, cap: int | None) -> None:
    """Raise :class:`AlsegError` unless ``mode``, ``how`` and ``cap`` are valid settings."""
    if mode not in VOLUME_MODES:
        raise AlsegError(f"unknown active.volume_selection {mode!r}; choose one of {', '.join(VOLUME_MODES)}")
    if how not in VOLUME_SCORES:
        raise AlsegError(f"unknown active.volume_score {how!r}; choose one of {', '.join(VOLUME_SCORES)}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise AlsegError(f"active.max_per_volume must be a whole number of at least 1 (or unset), got {cap!r}")


def volume_of(ids: Sequence[str], groups: Sequence[object | None]) -> list[object]:
    """Each slice's volume: its group, or, without one, the slice itself (a volume of one)."""
    return [("slice", i) if g is None else g for i, g in zip(ids, groups)]


def volume_scores(ids: Sequence[str], groups: Sequence[object | None], values: Sequence[float],
                  how: str = "mean") -> dict[object, float]:
    """Each volume's score from its slices' ``values``: ``mean``, or ``top3`` (the mean of its 3 highest).
    A slice without a group is a volume of its own, keyed ``("slice", id)``."""
    check_volume_rules("slices", how, None)
    return _aggregate(volume_of(ids, groups), values, how)


def _aggregate(volume: Sequence[object], values: Sequence[float], how: str) -> dict[object, float]:
    per: dict[object, list[float]] = {}
    for v, x in zip(volume, np.asarray(values, float)):
        per.setdefault(v, []).append(float(x))
    if how == "top3":
        return {v: float(np.mean(sorted(xs, reverse=True)[:TOP])) for v, xs in per.items()}
    return {v: float(np.mean(xs)) for v, xs in per.items()}


def volume_cap(mode: str, cap: int | None, batch: int) -> int | None:
    """The most slices of one volume a batch of ``batch`` may hold: ``cap``, or in volumes mode
    without one ``ceil(batch / 3)``; None: no limit."""
    if cap is not None:
        return cap
    return max(1, math.ceil(batch / VOLUMES_PER_BATCH)) if mode == "volumes" else None


def apply_volume_rules(expert_ids: Sequence[str], reasons: Mapping[str, str], pool: Sequence[str],
                       groups: Sequence[object | None], values: Sequence[float] | None, rng: np.random.Generator,
                       *, mode: str = "slices", how: str = "mean", cap: int | None = None,
                       exclude: Sequence[str] = (), positions: Mapping[str, int] | None = None) -> VolumeChoice:
    """The strategy's ``expert_ids`` (with their ``reasons``) under the volume rules (module docstring).

    ``pool`` and ``groups`` are aligned; ``values``: the strategy's score of each pool slice (None: a
    strategy without scores, whose choices are random); ``exclude``: pool ids that may not become
    expert slices (the strategy's pseudo-labels); ``positions``: each id's slice index in its volume
    (the order of a volume's slices in the batch; default: pool order).
    """
    check_volume_rules(mode, how, cap)
    unchanged = VolumeChoice(list(expert_ids), {i: reasons[i] for i in expert_ids if i in reasons})
    if all(g is None for g in groups):
        if mode == "volumes":
            unchanged.notes.append("volume selection: the images have no volumes (groups); chosen by slice")
        return unchanged
    limit = volume_cap(mode, cap, len(expert_ids))
    if limit is None or not expert_ids:
        return unchanged
    scores = None if values is None else np.asarray(values, float)
    if scores is not None and len(scores) != len(pool):
        raise ValueError(f"{len(scores)} scores for a pool of {len(pool)}")
    volume = volume_of(pool, groups)
    barred = set(exclude)
    if mode == "volumes":
        return _by_volume(len(expert_ids), pool, volume, scores, rng, how, limit, barred, positions)
    return _capped(list(expert_ids), unchanged.reasons, pool, volume, scores, rng, limit, barred)


def _capped(expert: list[str], reasons: dict[str, str], pool: Sequence[str], volume: list[object],
            scores: np.ndarray | None, rng: np.random.Generator, cap: int, barred: set[str]) -> VolumeChoice:
    """Slices mode: slices over the cap replaced, each in its place in the list (module docstring)."""
    where = {i: k for k, i in enumerate(pool)}
    chosen = [where[i] for i in expert]
    if scores is None:  # random: which of a volume's slices stay is random too
        keep_order = [chosen[k] for k in rng.permutation(len(chosen))]
    else:  # highest score first; ties: the strategy's order
        keep_order = sorted(chosen, key=lambda k: -scores[k])
    count: dict[object, int] = {}
    dropped: list[int] = []
    for k in keep_order:
        if count.get(volume[k], 0) >= cap:
            dropped.append(k)
        else:
            count[volume[k]] = count.get(volume[k], 0) + 1
    if not dropped:
        return VolumeChoice(expert, reasons)
    taken = set(chosen)
    free = np.array([k not in taken and pool[k] not in barred for k in range(len(pool))])
    replacement: dict[int, int | None] = {}
    for k in dropped:  # in keep order: the best-scored dropped slice picks its stand-in first
        open_ = free & np.array([count.get(v, 0) < cap for v in volume])
        candidates = np.flatnonzero(open_)
        if not len(candidates):
            replacement[k] = None
            continue
        if scores is None:
            r = int(rng.choice(candidates))
        else:  # nearest in score; ties: the higher score, then pool order
            gap = np.abs(scores[candidates] - scores[k])
            r = int(candidates[np.lexsort((candidates, -scores[candidates], gap))[0]])
        replacement[k] = r
        free[r] = False
        count[volume[r]] = count.get(volume[r], 0) + 1
    out: list[str] = []
    out_reasons: dict[str, str] = {}
    for k in chosen:
        r = replacement.get(k, k)
        if r is None:
            continue
        out.append(pool[r])
        if pool[k] in reasons:
            out_reasons[pool[r]] = reasons[pool[k]]
    notes = []
    missing = sum(r is None for r in replacement.values())
    if missing:
        notes.append(f"volumes: at most {cap} slices a volume leaves {len(out)} of {len(expert)} slices")
    return VolumeChoice(out, out_reasons, notes)


def _by_volume(k: int, pool: Sequence[str], volume: list[object], scores: np.ndarray | None,
               rng: np.random.Generator, how: str, cap: int, barred: set[str],
               positions: Mapping[str, int] | None) -> VolumeChoice:
    """Volumes mode: the best (or random) slices of the top-ranked (or random) volumes."""
    members: dict[object, list[int]] = {}
    for j, v in enumerate(volume):
        members.setdefault(v, []).append(j)
    names = list(members)  # in pool order
    if scores is None:
        ranked = [names[j] for j in rng.permutation(len(names))]
    else:
        per = _aggregate(volume, scores, how)
        ranked = sorted(names, key=lambda v: -per[v])  # stable: ties in pool order
    picked: list[list[int]] = []
    total = 0
    for v in ranked:
        if total >= k:
            break
        free = [j for j in members[v] if pool[j] not in barred]
        if scores is None:
            order = [free[j] for j in rng.permutation(len(free))]
        else:
            order = sorted(free, key=lambda j: -scores[j])
        take = order[: min(cap, k - total)]
        if take:
            picked.append(take)
            total += len(take)
    where = positions or {}
    expert = [pool[j] for take in picked for j in sorted(take, key=lambda j: (where.get(pool[j], j), j))]
    reason = RANDOM_REASON if scores is None else SCORED_REASON
    notes = []
    if total < k:
        notes.append(f"volumes: at most {cap} slices a volume leaves {total} of {k} slices")
    return VolumeChoice(expert, {i: reason for i in expert}, notes)
