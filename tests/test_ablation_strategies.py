"""The ablation arms (issue 31) and the foreground-aware random baseline, on generated scores:
``ceal-no-pseudo`` (CEAL's expert batch, no pseudo-labels), ``random-pseudo`` (random's expert
batch, CEAL's pseudo-labels), ``fg-random`` (nnActive's "Random 33% FG" on predicted foreground),
and the pseudo-label rule any strategy can be given."""
import numpy as np
import pytest

from alseg.active.strategies import (NO_PSEUDO, CealParams, CealPseudo, DiverseStrategy, ForegroundRandomStrategy,
                                     TopKStrategy, ceal_histogram, ceal_pseudo_count, make_strategy, reason_kind,
                                     reason_label, strategy_names, strategy_spec)
from alseg.errors import AlsegError

ARMS = ("ceal-no-pseudo", "random-pseudo", "fg-random")


def _pool_scores(n: int = 600, seed: int = 0, fg_share: float = 0.3):
    """A crowd of confident images with a tail of uncertain ones; ``fg_share`` of them with predicted foreground."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.gamma(4, 1, int(n * 0.85)), rng.uniform(8, 80, n - int(n * 0.85))])
    foreground = np.where(rng.random(n) < fg_share, rng.integers(1, 400, n), 0)
    scores = {"variance": values, "entropy": values[::-1].copy(), "bald": values % 7, "foreground": foreground,
              "group": np.array([None] * n, dtype=object)}
    return scores, [f"p{i}" for i in range(n)]


def _check_selection(sel, pool):
    chosen = sel.expert_ids + sel.pseudo_ids
    assert len(chosen) == len(set(chosen)) and set(chosen) <= set(pool)
    assert set(sel.reasons) == set(chosen)


# --- ceal-no-pseudo -------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 12])
def test_ceal_no_pseudo_asks_ceal_expert_ids_and_takes_no_pseudo_labels(batch_size):
    arm = make_strategy("ceal-no-pseudo", batch_size=batch_size)
    ceal = make_strategy("ceal", batch_size=batch_size)
    assert arm.name == "ceal-no-pseudo" and arm.needs_scores and arm.score_name == "variance"
    for seed in range(4):
        scores, pool = _pool_scores(seed=seed)
        for round in (1, 2, 4):
            full = ceal.select(scores, pool, round, np.random.default_rng(seed * 10 + round))
            bare = arm.select(scores, pool, round, np.random.default_rng(seed * 10 + round))
            _check_selection(bare, pool)
            assert len(full.pseudo_ids) == 20 * round  # CEAL took pseudo-labels on these inputs ...
            assert bare.pseudo_ids == [] and arm.pseudo_wanted(round) == 0  # ... the arm takes none
            assert bare.expert_ids == full.expert_ids
            assert bare.reasons == {i: full.reasons[i] for i in full.expert_ids}  # missed / uncertain / low
            assert len(bare.expert_ids) == (batch_size or 35)
            assert not any(s.startswith("pseudo") for s in bare.shortfalls)


# --- random-pseudo --------------------------------------------------------------------------------
def test_random_pseudo_asks_random_expert_ids_and_takes_ceal_pseudo_count():
    params = CealParams()
    arm, plain = make_strategy("random-pseudo", batch_size=20), make_strategy("random", batch_size=20)
    assert arm.needs_scores and not plain.needs_scores  # its pseudo-labels are the MC pass's masks
    assert arm.score_name is None and arm.name == "random-pseudo"
    for seed in range(3):
        scores, pool = _pool_scores(seed=seed)
        which, counts, _ = ceal_histogram(scores["variance"], params.bins)
        modal = int(np.argmax(counts))
        for round, held in ((1, 0), (2, 0), (3, 40)):
            rng_seed = 100 * seed + round
            base = plain.select({"group": scores["group"]}, pool, round, np.random.default_rng(rng_seed))
            sel = arm.select(scores, pool, round, np.random.default_rng(rng_seed), pseudo_held=held)
            _check_selection(sel, pool)
            assert sel.expert_ids == base.expert_ids  # the expert's images are random's, drawn first
            assert {sel.reasons[i] for i in sel.expert_ids} == {"random"}
            wanted = ceal_pseudo_count(params, round, held)
            assert wanted > 0 and arm.pseudo_wanted(round, held) == wanted
            assert len(sel.pseudo_ids) == wanted and {sel.reasons[i] for i in sel.pseudo_ids} == {"pseudo"}
            assert not set(sel.pseudo_ids) & set(sel.expert_ids)
            # CEAL's rule: the modal bin holds enough here, so every pseudo-label comes from it
            assert counts[modal] > wanted + 20
            assert all(which[pool.index(i)] == modal for i in sel.pseudo_ids)


def test_random_pseudo_respects_the_gate_limit_without_changing_the_expert_batch():
    scores, pool = _pool_scores(seed=5)
    arm = make_strategy("random-pseudo", batch_size=15)
    free = arm.select(scores, pool, 3, np.random.default_rng(7))
    assert len(free.pseudo_ids) == 60
    for limit in (0, 9):
        capped = arm.select(scores, pool, 3, np.random.default_rng(7), pseudo_limit=limit)
        assert len(capped.pseudo_ids) == limit and capped.expert_ids == free.expert_ids
        assert not set(capped.pseudo_ids) & set(capped.expert_ids)


def test_random_pseudo_on_a_small_pool_never_labels_an_image_twice():
    scores, pool = _pool_scores(n=40, seed=2)
    sel = make_strategy("random-pseudo", batch_size=15).select(scores, pool, 3, np.random.default_rng(0))
    _check_selection(sel, pool)
    assert len(sel.expert_ids) == 15 and len(sel.pseudo_ids) == 25  # wanted 60: the rest of the pool
    assert any("pseudo: pool exhausted" in s for s in sel.shortfalls)


# --- fg-random ------------------------------------------------------------------------------------
def _split(sel, scores, pool):
    fg = [i for i in sel.expert_ids if sel.reasons[i] == "random-fg"]
    rest = [i for i in sel.expert_ids if sel.reasons[i] == "random"]
    assert sorted(fg + rest) == sorted(sel.expert_ids)
    return fg, rest


@pytest.mark.parametrize("batch_size,fraction", [(12, 1 / 3), (35, 1 / 3), (10, 0.5), (7, 1.0)])
def test_fg_random_takes_its_fraction_from_predicted_foreground_and_the_rest_from_the_pool(batch_size, fraction):
    strat = ForegroundRandomStrategy(batch_size, fraction)
    assert strat.needs_scores and strat.score_name is None and strat.pseudo_wanted(3) == 0
    rest_has_fg = rest_has_bg = False
    for seed in range(5):
        scores, pool = _pool_scores(n=300, seed=seed)
        has_fg = scores["foreground"] > 0
        sel = strat.select(scores, pool, 3, np.random.default_rng(seed))
        _check_selection(sel, pool)
        assert len(sel.expert_ids) == batch_size and sel.pseudo_ids == [] and sel.shortfalls == []
        fg, rest = _split(sel, scores, pool)
        assert len(fg) == round(fraction * batch_size)
        assert all(has_fg[pool.index(i)] for i in fg)
        rest_has_fg |= any(has_fg[pool.index(i)] for i in rest)
        rest_has_bg |= any(not has_fg[pool.index(i)] for i in rest)
        again = strat.select(scores, pool, 3, np.random.default_rng(seed))
        assert again.expert_ids == sel.expert_ids  # pure: same inputs and seed, same ids
    if fraction < 1:  # the rest is drawn from the whole remaining pool, foreground or not
        assert rest_has_fg and rest_has_bg


def test_fg_random_fills_at_random_and_notes_when_too_few_images_have_foreground():
    scores, pool = _pool_scores(n=200, seed=1, fg_share=0.0)
    scores["foreground"][[3, 50]] = 17  # two images with predicted foreground; a third of 12 wants 4
    sel = make_strategy("fg-random", batch_size=12).select(scores, pool, 1, np.random.default_rng(0))
    _check_selection(sel, pool)
    fg, rest = _split(sel, scores, pool)
    assert sorted(fg) == ["p3", "p50"] and len(rest) == 10 and len(sel.expert_ids) == 12
    assert any("2 pool images have predicted foreground, wanted 4" in s for s in sel.shortfalls)
    # a model predicting nothing anywhere: plain random over the pool, with the note
    scores["foreground"][:] = 0
    none = make_strategy("fg-random", batch_size=12).select(scores, pool, 1, np.random.default_rng(0))
    assert len(none.expert_ids) == 12 and {none.reasons[i] for i in none.expert_ids} == {"random"}
    assert any("0 pool images have predicted foreground" in s for s in none.shortfalls)


def test_fg_random_on_a_pool_smaller_than_the_batch_takes_the_pool():
    scores, pool = _pool_scores(n=9, seed=3, fg_share=0.5)
    sel = make_strategy("fg-random", batch_size=12).select(scores, pool, 1, np.random.default_rng(0))
    assert sorted(sel.expert_ids) == sorted(pool) and sel.pseudo_ids == []
    assert any("pool holds 9, wanted 12" in s for s in sel.shortfalls)


def test_fg_fraction_outside_zero_to_one_is_refused():
    for bad in (-0.1, 1.5):
        with pytest.raises(AlsegError, match="fg_fraction"):
            ForegroundRandomStrategy(10, bad)


# --- the registry and the rule any strategy is given ----------------------------------------------
def test_the_three_arms_are_registered_with_help_colour_and_reasons():
    known = strategy_names()
    scores, pool = _pool_scores(n=200, seed=4)
    for name in ARMS:
        assert name in known
        spec = strategy_spec(name)
        assert spec.help and spec.colour.startswith("#") and not spec.needs_features
        strat = make_strategy(name, batch_size=10)
        assert strat.name == name
        sel = strat.select(scores, pool, 2, np.random.default_rng(1))
        # every reason it records has its own label, not the top-k fallback
        assert all(reason_kind(r) == r and reason_label(r) for r in sel.reasons.values())
    assert reason_label("random-fg") == "random, predicted foreground" and reason_label("random") == "random"
    # the arms sit beside the existing strategies, whose colours they do not take
    colours = [strategy_spec(n).colour for n in known]
    assert len(set(colours)) == len(colours)


def test_any_strategy_can_be_given_ceal_pseudo_labels_or_none():
    params = CealParams()
    scores, pool = _pool_scores(n=400, seed=6)
    scores["features"] = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    scores["labelled_features"] = scores["features"][:0]
    top = TopKStrategy("variance", 10)
    top_pseudo = TopKStrategy("variance", 10, pseudo=CealPseudo(params))
    a = top.select(scores, pool, 2, np.random.default_rng(0))
    b = top_pseudo.select(scores, pool, 2, np.random.default_rng(0))
    assert a.pseudo_ids == [] and b.expert_ids == a.expert_ids and len(b.pseudo_ids) == 40
    assert top_pseudo.pseudo_wanted(2) == 40 and not set(b.pseudo_ids) & set(b.expert_ids)
    diverse = DiverseStrategy(params, 10)
    bare = DiverseStrategy(params, 10, pseudo=NO_PSEUDO)
    d = diverse.select(scores, pool, 2, np.random.default_rng(0))
    e = bare.select(scores, pool, 2, np.random.default_rng(0))
    assert len(d.pseudo_ids) == 40 and e.pseudo_ids == [] and e.expert_ids == d.expert_ids
    assert bare.pseudo_wanted(2) == 0
