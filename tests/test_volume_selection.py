"""Selection across volumes (alseg.active.volumes): the cap per volume, whole-volume selection
(mean and top-3 volume scores, random volumes), ungrouped data unchanged, bad settings refused,
and a tiny LGG run whose recorded batches follow the rule."""
import math

import numpy as np
import pytest

from alseg.active.loop import run_active
from alseg.active.strategies import REASONS, make_strategy, reason_label
from alseg.active.volumes import (apply_volume_rules, check_volume_rules, volume_cap, volume_scores)
from alseg.config import build_config
from alseg.data import load_cached, open_dataset
from alseg.errors import AlsegError
from alseg.store import RunStore
from conftest import LGG, UNGATED, run_cli


def _volumes(n_volumes=8, per=(3, 12), seed=0):
    """Pool ids and groups of volumes of random sizes, and one random score per slice."""
    rng = np.random.default_rng(seed)
    pool, groups = [], []
    for v in range(n_volumes):
        for s in range(int(rng.integers(*per))):
            pool.append(f"v{v}_{s}")
            groups.append(f"v{v}")
    return pool, groups, rng.random(len(pool))


def _count(ids, group_of):
    out = {}
    for i in ids:
        out[group_of[i]] = out.get(group_of[i], 0) + 1
    return out


def _capped_top_k(pool, groups, values, k, cap):
    """Reference: walk the pool from the highest score down, skipping volumes that are full."""
    taken, count = [], {}
    for j in np.argsort(-values, kind="stable"):
        if len(taken) < k and count.get(groups[j], 0) < cap:
            taken.append(pool[j])
            count[groups[j]] = count.get(groups[j], 0) + 1
    return taken


@pytest.mark.parametrize("seed", range(5))
def test_the_cap_replaces_top_k_slices_by_the_next_best_of_other_volumes(seed):
    pool, groups, values = _volumes(seed=seed)
    top = make_strategy("uncertainty", batch_size=12).select({"variance": values}, pool, 1, np.random.default_rng(0))
    assert max(_count(top.expert_ids, dict(zip(pool, groups))).values()) > 2  # the cap has work to do
    choice = apply_volume_rules(top.expert_ids, top.reasons, pool, groups, values, np.random.default_rng(0), cap=2)
    assert sorted(choice.expert_ids) == sorted(_capped_top_k(pool, groups, values, 12, 2))
    assert choice.reasons == {i: "top variance" for i in choice.expert_ids} and choice.notes == []


def test_a_capped_replacement_stands_in_for_the_slice_it_replaces():
    """CEAL's regions are kept: a dropped low-score ("missed") slice is replaced by the free slice
    nearest to it in score, with its reason, not by the most uncertain one."""
    pool = ["a0", "a1", "a2", "b0", "b1", "c0", "c1"]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    values = np.array([0.10, 0.11, 0.95, 0.13, 0.90, 0.50, 0.99])
    reasons = {"a0": "missed", "a1": "missed", "a2": "uncertain"}
    choice = apply_volume_rules(["a0", "a1", "a2"], reasons, pool, groups, values, np.random.default_rng(0), cap=1)
    # a keeps its best slice (a2); the dropped ones pick, the best-scored first, the nearest free score
    # from a volume under the cap (a1 0.11 -> b0 0.13, then a0 0.10 -> c0 0.50, b being full), each in
    # the place of the slice it stands in for
    assert choice.expert_ids == ["c0", "b0", "a2"]
    assert choice.reasons == {"b0": "missed", "c0": "missed", "a2": "uncertain"}


def test_the_cap_with_random_keeps_random_slices_and_never_takes_excluded_ones():
    pool, groups, _ = _volumes(n_volumes=5, per=(6, 10), seed=3)
    group_of = dict(zip(pool, groups))
    pseudo = pool[1::4]
    for seed in range(5):
        sel = make_strategy("random", batch_size=15).select({"group": np.array(groups, object)}, pool, 1,
                                                            np.random.default_rng(seed))
        choice = apply_volume_rules(sel.expert_ids, sel.reasons, pool, groups, None, np.random.default_rng(seed),
                                    cap=3, exclude=pseudo)
        assert len(choice.expert_ids) == len(set(choice.expert_ids)) == 15
        assert max(_count(choice.expert_ids, group_of).values()) <= 3
        assert set(choice.expert_ids) <= set(pool) and not set(choice.expert_ids) & set(pseudo) - set(sel.expert_ids)
        assert set(choice.reasons.values()) == {"random"}


def test_a_cap_that_leaves_too_few_slices_says_so():
    pool, groups = ["a0", "a1", "a2", "b0"], ["a", "a", "a", "b"]
    values = np.array([0.9, 0.8, 0.7, 0.1])
    choice = apply_volume_rules(["a0", "a1", "a2"], {}, pool, groups, values, np.random.default_rng(0), cap=1)
    assert choice.expert_ids == ["a0", "b0"]
    assert choice.notes == ["volumes: at most 1 slices a volume leaves 2 of 3 slices"]


@pytest.mark.parametrize("how", ["mean", "top3"])
def test_volumes_mode_takes_the_best_slices_of_the_top_ranked_volumes(how):
    pool, groups, values = _volumes(n_volumes=10, per=(2, 9), seed=7)
    group_of = dict(zip(pool, groups))
    pseudo = set(pool[::5])
    per_volume = {}
    for g, x in zip(groups, values):
        per_volume.setdefault(g, []).append(x)
    score = {g: float(np.mean(sorted(xs)[::-1][:3] if how == "top3" else xs)) for g, xs in per_volume.items()}
    assert volume_scores(pool, groups, values, how) == pytest.approx(score)
    ranked = sorted(score, key=lambda g: -score[g])
    cap = 3
    top = make_strategy("uncertainty", batch_size=10).select({"variance": values}, pool, 1, np.random.default_rng(0))
    choice = apply_volume_rules(top.expert_ids, top.reasons, pool, groups, values, np.random.default_rng(0),
                                mode="volumes", how=how, cap=cap, exclude=sorted(pseudo))
    expected = []
    for g in ranked:  # each volume in rank order gives its best free slices, up to the cap
        free = sorted((j for j, h in enumerate(groups) if h == g and pool[j] not in pseudo), key=lambda j: -values[j])
        expected += [pool[j] for j in free[: min(cap, 10 - len(expected))]]
        if len(expected) == 10:
            break
    assert sorted(choice.expert_ids) == sorted(expected)
    order = [group_of[i] for i in choice.expert_ids]  # listed volume by volume, in rank order
    assert order == sorted(order, key=ranked.index)
    assert set(choice.reasons.values()) == {"volume"} and reason_label("volume") == REASONS["volume"].label


def test_mean_and_top3_rank_volumes_differently():
    """A with three very uncertain slices among many certain ones; B uniformly middling."""
    pool = [f"a{i}" for i in range(8)] + [f"b{i}" for i in range(4)]
    groups = ["a"] * 8 + ["b"] * 4
    values = np.array([0.9, 0.9, 0.9, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5])
    assert volume_scores(pool, groups, values, "mean") == pytest.approx({"a": 0.3375, "b": 0.5})
    assert volume_scores(pool, groups, values, "top3") == pytest.approx({"a": 0.9, "b": 0.5})
    picked = {how: apply_volume_rules(pool[:2], {}, pool, groups, values, np.random.default_rng(0), mode="volumes",
                                      how=how, cap=2).expert_ids for how in ("mean", "top3")}
    assert picked == {"mean": ["b0", "b1"], "top3": ["a0", "a1"]}


def test_volumes_mode_default_cap_is_a_third_of_the_batch():
    assert volume_cap("volumes", None, 35) == 12 and volume_cap("volumes", None, 2) == 1
    assert volume_cap("slices", None, 35) is None and volume_cap("slices", 4, 35) == 4
    pool, groups, values = _volumes(n_volumes=6, per=(15, 20), seed=1)
    choice = apply_volume_rules(pool[:9], {}, pool, groups, values, np.random.default_rng(0), mode="volumes")
    counts = _count(choice.expert_ids, dict(zip(pool, groups)))
    assert len(choice.expert_ids) == 9 and sorted(counts.values()) == [3, 3, 3]


def test_random_volumes_are_random_volumes_with_random_slices():
    pool, groups, _ = _volumes(n_volumes=12, per=(5, 9), seed=2)
    group_of = dict(zip(pool, groups))
    picks = []
    for seed in range(8):
        sel = make_strategy("random", batch_size=8).select({"group": np.array(groups, object)}, pool, 1,
                                                           np.random.default_rng(seed))
        choice = apply_volume_rules(sel.expert_ids, sel.reasons, pool, groups, None, np.random.default_rng(seed),
                                    mode="volumes", cap=4)
        again = apply_volume_rules(sel.expert_ids, sel.reasons, pool, groups, None, np.random.default_rng(seed),
                                   mode="volumes", cap=4)
        assert choice.expert_ids == again.expert_ids  # seeded
        counts = _count(choice.expert_ids, group_of)
        assert len(choice.expert_ids) == 8 and sorted(counts.values()) == [4, 4]
        assert set(choice.reasons.values()) == {"random volume"}
        picks.append(tuple(choice.expert_ids))
    volumes = {frozenset(group_of[i] for i in p) for p in picks}
    assert len(volumes) > 4  # different seeds, different volumes (12 choose 2 = 66 pairs)
    slices = {p for p in picks}
    assert len(slices) == len(picks)


@pytest.mark.parametrize("strategy", ["ceal", "uncertainty", "random", "bald"])
def test_ungrouped_data_and_the_defaults_change_nothing(strategy):
    values = np.random.default_rng(4).gamma(2, 1, 300)
    pool = [f"s{i}" for i in range(300)]
    scores = {"variance": values, "entropy": values[::-1].copy(), "bald": values % 1}
    sel = make_strategy(strategy, batch_size=20).select(scores, pool, 2, np.random.default_rng(0))
    strat = make_strategy(strategy, batch_size=20)
    values_of = scores.get(strat.score_name) if strat.score_name else None
    ungrouped = [None] * 300
    grouped = [f"g{i // 10}" for i in range(300)]
    cases = [(ungrouped, "slices", None), (ungrouped, "volumes", 2), (ungrouped, "slices", 1), (grouped, "slices", None)]
    for groups, mode, cap in cases:
        choice = apply_volume_rules(sel.expert_ids, sel.reasons, pool, groups, values_of, np.random.default_rng(0),
                                    mode=mode, cap=cap, exclude=sel.pseudo_ids)
        assert choice.expert_ids == sel.expert_ids
        assert choice.reasons == {i: sel.reasons[i] for i in sel.expert_ids}
        assert choice.notes == (["volume selection: the images have no volumes (groups); chosen by slice"]
                                if mode == "volumes" else [])


def test_the_cap_keeps_ceal_expert_slices_apart_from_its_pseudo_labels():
    pool, groups, _ = _volumes(n_volumes=6, per=(60, 90), seed=5)
    values = np.random.default_rng(5).gamma(3, 1, len(pool))
    sel = make_strategy("ceal").select({"variance": values}, pool, 2, np.random.default_rng(0))
    assert len(sel.pseudo_ids) == 40
    for mode, cap in (("slices", 4), ("volumes", None)):
        choice = apply_volume_rules(sel.expert_ids, sel.reasons, pool, groups, values, np.random.default_rng(0),
                                    mode=mode, cap=cap, exclude=sel.pseudo_ids)
        assert not set(choice.expert_ids) & set(sel.pseudo_ids)
        # six volumes at most 4 each hold 24 of the 35; at most ceil(35 / 3) = 12 each, all 35
        assert len(choice.expert_ids) == len(set(choice.expert_ids)) == {"slices": 24, "volumes": 35}[mode]
        assert max(_count(choice.expert_ids, dict(zip(pool, groups))).values()) <= (cap or math.ceil(35 / 3))


@pytest.mark.parametrize("mode,how,cap,message", [
    ("patients", "mean", None, "unknown active.volume_selection 'patients'; choose one of slices, volumes"),
    ("volumes", "median", None, "unknown active.volume_score 'median'; choose one of mean, top3"),
    ("slices", "mean", 0, "active.max_per_volume must be a whole number of at least 1 (or unset), got 0"),
    ("volumes", "top3", -2, "active.max_per_volume must be a whole number of at least 1 (or unset), got -2"),
    ("slices", "mean", 1.5, "active.max_per_volume must be a whole number of at least 1 (or unset), got 1.5"),
])
def test_bad_volume_settings_are_refused(mode, how, cap, message):
    with pytest.raises(AlsegError) as err:
        check_volume_rules(mode, how, cap)
    assert err.value.problem == message


def test_a_run_with_bad_volume_settings_stops_before_it_starts(tmp_path):
    cfg = build_config("quick-lgg", overrides={"data": {"path": str(LGG), "size": 32},
                                               "active": {"volume_selection": "volumes", "max_per_volume": 0}})
    with pytest.raises(AlsegError, match="max_per_volume must be a whole number"):
        run_active(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("active:\n  volume_selection: patients\n")
    proc = run_cli("run", "--preset", "quick-lgg", "--data", LGG, "--out", tmp_path / "cli", "--config", bad,
                   check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown active.volume_selection 'patients'" in proc.stderr
    proc = run_cli("run", "--preset", "quick-lgg", "--data", LGG, "--out", tmp_path / "flag", "--volume-selection",
                   "volumes", "--max-per-volume", "0", check=False)
    assert proc.returncode == 2 and "max_per_volume must be a whole number" in proc.stderr
    assert not (tmp_path / "flag").exists()


def test_init_takes_the_volume_rules_for_every_round(lgg_nifti, tmp_path):
    import yaml

    proc = run_cli("init", tmp_path / "p", "--images", lgg_nifti["flat"], "--no-pretrain", "--size", "32",
                   "--volume-selection", "volumes", "--volume-score", "top3", "--max-per-volume", "3",
                   "--volume-axis", "y")
    assert "quick-lgg-volume" in proc.stdout
    active = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["active"]
    assert (active["volume_selection"], active["volume_score"], active["max_per_volume"]) == ("volumes", "top3", 3)
    data = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["data"]
    assert data["volume_axis"] == "y"
    from alseg.data.sources import open_recorded_dataset
    from alseg.store import RunStore

    with RunStore.open_readonly(tmp_path / "p") as store:
        info, ids = store.data_info(), store.sample_ids()
    assert info["volume_axis"] == 1 and all("/y" in i for i in ids)
    assert set(open_recorded_dataset(info).ids) == set(ids)  # reopened along the recorded axis


def test_a_run_in_volumes_mode_asks_for_the_best_slices_of_the_top_volumes(tmp_path):
    """CEAL (pseudo-label gate off) in volumes mode on LGG patients, 2 rounds of 6 expert slices,
    at most 2 a patient: each round's recorded batch is what the rule gives from the round's
    recorded scores, and the pseudo-labels stay CEAL's."""
    import yaml

    ungated = yaml.safe_load(UNGATED.read_text())["active"]
    cfg = build_config("quick-lgg", overrides={
        "data": {"path": str(LGG), "size": 32}, "model": {"width": 4}, "train": {"epochs": 1},
        "active": {"rounds": 2, "round_epochs": 1, "mc_passes": 3, "batch_size": 6, "volume_selection": "volumes",
                   "max_per_volume": 2, **ungated}})
    run_active(cfg, tmp_path / "run")
    with RunStore.open_readonly(tmp_path / "run") as store:
        data = load_cached(open_dataset(LGG), 32)
        group_of = dict(zip(data.ids, data.groups))
        for round in (1, 2):
            expert, pseudo = store.selection(round, "expert"), store.selection(round, "pseudo")
            scores = store.scores(round)  # every pool slice's scores as the round saw them
            assert len(expert) == 6 and len(pseudo) == 20 * round and not set(expert) & set(pseudo)
            assert max(_count(expert, group_of).values()) <= 2
            per_patient = {}
            for i, s in scores.items():
                per_patient.setdefault(group_of[i], []).append(s["variance"])
            ranked = sorted(per_patient, key=lambda g: -np.mean(per_patient[g]))
            wanted = []
            for g in ranked:
                free = sorted((i for i in scores if group_of[i] == g and i not in pseudo),
                              key=lambda i: -scores[i]["variance"])
                wanted += free[: min(2, 6 - len(wanted))]
                if len(wanted) == 6:
                    break
            assert sorted(expert) == sorted(wanted)
            patients = [group_of[i] for i in expert]
            assert patients == sorted(patients, key=ranked.index)  # volume by volume, best first
            reasons = store.selection_reasons(round)
            assert {reasons[i] for i in expert} == {"volume"} and {reasons[i] for i in pseudo} == {"pseudo"}
