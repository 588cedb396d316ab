"""Selection strategies: which pool images go to the expert, and which get pseudo-labels.

Pure: given the same scores, pool, round and seed, a strategy returns the same ids. Nothing
here touches a model, a file or the store.

``ceal`` (the paper; the published CEAL code's choices as reference). The pool's variance
scores are binned in ``bins`` (80) equal-width bins between their minimum and maximum. Bin
``i`` spans ``[edge_i, edge_{i+1})``; the modal bin ``m`` is the fullest (lowest on ties).

1. **missed** (``n_missed`` = 10): the lowest scores; the model sees nothing there.
2. **uncertain** (``n_uncertain`` = 10): drawn at random from the sparsest of the ``top_bins``
   (5) highest bins; further bins of those five are added from the sparsest up until there
   are at least ``n_uncertain`` candidates.
3. **low** (``n_low`` = 15): drawn at random from the low-uncertainty region above the crowd,
   ``[edge_{m + low_offset}, edge_{low_end_bin})`` with ``low_offset`` = 6, ``low_end_bin`` = 47
   (the CEAL code's ``80 - 33``); an empty region when ``m + low_offset >= low_end_bin``.
4. **pseudo** (``pseudo_per_round`` x round = 20 x round, from ``pseudo_start_round`` = 1):
   drawn at random from the modal bin, widening one bin at a time toward lower uncertainty
   (m - 1, m - 2, ...) when it holds too few, then above it (m + 1, ...). With
   ``pseudo_skip_empty`` (off by default, as in CEAL) images whose thresholded MC mean is empty
   are never pseudo-labelled: on data where every image holds a lesion (the LGG preset's tumour
   slices) such a pseudo-label is certainly wrong, and the modal bin of a weak model is full of them.

Groups are drawn in that order and never overlap. When a region holds too few images the
shortfall is reported and filled from the neighbouring bins, nearest first (for *uncertain*:
the bins below the top ones, going down; for *low*: the bins above the region, then below).

``random``, ``uncertainty`` (top-k variance), ``entropy`` (top-k entropy of the mean) and
``bald`` (top-k mutual information) take the same expert budget per round (``n_missed +
n_uncertain + n_low`` = 35 by default) and no pseudo-labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from alseg.errors import AlsegError

STRATEGIES = ("ceal", "random", "uncertainty", "entropy", "bald")


@dataclass
class Selection:
    expert_ids: list[str]
    pseudo_ids: list[str]
    reasons: dict[str, str] = field(default_factory=dict)
    shortfalls: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CealParams:
    bins: int = 80
    n_missed: int = 10
    n_uncertain: int = 10
    n_low: int = 15
    top_bins: int = 5
    low_offset: int = 6
    low_end_bin: int = 47
    pseudo_per_round: int = 20
    pseudo_start_round: int = 1
    pseudo_skip_empty: bool = False  # True: never pseudo-label an image whose predicted mask is empty

    @property
    def expert_budget(self) -> int:
        return self.n_missed + self.n_uncertain + self.n_low

    def with_expert_budget(self, n: int) -> "CealParams":
        """The same proportions (10 : 10 : 15 by default) scaled to ``n`` expert images a round."""
        if n < 1:
            raise AlsegError(f"a batch needs at least 1 image, got {n}")
        total = self.expert_budget
        missed = round(n * self.n_missed / total)
        uncertain = round(n * self.n_uncertain / total)
        return replace(self, n_missed=missed, n_uncertain=uncertain, n_low=n - missed - uncertain)


class Strategy:
    name = "base"

    def select(self, scores: Mapping[str, np.ndarray], pool: Sequence[str], round: int,
               rng: np.random.Generator) -> Selection:
        raise NotImplementedError


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, budget: int = 35):
        self.budget = budget

    def select(self, scores, pool, round, rng):
        k = min(self.budget, len(pool))
        picked = [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
        short = [f"random: pool holds {len(pool)}, wanted {self.budget}"] if k < self.budget else []
        return Selection(picked, [], {i: "random" for i in picked}, short)


class TopKStrategy(Strategy):
    """The ``budget`` pool images with the highest ``score`` (ties broken by pool order)."""

    def __init__(self, score: str, budget: int = 35):
        self.name = {"variance": "uncertainty"}.get(score, score)
        self.score, self.budget = score, budget

    def select(self, scores, pool, round, rng):
        values = np.asarray(scores[self.score], float)
        order = np.argsort(-values, kind="stable")[: self.budget]
        picked = [pool[i] for i in order]
        short = [f"{self.name}: pool holds {len(pool)}, wanted {self.budget}"] if len(picked) < self.budget else []
        return Selection(picked, [], {i: f"top {self.score}" for i in picked}, short)


class CealStrategy(Strategy):
    name = "ceal"

    def __init__(self, params: CealParams = CealParams()):
        if params.bins < params.top_bins or params.bins < 2:
            raise AlsegError("CEAL needs at least 2 bins and no more top bins than bins")
        self.p = params

    def histogram(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin of each value, counts per bin, edges): numpy's equal-width histogram, last bin closed."""
        counts, edges = np.histogram(values, bins=self.p.bins)
        which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, self.p.bins - 1)
        return which, counts, edges

    def regions(self, values: np.ndarray) -> dict[str, tuple[float, float]]:
        """Score intervals of the CEAL regions for these scores (for figures): missed, low, uncertain, pseudo."""
        p = self.p
        values = np.asarray(values, float)
        _, counts, edges = self.histogram(values)
        modal = int(np.argmax(counts))
        lo, hi = modal + p.low_offset, min(p.low_end_bin, p.bins)
        lowest = np.sort(values)[: max(1, p.n_missed)]
        return {"missed": (float(edges[0]), float(lowest[-1])),
                "low": (float(edges[lo]), float(edges[hi])) if lo < hi else (0.0, 0.0),
                "uncertain": (float(edges[p.bins - p.top_bins]), float(edges[-1])),
                "pseudo": (float(edges[modal]), float(edges[modal + 1]))}

    def select(self, scores, pool, round, rng):
        p = self.p
        values = np.asarray(scores["variance"], float)
        n = len(values)
        which, counts, _ = self.histogram(values)
        modal = int(np.argmax(counts))
        taken = np.zeros(n, bool)
        reasons: dict[int, str] = {}
        shortfalls: list[str] = []

        barred = np.zeros(n, bool)  # excluded from the group being drawn, without being taken

        def members(bins: Sequence[int]) -> list[np.ndarray]:
            return [np.flatnonzero((which == b) & ~taken & ~barred) for b in bins]

        def draw(reason: str, k: int, primary: Sequence[int], fallback: Sequence[int]) -> None:
            """Take k at random from the primary bins, then bin by bin from the fallback ones."""
            if k <= 0:
                return
            pool_idx = np.concatenate(members(primary)) if len(primary) else np.array([], int)
            chosen = list(rng.permutation(pool_idx)[:k]) if len(pool_idx) else []
            if len(chosen) < k:
                shortfalls.append(f"{reason}: region holds {len(chosen)} of {k}; the rest from neighbouring bins")
                for b in fallback:
                    if len(chosen) >= k:
                        break
                    cand = [i for i in members([b])[0] if i not in chosen]
                    chosen.extend(rng.permutation(np.array(cand, int))[: k - len(chosen)])
                if len(chosen) < k:
                    shortfalls.append(f"{reason}: pool exhausted, {len(chosen)} of {k} chosen")
            for i in chosen:
                taken[int(i)] = True
                reasons[int(i)] = reason

        # 1. missed: the lowest scores
        order = [i for i in np.argsort(values, kind="stable") if not taken[i]][: p.n_missed]
        for i in order:
            taken[i] = True
            reasons[int(i)] = "missed"
        if len(order) < p.n_missed:
            shortfalls.append(f"missed: pool holds {len(order)} of {p.n_missed}")
        # 2. uncertain: sparsest of the top bins, adding bins from the sparsest up
        top = list(range(p.bins - p.top_bins, p.bins))
        top_sorted = sorted(top, key=lambda b: (np.count_nonzero((which == b) & ~taken), -b))
        primary, count = [], 0
        for b in top_sorted:
            c = np.count_nonzero((which == b) & ~taken)
            if c == 0:
                continue
            primary.append(b)
            count += c
            if count >= p.n_uncertain:
                break
        draw("uncertain", p.n_uncertain, primary, list(range(p.bins - p.top_bins - 1, -1, -1)))
        # 3. low: the low-uncertainty region above the crowd
        lo, hi = modal + p.low_offset, min(p.low_end_bin, p.bins)
        region = list(range(lo, hi)) if lo < hi else []
        above = list(range(max(hi, lo), p.bins))
        below = list(range(min(lo, hi) - 1, -1, -1))
        draw("low", p.n_low, region, above + below)
        expert = [pool[i] for i in np.flatnonzero(taken)]
        # 4. pseudo-labels: modal bin, widening toward lower uncertainty, then higher
        pseudo: list[str] = []
        if round >= p.pseudo_start_round and p.pseudo_per_round > 0:
            k = p.pseudo_per_round * (round - p.pseudo_start_round + 1)
            before = set(np.flatnonzero(taken))
            if p.pseudo_skip_empty and scores.get("foreground") is not None:
                barred[:] = np.asarray(scores["foreground"]) == 0
            draw("pseudo", k, [modal], list(range(modal - 1, -1, -1)) + list(range(modal + 1, p.bins)))
            pseudo = [pool[i] for i in np.flatnonzero(taken) if i not in before]
        return Selection(expert, pseudo, {pool[i]: r for i, r in reasons.items()}, shortfalls)


def make_strategy(name: str, params: CealParams = CealParams()) -> Strategy:
    if name == "ceal":
        return CealStrategy(params)
    if name == "random":
        return RandomStrategy(params.expert_budget)
    if name in ("uncertainty", "entropy", "bald"):
        return TopKStrategy({"uncertainty": "variance"}.get(name, name), params.expert_budget)
    raise AlsegError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
