"""Selection strategies on constructed score distributions: counts, regions, disjointness, purity."""
import numpy as np
import pytest

from alseg.errors import AlsegError
from alseg.active.strategies import (CealParams, CealStrategy, DiverseStrategy, make_strategy, reason_label,
                                     SuggestiveStrategy, register, strategy_names, strategy_spec)


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


# --- defects of the method audit ------------------------------------------------------------------
def _in_bins(counts_by_bin: dict[int, int], bins: int = 80) -> np.ndarray:
    """Scores whose equal-width histogram over [0, 80] has exactly these counts (bin b: [b, b+1))."""
    parts = [np.full(c, b + 0.5) for b, c in sorted(counts_by_bin.items())]
    return np.concatenate(parts + [np.array([0.0, float(bins)])])  # pin the edges to 0..80


def test_low_fallback_takes_the_nearest_bins_when_the_region_is_empty():
    # modal bin 44: the region [44 + 6, 47) is empty; bins 47-49 hold 15 images, bins 50-53 more
    values = _in_bins({10: 5, 44: 300, 45: 20, 47: 5, 48: 5, 49: 5, 50: 10, 51: 10, 52: 10, 53: 10, 79: 12})
    strat = CealStrategy()
    which, counts, _ = strat.histogram(values)
    assert int(np.argmax(counts)) == 44
    sel = strat.select(_scores(values), [str(i) for i in range(len(values))], 1, np.random.default_rng(0))
    low = [int(i) for i, r in sel.reasons.items() if r == "low"]
    assert len(low) == 15 and sorted(set(which[low])) == [47, 48, 49]
    assert any(s.startswith("low: region holds 0 of 15") for s in sel.shortfalls)


def test_kept_pseudo_labels_count_toward_the_round_so_the_number_held_grows_linearly():
    values = _crowd(2000, seed=2)
    pool = [str(i) for i in range(len(values))]
    fresh = CealStrategy().select(_scores(values), pool, 3, np.random.default_rng(0))
    assert len(fresh.pseudo_ids) == 60  # transient: all 20 x 3 drawn anew
    kept = CealStrategy().select(_scores(values), pool, 3, np.random.default_rng(0), pseudo_held=40)
    assert len(kept.pseudo_ids) == 20  # 40 kept from rounds 1-2: 60 held in round 3


# --- the registry and the batch size --------------------------------------------------------------
@pytest.mark.parametrize("name", strategy_names())
def test_every_registered_strategy_takes_the_batch_size(name):
    values = _crowd(400, seed=3)
    rng = np.random.default_rng(5)
    scores = {**_scores(values), "foreground": np.full(400, 10), "group": np.array([None] * 400, dtype=object),
              "features": rng.normal(size=(400, 8)).astype(np.float32),
              "labelled_features": rng.normal(size=(30, 8)).astype(np.float32)}
    pool = [f"p{i}" for i in range(400)]
    sel = make_strategy(name, CealParams(), batch_size=12).select(scores, pool, 1, np.random.default_rng(0))
    assert len(sel.expert_ids) == 12 and len(set(sel.expert_ids)) == 12
    assert set(sel.expert_ids) <= set(pool) and not set(sel.expert_ids) & set(sel.pseudo_ids)
    assert set(sel.reasons) == set(sel.expert_ids) | set(sel.pseudo_ids)
    assert all(reason_label(r) for r in sel.reasons.values())
    assert strategy_spec(name).colour.startswith("#") and strategy_spec(name).help


def test_a_registered_plug_in_is_known_everywhere_names_are_read():
    from alseg.active import strategies

    @register("first-k", help="the first k of the pool", colour="#000000", reasons={"first": ("first in line", "#123456")})
    def _first(params, batch_size):
        class FirstK(strategies.Strategy):
            name = "first-k"

            def select(self, scores, pool, round, rng, *, pseudo_held=0):
                return strategies.Selection(list(pool[:batch_size]), [], {i: "first" for i in pool[:batch_size]})
        return FirstK()

    from alseg.report import _kind
    from alseg.report.figures import kind_styles

    try:
        assert "first-k" in strategy_names()
        sel = make_strategy("first-k", batch_size=3).select({}, ["a", "b", "c", "d"], 1, None)
        assert sel.expert_ids == ["a", "b", "c"]
        # its reason reaches the manifest's label and the selection figures' colour and legend
        assert reason_label(sel.reasons["a"]) == "first in line"
        assert _kind("first", "expert") == "first" and kind_styles()["first"] == ("#123456", "expert: first in line")
    finally:
        strategies._REGISTRY.pop("first-k")
        strategies.REASONS.pop("first")
    assert _kind("top variance", "expert") == "top" and _kind("missed", "expert") == "missed"
    assert _kind("missed", "pseudo") == "pseudo"
    with pytest.raises(AlsegError, match="unknown strategy"):
        make_strategy("first-k")
    with pytest.raises(AlsegError, match="at least 1"):
        make_strategy("random", batch_size=0)


# --- diverse: uncertainty thinned by k-center greedy ---------------------------------------------
def _clustered(n_clusters=12, per=10, seed=0):
    """Pool of near-duplicates: clusters of `per` images sharing features (plus noise); the most
    uncertain cluster holds the highest scores, so top-k takes it whole."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(n_clusters, 16))
    cluster = np.repeat(np.arange(n_clusters), per)
    features = centres[cluster] + rng.normal(scale=0.05, size=(len(cluster), 16))
    values = 50 + cluster * 1.0 + rng.uniform(0, 0.5, len(cluster))  # cluster 11 most uncertain
    return values, features.astype(np.float32), cluster


def test_diverse_asks_each_cluster_once_where_top_k_asks_one_cluster_ten_times():
    values, features, cluster = _clustered()
    pool = [f"i{k}" for k in range(len(values))]
    scores = {**_scores(values), "foreground": np.full(len(values), 5), "features": features,
              "labelled_features": features[:0], "group": np.array([None] * len(values), dtype=object)}
    top = make_strategy("uncertainty", batch_size=10).select(scores, pool, 1, np.random.default_rng(0))
    diverse = make_strategy("diverse", batch_size=10).select(scores, pool, 1, np.random.default_rng(0))
    clusters_of = lambda ids: [cluster[pool.index(i)] for i in ids]
    assert len(set(clusters_of(top.expert_ids))) == 1
    # candidates: the 40 most uncertain images, 4 clusters; k-center greedy spreads over all 4
    assert len(set(clusters_of(diverse.expert_ids))) == 4
    again = make_strategy("diverse", batch_size=10).select(scores, pool, 1, np.random.default_rng(0))
    assert again.expert_ids == diverse.expert_ids  # deterministic


def test_diverse_avoids_what_is_already_labelled_and_caps_groups():
    values, features, cluster = _clustered(n_clusters=6, per=20, seed=1)
    pool = [f"i{k}" for k in range(len(values))]
    labelled = features[cluster == 5][:3]  # the most uncertain cluster is already well labelled
    groups = np.array([f"g{c}" for c in cluster], dtype=object)
    scores = {**_scores(values), "foreground": np.full(len(values), 5), "features": features,
              "labelled_features": labelled, "group": groups}
    sel = DiverseStrategy(CealParams(), budget=8, candidates=15, group_cap=0.25).select(
        scores, pool, 2, np.random.default_rng(0))
    picked = [cluster[pool.index(i)] for i in sel.expert_ids]
    assert len(picked) == 8 and max(np.bincount(picked)) <= 2  # at most a quarter of 8 per group
    assert picked.count(5) <= 1  # far from nothing new: the labelled cluster is asked last, if at all
    assert len(sel.pseudo_ids) == 40 and not set(sel.pseudo_ids) & set(sel.expert_ids)  # CEAL's pseudo-labels


# --- suggestive: uncertainty, then a max-cover of the pool ------------------------------------------
def test_suggestive_covers_the_crowds_where_k_center_asks_the_outliers_and_skips_what_is_labelled():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=10, size=(8, 16))
    # two crowds (50 and 30 look-alikes) and six lone outliers, every image about as uncertain (and
    # every image a candidate)
    cluster = np.concatenate([np.zeros(50, int), np.ones(30, int), np.arange(2, 8)])
    features = (centres[cluster] + rng.normal(scale=0.3, size=(len(cluster), 16))).astype(np.float32)
    values = 50 + rng.uniform(0, 0.1, len(cluster))
    pool = [f"i{k}" for k in range(len(values))]

    def chosen(name, labelled):
        scores = {**_scores(values), "foreground": np.full(len(values), 5), "features": features,
                  "labelled_features": labelled, "group": np.array([None] * len(values), dtype=object)}
        kind = {"suggestive": SuggestiveStrategy, "diverse": DiverseStrategy}[name]
        sel = kind(CealParams(), budget=2, candidates=50).select(scores, pool, 1, np.random.default_rng(0))
        assert set(sel.reasons[i] for i in sel.expert_ids) == {name}
        return sorted(cluster[pool.index(i)] for i in sel.expert_ids)

    some_labelled = features[cluster == 2][:1]  # one outlier's look-alike is labelled
    assert chosen("suggestive", some_labelled) == [0, 1]  # one from each crowd
    assert set(chosen("diverse", some_labelled)) <= set(range(2, 8))  # k-center: the farthest, outliers
    # the larger crowd already labelled: its look-alikes add little, the next picks lie elsewhere
    assert 0 not in chosen("suggestive", features[cluster == 0][:5])
