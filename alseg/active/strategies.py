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
   Measured on LGG over 3 seeds, it helped only on the seed it was designed on (docs/benchmarks.md).

Groups are drawn in that order and never overlap. When a region holds too few images the
shortfall is reported and filled from the neighbouring bins, nearest first (for *uncertain*:
the bins below the top ones, going down; for *low*: the bins above the region, then below).

``random``, ``uncertainty`` (top-k variance), ``entropy`` (top-k entropy of the mean) and
``bald`` (top-k mutual information) take the same expert batch per round (``active.batch_size``;
by default CEAL's ``n_missed + n_uncertain + n_low`` = 35) and no pseudo-labels.

Pseudo-labels are a rule a strategy is given (:class:`PseudoRule`), drawn after its expert batch
from what that left: :class:`CealPseudo` (step 4 above, the gate's ``pseudo_limit`` applied) or
:data:`NO_PSEUDO`. ``ceal``, ``diverse`` and ``suggestive`` are given CEAL's; so are these arms,
which take a comparison's selection and its pseudo-labels apart (issue 31):

* ``ceal-no-pseudo``: CEAL's expert batch (the same ids for the same inputs and rng), no pseudo-labels.
* ``random-pseudo``: random's expert batch (drawn first, so the same ids as ``random`` for the same
  rng), then CEAL's pseudo-labels from the rest of the pool; it needs the MC pass (the pseudo-labels
  are its masks), ``random`` does not.
* ``fg-random`` (foreground-aware random, after nnActive's "Random 33% FG", Lüth et al. 2025): a
  ``fg_fraction`` (1/3) of the batch uniformly from pool images whose predicted mask has foreground
  (``foreground`` > 0), the rest uniformly from the remaining pool; when too few have foreground the
  rest is filled at random, with a note. A departure: nnActive's simulation uses the true label; a
  pool holds none, so this uses the model's (it needs the MC pass). No pseudo-labels; it ranks
  nothing (``score_name`` None), so the volume rules cap it as random.

``diverse`` (beyond the paper): the ``candidates`` x batch most uncertain pool images (variance),
then k-center greedy (core-set) on the U-Net's bottleneck features: each pick is the candidate
farthest from everything labelled and picked so far, so near-duplicates (neighbouring slices of one
patient, look-alike lesions) are not asked twice; with groups, at most ``group_cap`` of the batch
from one group. Its pseudo-labels are CEAL's (the modal bin). It costs one deterministic feature
pass over the labelled set and the pool on top of the MC passes.

``suggestive`` (beyond the paper; Yang et al., MICCAI 2017): the same candidates, group cap,
pseudo-labels and feature pass, but the batch is a greedy max-cover (facility location) of the
whole pool: each pick adds most to the sum, over pool images, of each one's highest cosine
similarity to the labelled set and the picks. It prefers images like many unlabelled ones
(representative), where k-center's farthest points can be outliers.

The ``select`` contract. ``select(scores, pool, round, rng, *, pseudo_held=0, pseudo_limit=None) -> Selection``:

* ``pool``: the n pool ids, in store order; ``round`` >= 1; ``rng``: a seeded generator, the only
  source of randomness (same inputs and seed, same ids);
* ``scores``: arrays aligned with ``pool``: ``variance``, ``entropy``, ``bald`` (n,) float, the
  per-image sums of the MC maps; ``foreground`` (n,) pixels of the thresholded MC mean; ``group``
  (n,) object, the sample's group or None. A strategy registered with ``needs_features`` also gets
  ``features`` (n, d) float32 and ``labelled_features`` (m, d) (bottleneck, global-average pooled);
  one with ``needs_scores`` False (``random``) gets only ``group``: the loop skips the T MC passes
  over the pool (and so records no scores for that round);
* ``pseudo_held``: pseudo-labels kept from earlier rounds (``keep_pseudo``), which count toward
  this round's number; ``pseudo_limit``: the most pseudo-labels the gate allows this round
  (:mod:`alseg.active.gate`; None: no limit); ``pseudo_wanted(round, pseudo_held)`` says how many
  the strategy would take without it (0 for strategies that take none);
* returns ``Selection``: expert ids and pseudo ids (disjoint, subsets of ``pool``, no repeats),
  a reason per id (the manifest shows it), and shortfalls (notes when a region held too few).

On grouped data (volumes) the loop then applies the volume rules (:mod:`alseg.active.volumes`:
a cap of slices per volume, or whole-volume selection) to the expert ids, ranking by the
strategy's ``score_name`` (None: random); pseudo-labels are left as the strategy chose them.

Strategies are plug-ins: ``@register(name, help=..., colour=..., reasons={...})`` on a factory
``(params: CealParams, batch_size: int) -> Strategy`` makes a name known to the config, the CLI,
``compare`` and the report; ``reasons`` maps each reason the strategy records to its label and
colour (:data:`REASONS`: the manifest, the page and the selection figures read them there).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from alseg.errors import AlsegError


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
    # The gate (alseg.active.gate, a departure from CEAL): no pseudo-labels from a model whose
    # validation Dice is below pseudo_min_val_dice or no better than a constant mask (pseudo_gate
    # false: CEAL's, always), and never more than pseudo_max_pool_fraction of the pool images left
    # after the expert's batch (1.0: CEAL's, up to the whole pool).
    pseudo_gate: bool = True
    pseudo_min_val_dice: float = 0.5
    pseudo_max_pool_fraction: float = 0.5

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


class _Bins:
    """The book of one pool's selection: what is taken, and why, and the notes of what fell short;
    with scores, also CEAL's histogram of them, drawn from bin by bin without repeats."""

    def __init__(self, n: int, rng: np.random.Generator, which: np.ndarray | None = None,
                 counts: np.ndarray | None = None):
        self.which = which  # each image's bin (None: no histogram, nothing is drawn by bin)
        self.modal = int(np.argmax(counts)) if counts is not None else None
        self.rng = rng
        self.taken = np.zeros(n, bool)
        self.barred = np.zeros(n, bool)  # excluded from the group being drawn, not taken
        self.reasons: dict[int, str] = {}
        self.shortfalls: list[str] = []

    @classmethod
    def histogram(cls, values: np.ndarray, bins: int, rng: np.random.Generator) -> "_Bins":
        which, counts, _ = ceal_histogram(values, bins)
        return cls(len(values), rng, which, counts)

    def free_in(self, b: int) -> int:
        return int(np.count_nonzero((self.which == b) & ~self.taken))

    def members(self, bins: Sequence[int]) -> list[np.ndarray]:
        return [np.flatnonzero((self.which == b) & ~self.taken & ~self.barred) for b in bins]

    def take(self, indices: Sequence[int], reason: str) -> None:
        for i in indices:
            self.taken[int(i)] = True
            self.reasons[int(i)] = reason

    def draw(self, reason: str, k: int, primary: Sequence[int], fallback: Sequence[int]) -> list[int]:
        """Take k at random from the primary bins, then bin by bin from the fallback ones."""
        if k <= 0:
            return []
        pool_idx = np.concatenate(self.members(primary)) if len(primary) else np.array([], int)
        chosen = [int(i) for i in self.rng.permutation(pool_idx)[:k]] if len(pool_idx) else []
        if len(chosen) < k:
            self.shortfalls.append(f"{reason}: region holds {len(chosen)} of {k}; the rest from neighbouring bins")
            for b in fallback:
                if len(chosen) >= k:
                    break
                cand = [i for i in self.members([b])[0] if i not in chosen]
                chosen.extend(int(i) for i in self.rng.permutation(np.array(cand, int))[: k - len(chosen)])
            if len(chosen) < k:
                self.shortfalls.append(f"{reason}: pool exhausted, {len(chosen)} of {k} chosen")
        self.take(chosen, reason)
        return chosen


def ceal_histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin of each value, counts per bin, edges): numpy's equal-width histogram, last bin closed."""
    counts, edges = np.histogram(values, bins=bins)
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    return which, counts, edges


# --- pseudo-labels: a rule a strategy is given, drawn after its expert batch ----------------------
class PseudoRule:
    """Which pool images a strategy pseudo-labels, drawn from what its expert batch left; this
    base rule takes none (``random``, the top-k strategies, ``ceal-no-pseudo``, ``fg-random``)."""

    needs_scores = False  # True: it draws from the MC pass (the pseudo-labels are its masks)

    def wanted(self, round: int, pseudo_held: int = 0) -> int:
        """Pseudo-labels to take in ``round`` before any gate."""
        return 0

    def ledger(self, scores: Mapping[str, np.ndarray], n: int, rng: np.random.Generator) -> _Bins:
        """The book a strategy takes its expert batch in, holding what :meth:`draw` draws from."""
        return _Bins(n, rng)

    def draw(self, bins: _Bins, scores: Mapping[str, np.ndarray], round: int, pseudo_held: int = 0,
             limit: int | None = None) -> list[int]:
        """Pool indices to pseudo-label, none of them taken in ``bins`` (which takes them)."""
        return []


NO_PSEUDO = PseudoRule()


class CealPseudo(PseudoRule):
    """CEAL's pseudo-labels (:func:`ceal_pseudo`): :func:`ceal_pseudo_count` of them, at most the
    gate's ``limit``, from the modal bin of the pool's variance histogram, widening."""

    needs_scores = True

    def __init__(self, params: "CealParams"):
        self.p = params

    def wanted(self, round: int, pseudo_held: int = 0) -> int:
        return ceal_pseudo_count(self.p, round, pseudo_held)

    def ledger(self, scores, n, rng):
        return _Bins.histogram(np.asarray(scores["variance"], float), self.p.bins, rng)

    def draw(self, bins, scores, round, pseudo_held=0, limit=None):
        return ceal_pseudo(self.p, bins, scores, round, pseudo_held, limit)


class Strategy:
    """See the module docstring for the ``select`` contract."""

    name = "base"
    needs_features = False
    needs_scores = True  # False: the loop skips the MC passes and ``scores`` holds only ``group``
    # the per-image scalar of ``scores`` this strategy ranks by, which the volume rules aggregate per
    # volume and rank replacements by (alseg.active.volumes); None: it ranks nothing (random)
    score_name: str | None = "variance"
    pseudo: PseudoRule = NO_PSEUDO  # the pseudo-label rule it is given

    def select(self, scores: Mapping[str, np.ndarray], pool: Sequence[str], round: int,
               rng: np.random.Generator, *, pseudo_held: int = 0, pseudo_limit: int | None = None) -> Selection:
        raise NotImplementedError

    def pseudo_wanted(self, round: int, pseudo_held: int = 0) -> int:
        """Pseudo-labels this strategy would take in ``round`` before any gate (0: it takes none)."""
        return self.pseudo.wanted(round, pseudo_held)

    def _selection(self, pool: Sequence[str], bins: _Bins, scores: Mapping[str, np.ndarray], round: int,
                   pseudo_held: int, pseudo_limit: int | None, shortfalls: Sequence[str] = (),
                   order: Sequence[int] | None = None) -> Selection:
        """The expert batch taken in ``bins`` (in ``order``, default pool order), then this
        strategy's pseudo-labels drawn from the rest; the reasons and notes of both."""
        expert = [pool[int(i)] for i in (np.flatnonzero(bins.taken) if order is None else order)]
        pseudo = self.pseudo.draw(bins, scores, round, pseudo_held, pseudo_limit)
        return Selection(expert, [pool[i] for i in pseudo], {pool[i]: r for i, r in bins.reasons.items()},
                         [*shortfalls, *bins.shortfalls])


class RandomStrategy(Strategy):
    """Uniform at random. With ``fg_fraction`` > 0, that share of the batch is drawn first from the
    pool images whose predicted mask has foreground (see :class:`ForegroundRandomStrategy`); with a
    ``pseudo`` rule, its pseudo-labels are drawn from what the batch left (``random-pseudo``)."""

    name = "random"
    score_name = None

    def __init__(self, budget: int = 35, *, fg_fraction: float = 0.0, pseudo: PseudoRule = NO_PSEUDO,
                 name: str | None = None):
        if not 0.0 <= fg_fraction <= 1.0:
            raise AlsegError(f"fg_fraction must lie between 0 and 1, got {fg_fraction}")
        self.budget, self.fg_fraction, self.pseudo = budget, fg_fraction, pseudo
        self.name = name or self.name
        # plain random needs no MC pass; predicted foreground and pseudo-labels come from one
        self.needs_scores = fg_fraction > 0 or pseudo.needs_scores

    def fg_wanted(self, batch: int) -> int:
        """Images of a ``batch`` to draw from predicted foreground: ``round(fg_fraction x batch)``."""
        return round(self.fg_fraction * batch)

    def select(self, scores, pool, round, rng, *, pseudo_held=0, pseudo_limit=None):
        n = len(pool)
        k = min(self.budget, n)
        bins = self.pseudo.ledger(scores, n, rng)
        short = [f"{self.name}: pool holds {n}, wanted {self.budget}"] if k < self.budget else []
        want = self.fg_wanted(k)
        if want:
            fg = np.flatnonzero(np.asarray(scores["foreground"]) > 0)
            bins.take(sorted(fg[rng.choice(len(fg), size=min(want, len(fg)), replace=False)]), "random-fg")
            if len(fg) < want:
                short.append(f"{self.name}: {len(fg)} pool images have predicted foreground, wanted {want}; "
                             "the rest at random")
        # the expert ids first, as plain random's (the same rng draw when nothing came from foreground),
        # then the pseudo-labels from what is left
        rest = np.flatnonzero(~bins.taken)
        bins.take(sorted(rest[rng.choice(len(rest), size=k - int(bins.taken.sum()), replace=False)]), "random")
        return self._selection(pool, bins, scores, round, pseudo_held, pseudo_limit, short)


class ForegroundRandomStrategy(RandomStrategy):
    """Foreground-aware random (nnActive, Lüth et al. 2025, "Random 33% FG"): ``fg_fraction`` (1/3)
    of the batch uniformly from pool images with predicted foreground (``scores["foreground"] > 0``,
    the thresholded MC mean), the rest uniformly from the remaining pool; when too few images have
    foreground the rest is filled at random and a note says so. A departure: nnActive, simulating,
    uses the true label; a pool holds no labels, so this uses the model's foreground (it needs the
    MC pass, and an empty-predicting model makes it plain random, with the note)."""

    name = "fg-random"

    def __init__(self, budget: int = 35, fg_fraction: float = 1 / 3, *, pseudo: PseudoRule = NO_PSEUDO,
                 name: str | None = None):
        super().__init__(budget, fg_fraction=fg_fraction, pseudo=pseudo, name=name)


class TopKStrategy(Strategy):
    """The ``budget`` pool images with the highest ``score`` (ties broken by pool order)."""

    def __init__(self, score: str, budget: int = 35, *, pseudo: PseudoRule = NO_PSEUDO):
        self.name = {"variance": "uncertainty"}.get(score, score)
        self.score, self.budget, self.pseudo = score, budget, pseudo
        self.score_name = score

    def select(self, scores, pool, round, rng, *, pseudo_held=0, pseudo_limit=None):
        values = np.asarray(scores[self.score], float)
        order = np.argsort(-values, kind="stable")[: self.budget]
        bins = self.pseudo.ledger(scores, len(pool), rng)
        bins.take(order, f"top {self.score}")
        short = [f"{self.name}: pool holds {len(pool)}, wanted {self.budget}"] if len(order) < self.budget else []
        return self._selection(pool, bins, scores, round, pseudo_held, pseudo_limit, short, order=order)


class CealStrategy(Strategy):
    """CEAL's expert batch (missed, uncertain, low) and, given ``pseudo`` (default CEAL's own rule,
    :class:`CealPseudo`; :data:`NO_PSEUDO` for the ``ceal-no-pseudo`` arm), its pseudo-labels."""

    name = "ceal"

    def __init__(self, params: CealParams = CealParams(), *, pseudo: PseudoRule | None = None,
                 name: str | None = None):
        if params.bins < params.top_bins or params.bins < 2:
            raise AlsegError("CEAL needs at least 2 bins and no more top bins than bins")
        self.p = params
        self.pseudo = CealPseudo(params) if pseudo is None else pseudo
        self.name = name or self.name

    def histogram(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin of each value, counts per bin, edges): numpy's equal-width histogram, last bin closed."""
        return ceal_histogram(values, self.p.bins)

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

    def select(self, scores, pool, round, rng, *, pseudo_held=0, pseudo_limit=None):
        p = self.p
        values = np.asarray(scores["variance"], float)
        bins = _Bins.histogram(values, p.bins, rng)
        # 1. missed: the lowest scores
        order = [int(i) for i in np.argsort(values, kind="stable")][: p.n_missed]
        bins.take(order, "missed")
        if len(order) < p.n_missed:
            bins.shortfalls.append(f"missed: pool holds {len(order)} of {p.n_missed}")
        # 2. uncertain: sparsest of the top bins, adding bins from the sparsest up
        top = list(range(p.bins - p.top_bins, p.bins))
        top_sorted = sorted(top, key=lambda b: (bins.free_in(b), -b))
        primary, count = [], 0
        for b in top_sorted:
            c = bins.free_in(b)
            if c == 0:
                continue
            primary.append(b)
            count += c
            if count >= p.n_uncertain:
                break
        bins.draw("uncertain", p.n_uncertain, primary, list(range(p.bins - p.top_bins - 1, -1, -1)))
        # 3. low: the low-uncertainty region above the crowd; when it is short, the nearest bins
        #    first: upward from its upper edge (from bin `hi` when the region is empty, so bins
        #    between the modal crowd and `lo` are not skipped), then downward from below it.
        lo, hi = bins.modal + p.low_offset, min(p.low_end_bin, p.bins)
        region = list(range(lo, hi)) if lo < hi else []
        above = list(range(hi, p.bins))
        below = list(range((lo if region else hi) - 1, -1, -1))
        bins.draw("low", p.n_low, region, above + below)
        return self._selection(pool, bins, scores, round, pseudo_held, pseudo_limit)


def ceal_pseudo_count(p: CealParams, round: int, pseudo_held: int) -> int:
    """CEAL's pseudo-labels to take in ``round``: ``pseudo_per_round`` x (rounds since
    ``pseudo_start_round`` + 1) held, less the ``pseudo_held`` kept from earlier rounds (so with
    ``keep_pseudo`` each round adds ``pseudo_per_round``, not a triangular number)."""
    if round < p.pseudo_start_round or p.pseudo_per_round <= 0:
        return 0
    return max(0, p.pseudo_per_round * (round - p.pseudo_start_round + 1) - pseudo_held)


def ceal_pseudo(p: CealParams, bins: _Bins, scores: Mapping[str, np.ndarray], round: int,
                pseudo_held: int, limit: int | None = None) -> list[int]:
    """CEAL's pseudo-labels (:func:`ceal_pseudo_count` of them, at most ``limit``, the gate's): from the
    modal bin, widening toward lower uncertainty, then higher."""
    k = ceal_pseudo_count(p, round, pseudo_held)
    if limit is not None:
        k = min(k, limit)
    if k <= 0:
        return []
    if p.pseudo_skip_empty and scores.get("foreground") is not None:
        bins.barred[:] = np.asarray(scores["foreground"]) == 0
    modal = bins.modal
    chosen = bins.draw("pseudo", k, [modal], list(range(modal - 1, -1, -1)) + list(range(modal + 1, p.bins)))
    bins.barred[:] = False
    return sorted(chosen)


class DiverseStrategy(Strategy):
    """Uncertain candidates thinned by k-center greedy on bottleneck features, CEAL's pseudo-labels."""

    name = "diverse"
    needs_features = True

    def __init__(self, params: CealParams = CealParams(), budget: int = 35, candidates: float = 4.0,
                 group_cap: float = 0.25, *, pseudo: PseudoRule | None = None):
        self.p, self.budget, self.candidates, self.group_cap = params, budget, candidates, group_cap
        self.pseudo = CealPseudo(params) if pseudo is None else pseudo

    def _greedy(self, fc: np.ndarray, fl: np.ndarray, fp: np.ndarray):
        """``(best, update)`` for the greedy pick among the candidates ``fc`` (labelled ``fl``, pool ``fp``):
        ``best(free)`` the next candidate's index, ``update(j)`` after candidate ``j`` is taken.
        k-center: the candidate farthest from everything labelled and taken so far."""
        nearest = (np.min(((fc[:, None, :] - fl[None, :, :]) ** 2).sum(-1), axis=1) if len(fl)
                   else np.full(len(fc), np.inf))

        def best(free: np.ndarray) -> int:
            if np.isinf(nearest[free]).all():  # nothing labelled yet: start from the most uncertain
                return int(np.flatnonzero(free)[0])
            return int(np.flatnonzero(free)[np.argmax(nearest[free])])

        def update(j: int) -> None:
            np.minimum(nearest, ((fc - fc[j]) ** 2).sum(-1), out=nearest)
        return best, update

    def select(self, scores, pool, round, rng, *, pseudo_held=0, pseudo_limit=None):
        values = np.asarray(scores["variance"], float)
        n = len(values)
        k = min(self.budget, n)
        features = np.asarray(scores["features"], np.float64)
        labelled = np.asarray(scores.get("labelled_features", np.zeros((0, features.shape[1]))), np.float64)
        shortfalls: list[str] = [f"{self.name}: pool holds {n}, wanted {self.budget}"] if k < self.budget else []
        m = min(n, max(k, int(np.ceil(self.candidates * self.budget))))
        cand = np.argsort(-values, kind="stable")[:m]  # most uncertain first
        # features are compared after scaling each dimension by its spread in pool and labelled set
        both = np.concatenate([features, labelled]) if len(labelled) else features
        scale = both.std(0) + 1e-8
        best, update = self._greedy(features[cand] / scale, labelled / scale, features / scale)
        groups = scores.get("group")
        cap = None
        if groups is not None and any(g is not None for g in groups):
            cap = max(1, int(np.ceil(self.group_cap * self.budget)))
        per_group: dict[object, int] = {}
        chosen: list[int] = []
        free = np.ones(len(cand), bool)
        while len(chosen) < k and free.any():
            j = best(free)
            free[j] = False
            i = int(cand[j])
            g = groups[i] if cap is not None else None
            if g is not None and per_group.get(g, 0) >= cap:
                continue
            per_group[g] = per_group.get(g, 0) + 1
            chosen.append(i)
            update(j)
        if len(chosen) < k:  # the group cap or too few candidates: fill by uncertainty
            shortfalls.append(f"{self.name}: {len(chosen)} of {k} from the candidates; the rest by uncertainty")
            rest = [int(i) for i in np.argsort(-values, kind="stable") if int(i) not in set(chosen)]
            chosen.extend(rest[: k - len(chosen)])
        bins = self.pseudo.ledger(scores, n, rng)
        bins.take(chosen, self.name)
        return self._selection(pool, bins, scores, round, pseudo_held, pseudo_limit, shortfalls)


class SuggestiveStrategy(DiverseStrategy):
    """Suggestive annotation (Yang et al., MICCAI 2017): uncertain candidates, then a greedy max-cover
    of the whole pool by feature similarity; CEAL's pseudo-labels."""

    name = "suggestive"

    def _greedy(self, fc: np.ndarray, fl: np.ndarray, fp: np.ndarray):
        """Facility location: each pick adds most to sum over the pool of every image's highest cosine
        similarity to the labelled set and the picks, so the batch is like many pool images (typical,
        not outliers as k-center's farthest points can be) and unlike what is labelled already."""
        def unit(f: np.ndarray) -> np.ndarray:
            return f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)

        sim = np.clip(unit(fc) @ unit(fp).T, 0.0, None)  # (candidates, pool)
        covered = np.clip(unit(fl) @ unit(fp).T, 0.0, None).max(0) if len(fl) else np.zeros(len(fp))

        def best(free: np.ndarray) -> int:
            gain = np.clip(sim[free] - covered, 0.0, None).sum(1)
            return int(np.flatnonzero(free)[np.argmax(gain)])  # ties: the more uncertain

        def update(j: int) -> None:
            np.maximum(covered, sim[j], out=covered)
        return best, update


# --- the registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategySpec:
    name: str
    factory: Callable[[CealParams, int], Strategy]
    help: str
    colour: str
    needs_features: bool = False


_REGISTRY: dict[str, StrategySpec] = {}


@dataclass(frozen=True)
class ReasonSpec:
    """How a reason recorded for a chosen image is shown: its label (manifest, page, figure legends)
    and its colour in the selection figures."""

    label: str
    colour: str


# Reasons the loop itself records, and CEAL's; other strategies add theirs through `register`.
# A reason "top <score>" (top-k strategies) is shown as "most uncertain (top <score>)" under "top".
REASONS: dict[str, ReasonSpec] = {
    "initial": ReasonSpec("initial", "#17becf"), "pseudo": ReasonSpec("pseudo-label", "#ff7f0e"),
    "cover": ReasonSpec("initial (one per kind of image)", "#17becf"),
    "top": ReasonSpec("most uncertain (top score)", "#d62728"),
    # selection across volumes (alseg.active.volumes, active.volume_selection: volumes)
    "volume": ReasonSpec("best slices of the highest-scored volumes", "#bcbd22"),
    "random volume": ReasonSpec("random slices of random volumes", "#c5b0d5"),
}


def register(name: str, *, help: str, colour: str, needs_features: bool = False,
             reasons: Mapping[str, tuple[str, str]] | None = None):
    """Decorator: make ``factory(params, batch_size) -> Strategy`` known as ``name``; ``reasons``:
    ``{reason: (label, colour)}`` for the reasons its selections record."""
    def add(factory: Callable[[CealParams, int], Strategy]):
        _REGISTRY[name] = StrategySpec(name, factory, help, colour, needs_features)
        for reason, (label, reason_colour) in (reasons or {}).items():
            REASONS[reason] = ReasonSpec(label, reason_colour)
        return factory
    return add


def reason_kind(reason: str | None) -> str:
    """The :data:`REASONS` key a recorded reason is shown under (``top`` for ``top <score>``)."""
    if reason and reason.startswith("top "):
        return "top"
    return reason if reason in REASONS else "top"


def strategy_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def strategy_spec(name: str) -> StrategySpec:
    if name not in _REGISTRY:
        raise AlsegError(f"unknown strategy {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def reason_label(reason: str | None) -> str:
    """What the manifest and the page say for a recorded reason."""
    if reason and reason.startswith("top "):
        return f"most uncertain ({reason})"
    return REASONS[reason].label if reason in REASONS else (reason or "")


def make_strategy(name: str, params: CealParams = CealParams(), batch_size: int | None = None) -> Strategy:
    """The strategy ``name`` taking ``batch_size`` expert images a round (default: CEAL's 35)."""
    spec = strategy_spec(name)
    if batch_size is not None and batch_size < 1:
        raise AlsegError(f"a batch needs at least 1 image, got {batch_size}")
    return spec.factory(params, batch_size or params.expert_budget)


# reasons several strategies record (one reason key, one label and colour, whichever registers it)
_CEAL_REASONS = {"missed": ("missed", "#9467bd"), "uncertain": ("uncertain", "#d62728"),
                 "low": ("low-uncertainty random", "#2ca02c")}
_RANDOM_REASONS = {"random": ("random", "#7f7f7f")}


def _ceal_params(params: CealParams, batch_size: int) -> CealParams:
    return params if batch_size == params.expert_budget else params.with_expert_budget(batch_size)


@register("ceal", help="the paper: missed, most uncertain, low-uncertainty random; pseudo-labels", colour="#1f77b4",
          reasons=_CEAL_REASONS)
def _ceal(params: CealParams, batch_size: int) -> Strategy:
    return CealStrategy(_ceal_params(params, batch_size))


@register("random", help="uniform at random (the baseline)", colour="#7f7f7f", reasons=_RANDOM_REASONS)
def _random(params: CealParams, batch_size: int) -> Strategy:
    return RandomStrategy(batch_size)


@register("uncertainty", help="top-k MC variance", colour="#d62728")
def _uncertainty(params: CealParams, batch_size: int) -> Strategy:
    return TopKStrategy("variance", batch_size)


@register("entropy", help="top-k entropy of the MC mean", colour="#9467bd")
def _entropy(params: CealParams, batch_size: int) -> Strategy:
    return TopKStrategy("entropy", batch_size)


@register("bald", help="top-k BALD (mutual information)", colour="#2ca02c")
def _bald(params: CealParams, batch_size: int) -> Strategy:
    return TopKStrategy("bald", batch_size)


@register("diverse", help="uncertain candidates thinned by k-center greedy on bottleneck features; CEAL's "
          "pseudo-labels", colour="#8c564b", needs_features=True,
          reasons={"diverse": ("uncertain and unlike the labelled", "#8c564b")})
def _diverse(params: CealParams, batch_size: int) -> Strategy:
    return DiverseStrategy(params, batch_size)


@register("suggestive", help="uncertain candidates, then a max-cover of the pool by feature similarity "
          "(suggestive annotation); CEAL's pseudo-labels", colour="#e377c2", needs_features=True,
          reasons={"suggestive": ("uncertain and like many unlabelled", "#e377c2")})
def _suggestive(params: CealParams, batch_size: int) -> Strategy:
    return SuggestiveStrategy(params, batch_size)


# --- ablation arms (issue 31): selection and pseudo-labels apart --------------------------------
@register("ceal-no-pseudo", help="ablation: CEAL's expert batch (missed, uncertain, low), no pseudo-labels",
          colour="#aec7e8", reasons=_CEAL_REASONS)
def _ceal_no_pseudo(params: CealParams, batch_size: int) -> Strategy:
    return CealStrategy(_ceal_params(params, batch_size), pseudo=NO_PSEUDO, name="ceal-no-pseudo")


@register("random-pseudo", help="ablation: random's expert batch, plus CEAL's pseudo-labels from the rest of the "
          "pool (needs the MC pass)", colour="#ffbb78", reasons=_RANDOM_REASONS)
def _random_pseudo(params: CealParams, batch_size: int) -> Strategy:
    return RandomStrategy(batch_size, pseudo=CealPseudo(params), name="random-pseudo")


@register("fg-random", help="foreground-aware random (nnActive's Random 33% FG): a third of the batch at random "
          "from images with predicted foreground (the model's, not the true label), the rest at random; "
          "needs the MC pass", colour="#525252",
          reasons={"random-fg": ("random, predicted foreground", "#dbdb8d"), **_RANDOM_REASONS})
def _fg_random(params: CealParams, batch_size: int) -> Strategy:
    return ForegroundRandomStrategy(batch_size)
