"""The statistics of a strategy comparison, pure (no files, no model): intervals over seeds, the
learning curve's area, the labels a curve needs to reach a target, paired per-seed differences
with sign-flip p-values, the expert's cumulative effort and a training's convergence.

:mod:`alseg.compare` runs the studies and summarises them with these; benchmarks and tests use
them directly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0
EXACT_FLIPS_UP_TO = 16  # seeds; 2^16 sign assignments are enumerated in well under a second
MONTE_CARLO_FLIPS = 100_000
RANGE_UP_TO = 3  # seeds: a percentile bootstrap of so few values is exactly their range
MEGAPIXEL = 1e6


def bootstrap_interval(values: Sequence[float], *, seed: int = BOOTSTRAP_SEED, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (one value per seed).

    Draws ``resamples`` samples of ``len(values)`` values with replacement (a generator seeded with
    ``seed``, so the same values always give the same interval), takes each sample's mean, and
    returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means. One value (or
    all values equal) gives ``(value, value)``: there is no spread to estimate. No values gives
    None.

    With very few seeds the interval is optimistic: for 2 or 3 values it is exactly their range
    (each extreme is drawn alone more often than 2.5 % of the time), so it says how far the seeds
    spread, not how far the mean could be.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError("bootstrap_interval takes a flat list of values")
    if not np.all(np.isfinite(v)):
        raise ValueError("bootstrap_interval needs finite values")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError("level must be in (0, 1) and resamples at least 1")
    if len(v) == 0:
        return None
    if len(v) == 1 or np.all(v == v[0]):
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def aulc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under the learning curve ``y`` (test Dice) over ``x`` (expert labels), by the trapezoid
    rule, divided by the label range ``x[-1] - x[0]``: the curve's mean Dice over the labels it
    spans, on the same 0..1 scale as Dice. A single point (or no label range) gives its Dice.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.ndim != 1 or xa.shape != ya.shape or len(xa) == 0:
        raise ValueError("aulc needs two flat sequences of the same, non-zero length")
    if np.any(np.diff(xa) < 0):
        raise ValueError("aulc needs label counts in increasing order")
    width = xa[-1] - xa[0]
    if width == 0:
        return float(ya[0])
    return float(np.sum(np.diff(xa) * (ya[1:] + ya[:-1]) / 2) / width)


def labels_to_reach(x: Sequence[float], y: Sequence[float], target: float, *,
                    interpolate: bool = False) -> float | None:
    """Expert labels at which the curve first reaches ``target`` (``y >= target``); None if never.

    Without ``interpolate``, the label count of the first round at or above the target. With it,
    the label count where the straight line between that round and the round before crosses the
    target (the first round itself when the curve starts at or above it): an estimate between
    rounds, not a count anybody labelled. Only the first crossing counts, even if the curve falls
    back below the target later.
    """
    if len(x) != len(y):
        raise ValueError("labels_to_reach needs as many label counts as Dice values")
    for i, (xi, yi) in enumerate(zip(x, y)):
        if yi >= target:
            if not interpolate or i == 0:
                return float(xi)
            x0, y0 = float(x[i - 1]), float(y[i - 1])  # y0 < target <= yi
            return float(x0 + (target - y0) / (float(yi) - y0) * (float(xi) - x0))
    return None


def dice_at(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """The curve's value at ``target`` labels, interpolated linearly; None outside the curve."""
    if not len(x) or target < x[0] or target > x[-1]:
        return None
    return float(np.interp(target, x, y))


def seed_summary(values: Sequence[float | None], *, seed: int = BOOTSTRAP_SEED, resamples: int = RESAMPLES,
                 level: float = LEVEL) -> dict:
    """``{"mean", "lo", "hi", "per_seed", "missing"}`` for one value per seed, None for a seed
    without a value (e.g. it never reached a target). Mean and interval (:func:`bootstrap_interval`)
    are None when any seed is missing: a mean over the seeds that happened to succeed would flatter.
    """
    per_seed = [None if v is None else float(v) for v in values]
    missing = sum(v is None for v in per_seed)
    if missing or not per_seed:
        return {"mean": None, "lo": None, "hi": None, "per_seed": per_seed, "missing": missing}
    lo, hi = bootstrap_interval(per_seed, seed=seed, resamples=resamples, level=level)
    return {"mean": float(np.mean(per_seed)), "lo": lo, "hi": hi, "per_seed": per_seed, "missing": 0}


def paired_differences(values: Sequence[float | None], baseline: Sequence[float | None], *,
                       seed: int = BOOTSTRAP_SEED, resamples: int = RESAMPLES, level: float = LEVEL) -> dict:
    """Per-seed differences ``values[i] - baseline[i]`` (the same seeds in the same order, so each
    pair shares split, initial set and initial model), their mean and bootstrap interval over seeds.

    Returns :func:`seed_summary` of the differences plus ``n`` (seeds), ``excludes_zero``: True
    when the interval lies wholly above or below 0, False when it contains 0, and ``p_value``, the
    two-sided sign-flip permutation p of the mean difference (:func:`sign_flip_p`), with
    ``p_method`` (:func:`sign_flip_method`). All three are None when there is nothing to judge
    (fewer than 2 seeds, or a seed without a value on either side). With 2 or 3 seeds the
    interval is the range of the differences, so it excludes 0 whenever all seeds agree in sign,
    which happens by chance half (2 seeds) or a quarter (3 seeds) of the time; p says so (0.5, 0.25).
    """
    if len(values) != len(baseline):
        raise ValueError("paired_differences needs one baseline value per seed")
    diffs = [None if a is None or b is None else float(a) - float(b) for a, b in zip(values, baseline)]
    out = seed_summary(diffs, seed=seed, resamples=resamples, level=level)
    out["n"] = len(diffs)
    if out["mean"] is None or len(diffs) < 2:
        out.update(excludes_zero=None, p_value=None, p_method=None)
    else:
        out.update(excludes_zero=bool(out["lo"] > 0 or out["hi"] < 0), p_value=sign_flip_p(diffs, seed=seed),
                   p_method=sign_flip_method(len(diffs)))
    return out


def interval_name(n: int) -> str:
    """What :func:`bootstrap_interval` over ``n`` seeds is, in words (for captions and legends)."""
    if n <= 1:
        return "no interval (1 seed)"
    if n <= RANGE_UP_TO:
        return f"range of the {n} seeds"
    return f"95 % percentile bootstrap interval over {n} seeds"


def cumulative_pixels_changed(rounds: Sequence[dict]) -> list[int] | None:
    """Pixels (at working size) the expert changed from the model's predicted masks up to each of
    ``rounds`` (round 0, labelled before any model: 0), from each later round's ``effort`` fact
    (``pixels_changed``); None when a round after the first lacks it (a run made before effort was
    recorded, or labelled without a prediction to compare with)."""
    total, out = 0, []
    for k, r in enumerate(rounds):
        if k:
            changed = (r.get("effort") or {}).get("pixels_changed")
            if changed is None:
                return None
            total += int(changed)
        out.append(total)
    return out


def epoch_score(record: dict) -> float | None:
    """What a training ranks its epochs by when it keeps one (:func:`alseg.train.fit`, :func:`convergence`):
    the epoch's validation Dice, its training Dice where none was measured."""
    return record["val_dice"] if record.get("val_dice") is not None else record.get("train_dice")


def convergence(epochs: Sequence[dict]) -> dict:
    """``{"best_epoch", "epochs", "still_improving"}`` of one training's recorded epochs (rows of
    :meth:`alseg.store.RunStore.epochs`), by the rule :func:`alseg.train.fit` keeps its checkpoint
    with: the first epoch of the highest validation Dice (training Dice where no validation was
    recorded). ``still_improving``: the best epoch is the last, so more epochs might have scored
    higher. No epochs: all None."""
    best, best_score = None, None
    for e in epochs:
        score = epoch_score(e)
        if score is not None and (best_score is None or score > best_score):
            best, best_score = int(e["epoch"]), score
    n = max((int(e["epoch"]) for e in epochs), default=None)
    return {"best_epoch": best, "epochs": n, "still_improving": None if best is None else best == n}


def default_fixed_counts(x: Sequence[float]) -> list[float]:
    """The expert-label counts :func:`summarise` reads Dice at by default, from the mean label counts
    ``x`` of the rounds every run finished: round 1's and the last-but-one round's (the last round
    can take every image left in the pool, so it says little about selection)."""
    picks = sorted({k for k in (1, len(x) - 2) if 0 <= k < len(x)})
    return [float(x[k]) for k in picks]


def sign_flip_method(n: int) -> str:
    """How :func:`sign_flip_p` tests ``n`` differences: ``"exact"`` (every one of the 2^n sign
    assignments) up to :data:`EXACT_FLIPS_UP_TO` seeds, else ``"monte carlo"`` (:data:`MONTE_CARLO_FLIPS`
    seeded random assignments)."""
    return "exact" if n <= EXACT_FLIPS_UP_TO else "monte carlo"


def sign_flip_p(diffs: Sequence[float], *, seed: int = BOOTSTRAP_SEED, flips: int = MONTE_CARLO_FLIPS) -> float:
    """Two-sided paired sign-flip permutation p-value of the mean of ``diffs`` (one per seed).

    Under "no difference" each seed's difference is as likely to have either sign, so every
    assignment of signs to the differences is as likely as the observed one. The statistic is the
    absolute mean; p is the share of assignments whose absolute mean is at least the observed one
    (the observed assignment included, with a tolerance so that float ties count). Up to
    :data:`EXACT_FLIPS_UP_TO` differences every one of the 2^n assignments is enumerated; above,
    ``flips`` random assignments from a generator seeded with ``seed``, with p = (hits + 1) / (flips + 1).

    The smallest p is 2 / 2^n (all seeds agree in sign): 0.25 with 3 seeds, 0.0625 with 5, about 0.002 with 10.
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("sign_flip_p takes a flat, non-empty list of differences")
    if not np.all(np.isfinite(d)):
        raise ValueError("sign_flip_p needs finite differences")
    observed = abs(d.sum())  # |sum| orders assignments as |mean| does
    tolerance = 1e-9 * max(float(np.abs(d).sum()), 1e-300)
    if sign_flip_method(len(d)) == "exact":
        codes = np.arange(2 ** len(d), dtype=np.int64)[:, None] >> np.arange(len(d))
        signs = 1.0 - 2.0 * (codes & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(flips, len(d)))
    hits = int(np.count_nonzero(np.abs(signs @ d) >= observed - tolerance))
    return (hits + 1) / (flips + 1)
