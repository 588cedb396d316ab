"""The "cover" first batch of a project without masks: images that cover the pool (an option).

Pure: features, groups and a seeded generator in, indices out. The loop passes the pre-trained
U-Net's bottleneck features (:mod:`alseg.pretrain`), so "alike" means alike to a network that
has learnt to restore these very images.

:func:`cover_selection` clusters the pool into ``n`` groups by k-means (k-means++ start, on
features standardised per dimension) and takes from each cluster the image nearest its centre:
every kind of image the pool holds gets one example, the rare kinds too, where a random batch
takes mostly the common kind. With groups (patients), no group gives more than
``ceil(n / groups)`` images while others have some to give: a cluster whose nearest members are
all from full groups gives its nearest member from another group.

Measured against random masks on ISIC (docs/benchmarks.md, "Learning from the first masks") it
scored lower on validation Dice, so it is an option (``active.initial_selection: cover``), not the
default.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


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
