"""The first batch of a project without masks: random, spread over groups, or covering the pool.

Pure: ids or features, groups and a seeded generator in, a choice out.

:func:`spread_selection` (the default, ``active.initial_selection: random``) draws at random,
one group (patient, volume) after another, so the batch covers as many groups as it can.

:func:`cover_selection` (``active.initial_selection: cover``) is given the pre-trained U-Net's
bottleneck features (:mod:`alseg.pretrain`), so "alike" means alike to a network that has learnt
to restore these very images. It clusters the pool into ``n`` groups by k-means (k-means++ start, on
features standardised per dimension) and takes from each cluster the image nearest its centre:
every kind of image the pool holds gets one example, the rare kinds too, where a random batch
takes mostly the common kind. With groups (patients), no group gives more than
``ceil(n / groups)`` images while others have some to give: a cluster whose nearest members are
all from full groups gives its nearest member from another group.

Measured against random masks on ISIC (docs/benchmarks.md, "Learning from the first masks") it
scored lower on validation Dice, so it is an option (``active.initial_selection: cover``), not the
default.

Slices of volumes (:func:`tissue_candidates`, which the loop applies before either rule): the
slices that are mostly air are left out, those whose tissue covers less than :data:`TISSUE_SHARE`
of the area it covers on the fullest of their volume's candidate slices, so an expert is never
asked to draw on the air beyond a head's crown. Tissue is a pixel brighter than
:data:`TISSUE_LEVEL` of its volume's 99th percentile (mean over channels): a level each volume
sets for itself, whatever the modality or scale. Measured on the LGG patients
(``benchmarks/first_batch.py``): 6.8 % of slices fall below the share and none of the 360 tumour
slices does. When fewer slices than the batch have tissue, every slice stays a candidate.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


TISSUE_SHARE = 0.25  # of the volume's fullest slice: below it, a slice is mostly air
TISSUE_LEVEL = 0.1  # of the volume's 99th percentile: brighter is tissue


def tissue_shares(images: np.ndarray, indices: Sequence[int], groups: Sequence[object]) -> np.ndarray:
    """Each of ``images[indices]``'s tissue area over the largest among its group's (its volume's)
    slices in ``indices``: 1.0 for the fullest slice, 0.0 for a slice of air. One volume at a time,
    so memory holds one volume's pixels, not the pool's."""
    indices = np.asarray(indices)
    # a slice without a group is a volume of its own, as spread_selection counts it
    keys = np.array([repr(g) if g is not None else f"#{k}" for k, g in enumerate(groups)], dtype=object)
    shares = np.zeros(len(indices))
    for key in dict.fromkeys(keys):
        rows = np.flatnonzero(keys == key)
        grey = np.asarray(images[indices[rows]], np.float32).mean(-1)
        area = (grey > TISSUE_LEVEL * np.percentile(grey, 99)).mean((1, 2))
        shares[rows] = area / area.max() if area.max() > 0 else 1.0
    return shares


def tissue_candidates(images: np.ndarray, ids: Sequence[str], indices: Sequence[int],
                      groups: Sequence[object | None], n: int) -> list[str]:
    """The ``ids`` (rows ``indices`` of ``images``, volumes ``groups``) a first batch of ``n`` may
    take: those with at least :data:`TISSUE_SHARE` (:func:`tissue_shares`), or all of them when
    fewer than ``n`` have it."""
    shares = tissue_shares(images, indices, groups)
    tissue = [i for i, share in zip(ids, shares) if share >= TISSUE_SHARE]
    return tissue if len(tissue) >= n else list(ids)


def spread_selection(ids: Sequence[str], groups: Sequence[object | None], n: int,
                     rng: np.random.Generator) -> list[str]:
    """``n`` of ``ids`` at random, round-robin over the shuffled groups (an id without a group is
    its own): the batch covers as many groups (patients, volumes) as it can."""
    by_group: dict[object, list[str]] = {}
    for i, g in zip(ids, groups):
        by_group.setdefault(g or i, []).append(i)
    queues = [list(rng.permutation(members)) for _, members in sorted(by_group.items(), key=lambda kv: str(kv[0]))]
    queues = [queues[k] for k in rng.permutation(len(queues))]
    chosen: list[str] = []
    while len(chosen) < min(n, len(ids)):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(str(q.pop()))
    return chosen


def sq_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(N, k) squared Euclidean distances between rows of ``x`` and of ``c``, without an (N, k, d) array."""
    return np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None, :], 0.0)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """``(centres (k, d), label of each row)``: Lloyd's algorithm from a k-means++ start."""
    n = len(x)
    centres = [x[rng.integers(n)]]
    nearest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = rng.choice(n, p=nearest / total) if total > 0 else rng.integers(n)
        centres.append(x[pick])
        nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    c = np.array(centres)
    labels = np.full(n, -1)
    for _ in range(iterations):
        new = sq_distances(x, c).argmin(1)
        if (new == labels).all():
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return c, labels


def cover_selection(features: np.ndarray, groups: Sequence[object | None], n: int,
                    rng: np.random.Generator) -> list[int]:
    """``n`` row indices of ``features`` (N, d), one nearest each k-means centre, spread over ``groups``."""
    x = np.asarray(features, np.float64)
    count = len(x)
    n = min(n, count)
    if n <= 0:
        return []
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    centres, labels = kmeans(x, n, rng)
    dist = sq_distances(x, centres)  # (N, n)
    keys = [g if g is not None else ("image", i) for i, g in enumerate(groups)]
    cap = math.ceil(n / len(set(keys)))
    per_group: dict[object, int] = {}
    taken = np.zeros(count, bool)
    chosen: list[int] = []
    # largest clusters first: when the group cap bites, the common kinds give way, not the rare ones
    order = sorted(range(n), key=lambda j: (-int((labels == j).sum()), j))
    for j in order:
        members = np.flatnonzero(labels == j)
        candidates = members[np.argsort(dist[members, j], kind="stable")] if len(members) else np.array([], int)
        # then every other image, by distance to this centre: a cluster of full groups gives another group's
        rest = np.argsort(dist[:, j], kind="stable")
        for i in list(candidates) + [int(i) for i in rest]:
            if not taken[i] and per_group.get(keys[i], 0) < cap:
                taken[i] = True
                per_group[keys[i]] = per_group.get(keys[i], 0) + 1
                chosen.append(int(i))
                break
    return chosen
