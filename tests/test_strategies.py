"""Selection strategies on constructed score distributions: counts, regions, disjointness, purity."""
import numpy as np
import pytest

from alseg.errors import AlsegError
from alseg.active.strategies import CealParams, CealStrategy, make_strategy


def _scores(values):
    values = np.asarray(values, float)
    return {"variance": values, "entropy": values[::-1].copy(), "bald": (values % 7)}


def _crowd(n=1000, seed=0):
    """A crowd of confident images (low variance) with a long tail of uncertain ones."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.gamma(4, 1, int(n * 0.85)), rng.uniform(8, 80, n - int(n * 0.85))])


def test_ceal_counts_regions_and_disjoint_groups():
    values = _crowd()
    pool = [f"s{i}" for i in range(len(values))]
    strat = CealStrategy()
    sel = strat.select(_scores(values), pool, 3, np.random.default_rng(0))
    assert len(sel.expert_ids) == 35 and len(sel.pseudo_ids) == 60
    assert not set(sel.expert_ids) & set(sel.pseudo_ids)
    assert len(set(sel.expert_ids)) == 35 and len(set(sel.pseudo_ids)) == 60
    by_reason = {}
    for i, r in sel.reasons.items():
        by_reason.setdefault(r, []).append(int(i[1:]))
    assert {k: len(v) for k, v in by_reason.items()} == {"missed": 10, "uncertain": 10, "low": 15, "pseudo": 60}
    # missed = exactly the 10 lowest scores
    assert sorted(by_reason["missed"]) == sorted(np.argsort(values)[:10].tolist())
    which, counts, edges = strat.histogram(values)
    modal = int(np.argmax(counts))
    assert sel.shortfalls == []  # this crowd fills every region
    assert all(modal + 6 <= which[i] < 47 for i in by_reason["low"])
    assert all(which[i] >= 75 for i in by_reason["uncertain"])
    # pseudo: the modal bin first, widening only toward lower uncertainty
    assert all(which[i] <= modal for i in by_reason["pseudo"]) and any(which[i] == modal for i in by_reason["pseudo"])


def test_ceal_uncertain_takes_sparsest_top_bin_first():
    # bins 75..79 hold 30, 12, 3, 9, 1 images; the sparsest (1 in bin 79, 3 in bin 77, 9 in bin 78) give 13 >= 10
    parts = [np.linspace(0, 10, 500)]
    for b, count in zip(range(75, 80), (30, 12, 3, 9, 1)):
        parts.append(np.full(count, (b + 0.5) / 80 * 100))
    values = np.concatenate(parts + [np.array([100.0])])  # max = 100 fixes the edges at 1.25 per bin
    values[-2] = 99.0
    strat = CealStrategy()
    which, counts, _ = strat.histogram(values)
    sel = strat.select(_scores(values), [str(i) for i in range(len(values))], 0, np.random.default_rng(1))
    uncertain = [int(i) for i, r in sel.reasons.items() if r == "uncertain"]
    assert len(uncertain) == 10 and set(which[uncertain]) <= {77, 78, 79}
    assert sel.pseudo_ids == []  # round 0: before pseudo-labelling starts


def test_shortfall_reported_and_filled_from_neighbours():
    values = np.concatenate([np.linspace(0, 1, 100), [50, 100]])  # almost nothing uncertain
    sel = CealStrategy().select(_scores(values), [str(i) for i in range(len(values))], 1, np.random.default_rng(0))
    assert len(sel.expert_ids) == 35 and len(sel.pseudo_ids) == 20
    assert any(s.startswith("uncertain:") for s in sel.shortfalls)
    assert not set(sel.expert_ids) & set(sel.pseudo_ids)


def test_small_pool_never_selects_twice():
    values = np.arange(30, dtype=float)
    pool = [f"p{i}" for i in range(30)]
    sel = CealStrategy().select(_scores(values), pool, 2, np.random.default_rng(0))
    chosen = sel.expert_ids + sel.pseudo_ids
    assert len(chosen) == len(set(chosen)) == 30 and len(sel.expert_ids) == 30
    assert any("exhausted" in s for s in sel.shortfalls)


@pytest.mark.parametrize("name", ["ceal", "random", "uncertainty", "entropy", "bald"])
def test_pure_same_inputs_same_ids_and_pool_shrinks_by_expert_count(name):
    values = _crowd(400, seed=2)
    pool = [f"x{i}" for i in range(400)]
    strat = make_strategy(name)
    a = strat.select(_scores(values), pool, 1, np.random.default_rng(5))
    b = strat.select(_scores(values), pool, 1, np.random.default_rng(5))
    assert a.expert_ids == b.expert_ids and a.pseudo_ids == b.pseudo_ids
    assert len(a.expert_ids) == 35
    remaining = [i for i in pool if i not in set(a.expert_ids)]
    assert len(remaining) == len(pool) - 35
    if name == "uncertainty":
        assert set(a.expert_ids) == {pool[i] for i in np.argsort(-values)[:35]}
    if name != "ceal":
        assert a.pseudo_ids == []


def test_counts_and_start_round_are_configurable():
    params = CealParams(n_missed=2, n_uncertain=3, n_low=4, pseudo_per_round=5, pseudo_start_round=2, bins=40,
                        low_end_bin=30)
    values = _crowd(300)
    pool = [str(i) for i in range(300)]
    early = CealStrategy(params).select(_scores(values), pool, 1, np.random.default_rng(0))
    late = CealStrategy(params).select(_scores(values), pool, 3, np.random.default_rng(0))
    assert len(early.expert_ids) == 9 and early.pseudo_ids == []
    assert len(late.pseudo_ids) == 10  # 5 x (3 - 2 + 1)
    with pytest.raises(AlsegError):
        make_strategy("nope")


def test_pseudo_skip_empty_never_pseudo_labels_an_empty_prediction():
    values = _crowd(500, seed=4)
    foreground = np.where(np.arange(500) % 2 == 0, 0, 50)  # half the pool: the model sees nothing
    scores = {**_scores(values), "foreground": foreground}
    pool = [str(i) for i in range(500)]
    plain = CealStrategy().select(scores, pool, 2, np.random.default_rng(0))
    skip = CealStrategy(CealParams(pseudo_skip_empty=True)).select(scores, pool, 2, np.random.default_rng(0))
    assert any(foreground[int(i)] == 0 for i in plain.pseudo_ids)  # CEAL's default takes them
    assert len(skip.pseudo_ids) == 40 and all(foreground[int(i)] > 0 for i in skip.pseudo_ids)
    assert skip.expert_ids == plain.expert_ids  # the expert groups are unchanged
