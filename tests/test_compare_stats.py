"""The comparison's statistics on hand-made numbers, and one tiny comparison on real LGG data."""
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alseg.compare import _remove_unfinished, _take_reference, _write_summary, compare, merge, summarise
from alseg.progress import SILENT
from alseg.stats import aulc, bootstrap_interval, labels_to_reach, paired_differences, seed_summary
from alseg.errors import AlsegError
from alseg.rundir import RunDir
from alseg.store import RunStore
from conftest import LGG


# --- bootstrap_interval -------------------------------------------------------------------------------

def test_one_seed_interval_is_the_value():
    assert bootstrap_interval([0.731]) == (0.731, 0.731)
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_interval([]) is None


def test_interval_contains_the_mean_and_stays_within_the_values():
    values = [0.61, 0.70, 0.64, 0.58, 0.73]
    lo, hi = bootstrap_interval(values)
    assert min(values) <= lo < np.mean(values) < hi <= max(values)


def test_two_seeds_give_their_range():
    # resampled means of two values are a, (a+b)/2 or b with probabilities 1/4, 1/2, 1/4:
    # the 2.5 % and 97.5 % quantiles are the two values themselves
    assert bootstrap_interval([0.4, 0.6]) == pytest.approx((0.4, 0.6))


def test_interval_shrinks_with_more_agreeing_seeds():
    few = bootstrap_interval([0.5, 0.7, 0.6, 0.6])
    many = bootstrap_interval([0.5, 0.7] + [0.6] * 18)
    assert few[0] < many[0] < 0.6 < many[1] < few[1]


def test_interval_is_reproducible_and_follows_the_level_and_seed():
    values = [0.2, 0.9, 0.4, 0.55, 0.7, 0.35]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    wide, narrow = bootstrap_interval(values, level=0.95), bootstrap_interval(values, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    other = bootstrap_interval(values, seed=1)
    assert other != bootstrap_interval(values) and other == pytest.approx(bootstrap_interval(values), abs=0.05)
    with pytest.raises(ValueError):
        bootstrap_interval([0.1, float("nan")])


# --- aulc and labels_to_reach ------------------------------------------------------------------------

def test_aulc_of_a_constant_curve_is_the_constant():
    assert aulc([86, 121, 156, 191], [0.6] * 4) == pytest.approx(0.6)
    assert aulc([10], [0.42]) == 0.42


def test_aulc_is_the_mean_dice_over_the_label_range():
    # a straight line from 0.2 to 0.6 averages 0.4; uneven spacing weighs each segment by its width
    assert aulc([0, 100], [0.2, 0.6]) == pytest.approx(0.4)
    # segments: 10 labels at mean 0.5, 30 labels at mean 0.8 -> (5 + 24) / 40
    assert aulc([0, 10, 40], [0.4, 0.6, 1.0]) == pytest.approx(29 / 40)
    with pytest.raises(ValueError):
        aulc([0, 20, 10], [0.1, 0.2, 0.3])


def test_labels_to_reach_first_round_and_interpolated():
    x, y = [86, 121, 156, 191], [0.50, 0.60, 0.70, 0.65]
    assert labels_to_reach(x, y, 0.68) == 156  # first round at or above
    # between (121, 0.60) and (156, 0.70): 0.68 is 80 % of the way
    assert labels_to_reach(x, y, 0.68, interpolate=True) == pytest.approx(121 + 0.8 * 35)
    assert labels_to_reach(x, y, 0.70, interpolate=True) == pytest.approx(156)
    assert labels_to_reach(x, y, 0.45, interpolate=True) == 86  # the initial model already reaches it
    assert labels_to_reach(x, y, 0.71, interpolate=True) is None
    # only the first crossing counts
    assert labels_to_reach([0, 10, 20, 30], [0.5, 0.8, 0.4, 0.9], 0.7, interpolate=True) == pytest.approx(10 * 2 / 3)


def test_seed_summary_is_null_when_a_seed_misses():
    s = seed_summary([100.0, None, 120.0])
    assert s["mean"] is None and s["lo"] is None and s["missing"] == 1 and s["per_seed"] == [100.0, None, 120.0]
    s = seed_summary([100.0, 140.0])
    assert s["mean"] == 120.0 and s["lo"] <= 120.0 <= s["hi"]


# --- paired differences ------------------------------------------------------------------------------

def test_paired_differences_sign_and_zero_exclusion():
    base = [0.60, 0.55, 0.70, 0.65, 0.58]
    better = [b + d for b, d in zip(base, [0.05, 0.03, 0.04, 0.06, 0.02])]
    d = paired_differences(better, base)
    assert d["per_seed"] == pytest.approx([0.05, 0.03, 0.04, 0.06, 0.02])
    assert d["mean"] == pytest.approx(0.04) and 0 < d["lo"] <= 0.04 <= d["hi"] and d["excludes_zero"] is True
    worse = paired_differences(base, better)
    assert worse["mean"] == pytest.approx(-0.04) and worse["hi"] < 0 and worse["excludes_zero"] is True
    mixed = paired_differences([b + d for b, d in zip(base, [0.05, -0.04, 0.02, -0.03, 0.01])], base)
    assert mixed["lo"] < 0 < mixed["hi"] and mixed["excludes_zero"] is False


def test_paired_differences_pair_by_seed_not_by_pooling():
    # the seeds differ far more than the strategies, but within each seed the strategy is always better
    base = [0.2, 0.5, 0.8]
    d = paired_differences([0.21, 0.51, 0.81], base)
    assert d["excludes_zero"] is True
    assert bootstrap_interval([0.21, 0.51, 0.81])[0] < np.mean(base)  # unpaired intervals would overlap


def test_paired_differences_without_an_interval():
    one = paired_differences([0.7], [0.6])
    assert one["mean"] == pytest.approx(0.1) and one["lo"] == one["hi"] == one["mean"]
    assert one["excludes_zero"] is None  # one seed: nothing to judge
    missing = paired_differences([120.0, None], [150.0, 160.0])
    assert missing["per_seed"] == [-30.0, None] and missing["mean"] is None and missing["excludes_zero"] is None
    with pytest.raises(ValueError):
        paired_differences([0.1, 0.2], [0.1])


def test_summarise_pairs_seeds_and_uses_each_seeds_full_dice():
    def runs(curves):
        return [{"seed": s, "rounds": [{"expert_labelled": x, "test_dice": y} for x, y in zip([10, 20, 30], c)]}
                for s, c in enumerate(curves)]

    results = {"random": runs([[0.5, 0.6, 0.7], [0.3, 0.4, 0.5]]),
               "ceal": runs([[0.5, 0.7, 0.8], [0.3, 0.5, 0.6]])}
    full = {0: {"test_dice": 0.8}, 1: {"test_dice": 0.6}}  # targets 0.76 and 0.57
    out = summarise(results, full, train_size=40)
    ceal, rand = out["strategies"]["ceal"], out["strategies"]["random"]
    assert ceal["aulc_per_seed"] == pytest.approx([0.675, 0.475]) and rand["aulc_per_seed"] == pytest.approx([0.6, 0.4])
    assert ceal["labels_to_95pct_full_per_seed"] == pytest.approx([26.0, 27.0])
    assert rand["labels_to_95pct_full_per_seed"] == [None, None] and rand["labels_to_95pct_full"] is None
    assert rand["labels_to_95pct_full_not_reached"] == [0, 1]
    assert ceal["curve"]["lo"] == pytest.approx([0.3, 0.5, 0.6])
    assert ceal["curve"]["hi"] == pytest.approx([0.5, 0.7, 0.8])
    vs = ceal["vs_random"]
    assert vs["aulc"]["per_seed"] == pytest.approx([0.075, 0.075]) and vs["aulc"]["excludes_zero"] is True
    assert vs["final_dice"]["mean"] == pytest.approx(0.1)
    assert vs["labels_to_95pct_full"]["mean"] is None and vs["labels_to_95pct_full"]["missing"] == 2
    assert "vs_random" not in rand and out["full_dice"] == pytest.approx(0.7)
    assert set(out["runs"]) == {"random-s0", "random-s1", "ceal-s0", "ceal-s1", "full-s0", "full-s1"}


# --- merging studies made apart ------------------------------------------------------------------------

def _study(folder: Path, seeds: list[int], settings: dict, cut: dict[int, int] | None = None) -> Path:
    """A study's files as compare writes them, for ``seeds`` of a fixed hand-made set of curves
    (seed k's curves cut to ``cut[k]`` rounds, as in a study still running)."""
    cut = cut or {}
    curves = {"random": {0: [0.5, 0.6, 0.7], 1: [0.3, 0.4, 0.5], 2: [0.4, 0.4, 0.6], 3: [0.5, 0.5, 0.5]},
              "ceal": {0: [0.5, 0.7, 0.8], 1: [0.3, 0.5, 0.6], 2: [0.4, 0.45, 0.55], 3: [0.5, 0.6, 0.7]}}
    results = {name: [{"seed": k, "train_size": 37 + 2 * k, "rounds": [{"expert_labelled": x, "test_dice": y}
                                                                   for x, y in zip([10, 20, 30], by_seed[k][:cut.get(k)])]}
                      for k in seeds] for name, by_seed in curves.items()}
    full = {k: {"test_dice": 0.6 + 0.05 * k} for k in seeds}
    sizes = [37 + 2 * k for k in seeds]  # each seed's split has its own size; compare takes the mean
    _write_summary(folder, summarise(results, full, round(sum(sizes) / len(sizes))), preset="quick-lgg", split_preset="lgg", seed_list=seeds,
                   external=None, settings=settings)
    return folder / "compare.json"


def test_merge_of_studies_made_apart_is_the_whole_study(tmp_path):
    settings = {"model.width": 16, "train.lr": 0.001}
    whole = json.loads(_study(tmp_path / "whole", [0, 1, 2, 3], settings).read_text())
    a, b = _study(tmp_path / "a", [0, 2], settings), _study(tmp_path / "b", [1, 3], settings)
    merged = merge([a, b.parent, a], tmp_path / "merged")  # a folder holding compare.json; a study twice is one
    assert merged["seed_list"] == [0, 1, 2, 3] and merged["seeds"] == 4 and merged["train_size"] == 40
    assert merged["strategies"]["ceal"]["vs_random"]["seeds"] == [0, 1, 2, 3]
    for key in ("strategies", "full", "full_dice", "train_size", "settings", "preset"):
        assert merged[key] == whole[key]
    assert json.loads((tmp_path / "merged" / "compare.json").read_text())["runs"] == whole["runs"]
    assert (tmp_path / "merged" / "compare.csv").read_text() == (tmp_path / "whole" / "compare.csv").read_text()
    # a study summarised while seed 1 had 2 rounds: there seed 0's AULC was taken over 2 rounds and
    # seed 1's curve is shorter; both are the runs of the finished study, which merge keeps
    early = _study(tmp_path / "early", [0, 1], settings, cut={1: 2})
    assert json.loads(early.read_text())["runs"]["ceal-s0"]["aulc"] != whole["runs"]["ceal-s0"]["aulc"]
    assert merge([early, tmp_path / "whole"], tmp_path / "m2")["strategies"] == whole["strategies"]


def test_merge_refuses_studies_that_do_not_belong_together(tmp_path):
    a = _study(tmp_path / "a", [0], {"train.lr": 0.001})
    with pytest.raises(AlsegError, match="train.lr = 0.0003, not 0.001"):
        merge([a, _study(tmp_path / "b", [1], {"train.lr": 0.0003})], tmp_path / "m")
    other = json.loads(_study(tmp_path / "c", [0, 1], {"train.lr": 0.001}).read_text())
    other["runs"]["ceal-s0"]["curve"]["test_dice"][1] = 0.9
    (tmp_path / "c" / "compare.json").write_text(json.dumps(other))
    with pytest.raises(AlsegError, match="ceal-s0 is also in an earlier study"):
        merge([a, tmp_path / "c"], tmp_path / "m")
    old = json.loads(a.read_text())
    del old["settings"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(AlsegError, match="earlier alseg"):
        merge([tmp_path / "old.json"], tmp_path / "m")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AlsegError, match="not a comparison summary"):
        merge([a, tmp_path / "bad.json"], tmp_path / "m")
    with pytest.raises(AlsegError, match="no such comparison summary"):
        merge([tmp_path / "missing"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# --- one tiny comparison on real data -----------------------------------------------------------------

def test_compare_reports_intervals_aulc_paired_differences_and_external_dice(tmp_path, monkeypatch):
    from alseg.config import build_config

    cfg = build_config("quick-lgg", None, {
        "data": {"path": str(LGG), "size": 32}, "model": {"width": 4}, "train": {"epochs": 2, "full_epochs": 2},
        "active": {"rounds": 1, "round_epochs": 1, "mc_passes": 3}})
    out = tmp_path / "cmp"
    # a study split over processes: seed 1 alone first (no summary), then the whole study reuses it
    part = compare(cfg, out, strategies=["random", "ceal"], seeds=2, full=True, only_seeds=[1])
    assert part == {"seeds": [1], "runs": ["full-s1", "random-s1", "ceal-s1"]} and not (out / "compare.json").exists()
    with RunStore.open_readonly(out / "runs" / "ceal-s1") as store:
        seed1_rounds = store.rounds()
    with pytest.raises(AlsegError, match="among 0..1"):
        compare(cfg, out, strategies=["random"], seeds=2, only_seeds=[2])
    summary = compare(cfg, out, strategies=["random", "ceal"], seeds=2, full=True, external=LGG)
    with RunStore.open_readonly(out / "runs" / "ceal-s1") as store:
        assert store.rounds() == seed1_rounds  # reused, not trained again (the seconds would differ)
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["seeds"] == 2 and summary["external"] == {"data": str(LGG)}
    assert summary["intervals"]["level"] == 0.95 and summary["intervals"]["resamples"] == 2000
    for name, s in summary["strategies"].items():
        c = s["curve"]
        assert c["n"] == 2 and len(c["x"]) == len(c["lo"]) == len(c["hi"]) == 2
        assert all(lo <= m <= hi for lo, m, hi in zip(c["lo"], c["mean"], c["hi"]))
        runs = [summary["runs"][f"{name}-s{seed}"] for seed in (0, 1)]
        assert s["final_dice"] == pytest.approx(np.mean([r["final_dice"] for r in runs]))
        assert s["final_dice_interval"][0] <= s["final_dice"] <= s["final_dice_interval"][1]
        assert s["aulc"] == pytest.approx(np.mean(s["aulc_per_seed"]))
        assert min(s["aulc_per_seed"]) <= s["aulc"] <= max(s["aulc_per_seed"])
        assert s["aulc_interval"][0] <= s["aulc"] <= s["aulc_interval"][1]
        assert len(s["labels_to_95pct_full_per_seed"]) == 2
        reached = [v is not None for v in s["labels_to_95pct_full_per_seed"]]
        assert (s["labels_to_95pct_full"] is None) == (not all(reached))
        assert s["labels_to_95pct_full_not_reached"] == [seed for seed, ok in zip((0, 1), reached) if not ok]
        assert s["external_dice_per_seed"] == [r["external_dice"] for r in runs]
        assert all(0 <= v <= 1 for v in s["external_dice_per_seed"])
        lo, hi = s["external_dice_interval"]
        assert lo <= s["external_dice"] <= hi
    assert "vs_random" not in summary["strategies"]["random"]
    vs = summary["strategies"]["ceal"]["vs_random"]
    assert vs["seeds"] == [0, 1]
    for key in ("aulc", "final_dice"):
        d = vs[key]
        ceal_v = summary["strategies"]["ceal"][f"{key}_per_seed"]
        rand_v = summary["strategies"]["random"][f"{key}_per_seed"]
        assert d["per_seed"] == pytest.approx([a - b for a, b in zip(ceal_v, rand_v)])
        assert d["lo"] <= d["mean"] <= d["hi"] and d["excludes_zero"] == (d["lo"] > 0 or d["hi"] < 0)
    assert set(vs["labels_to_95pct_full"]) >= {"mean", "lo", "hi", "excludes_zero", "per_seed"}
    assert {"full-s0", "full-s1"} <= set(summary["runs"]) and len(summary["full"]["external_dice"]["per_seed"]) == 2
    with Image.open(out / "compare.png") as im:
        assert im.size[0] >= 600 and np.asarray(im.convert("L"), float).std() > 10
    table = (out / "compare.csv").read_text().splitlines()
    head = table[0].split(",")
    assert len(table) == 3 and {"aulc_mean", "external_dice_mean", "diff_vs_random_aulc_excludes_zero"} <= set(head)
    # the external scores are remembered: a second pass reuses every run and scores nothing again
    cached = json.loads((out / "external.json").read_text())
    assert set(cached["runs"]) == set(summary["runs"])

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(importlib.import_module("alseg.evaluate"), "evaluate", no_scoring)
    assert compare(cfg, out, strategies=["random", "ceal"], seeds=2, full=True, external=LGG) == summary

    # round 0 is trained once per seed (by random, the first strategy) and adopted by ceal, and a
    # ceal run of its own gives the same rounds: adoption changes the time taken, not the result
    import dataclasses

    from alseg.active.loop import adopt_initial_round, run_active, start_run

    for seed in (0, 1):
        with RunStore.open_readonly(out / "runs" / f"ceal-s{seed}") as adopted, \
                RunStore.open_readonly(out / "runs" / f"random-s{seed}") as donor:
            assert adopted.adopted_from(0) == str(out / "runs" / f"random-s{seed}") and donor.adopted_from(0) is None
            first = [[e for e in s.epochs() if e["round"] == 0] for s in (adopted, donor)]
            assert len(first[0]) == cfg.train.epochs and first[0] == first[1]
            assert adopted.rounds()[0] == donor.rounds()[0] and adopted.latest_checkpoint() is not None
    # a later call with another strategy adopts round 0 from the runs already there
    compare(cfg, out, strategies=["uncertainty"], seeds=2, only_seeds=[0])
    with RunStore.open_readonly(out / "runs" / "uncertainty-s0") as store:
        assert store.adopted_from(0) == str(out / "runs" / "random-s0")
    ceal_cfg = dataclasses.replace(cfg, seed=0, active=dataclasses.replace(cfg.active, strategy="ceal"))
    run_active(ceal_cfg, tmp_path / "alone")
    with RunStore.open_readonly(tmp_path / "alone") as own, RunStore.open_readonly(out / "runs" / "ceal-s0") as adopted:
        assert own.adopted_from(0) is None
        assert [r["test_dice"] for r in own.rounds()] == [r["test_dice"] for r in adopted.rounds()]
        assert own.selection(1, "expert") == adopted.selection(1, "expert")
        assert own.selection(1, "pseudo") == adopted.selection(1, "pseudo")
    # a run another process holds is never worked on, nor an unfinished reference it is training
    with RunDir(out / "runs" / "random-s1").lock("another compare"):
        with pytest.raises(AlsegError, match="another compare"):
            compare(cfg, out, strategies=["random"], seeds=2, only_seeds=[1])
    busy = RunDir(out / "runs" / "full-s9")
    busy.root.mkdir()
    with busy.lock("train"):
        with pytest.raises(AlsegError, match="train"):
            _remove_unfinished(busy)
    assert busy.root.is_dir()
    _remove_unfinished(busy)
    assert not busy.root.exists()
    # killed between copying the checkpoints and recording the round: the round is not there, and
    # the next try (compare tries on every call) adopts it
    import os
    import subprocess
    import sys

    killed = start_run(ceal_cfg, tmp_path / "killed")
    code = f"from alseg.active.loop import adopt_initial_round; adopt_initial_round({str(killed.root)!r}, " \
           f"{str(out / 'runs' / 'random-s0')!r})"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ALSEG_FAULT": "adopted-checkpoints@1"})
    assert proc.returncode == -9
    with RunStore.open_readonly(killed) as store:
        assert store.round_status(0) is None and store.epochs() == []
    # the dataset copied again since the donor was made (new file times name another cache folder):
    # the same images, as for a resumed run, so still adopted
    with RunStore(killed) as store:
        store._set("data", {**store.data_info(), "cache": str(tmp_path / "another-cache")})
        # ... and a config stored before a setting existed reads as that setting's default
        stored = store.config()
        del stored["train"]["patch_size"]
        store.set_config(stored)
    assert adopt_initial_round(killed, out / "runs" / "random-s0") is True
    with RunStore.open_readonly(killed) as store, RunStore.open_readonly(out / "runs" / "random-s0") as donor:
        assert store.rounds() == donor.rounds()[:1] and store.latest_checkpoint() == "checkpoints/round-000/best.pt"
    assert sorted(p.name for p in killed.checkpoint_dir().iterdir()) == ["round-000"]
    assert adopt_initial_round(killed, out / "runs" / "random-s0") is False  # once only
    # a summary over a list of seeds (those of a split study that finished) reuses their runs only
    part = compare(cfg, out, strategies=["random", "ceal"], seeds=[1], full=True)
    assert part["seeds"] == 1 and part["seed_list"] == [1] and set(part["runs"]) == {"random-s1", "ceal-s1", "full-s1"}
    for name in ("random", "ceal"):
        assert part["strategies"][name]["aulc_per_seed"] == summary["strategies"][name]["aulc_per_seed"][1:]
    assert part["strategies"]["ceal"]["vs_random"]["seeds"] == [1]
    # two studies made apart, one seed each, merged from their files: the whole study's summary
    seed1 = tmp_path / "seed1.json"
    seed1.write_text((out / "compare.json").read_text())
    compare(cfg, out, strategies=["random", "ceal"], seeds=[0], full=True)
    merged = merge([out / "compare.json", seed1], tmp_path / "merged")
    whole = compare(cfg, out, strategies=["random", "ceal"], seeds=2, full=True)  # reuses every run
    assert merged["seed_list"] == [0, 1] and merged["settings"] == whole["settings"] == summary["settings"]
    assert merged["strategies"] == whole["strategies"] and merged["runs"] == whole["runs"]
    assert merged["full"] == whole["full"] and merged["train_size"] == whole["train_size"]
    assert (tmp_path / "merged" / "compare.png").is_file()
    assert summary["runs"]["ceal-s1"]["curve"]["test_dice"] == [r["test_dice"] for r in seed1_rounds]
    # anything round 0 depends on differs (here the initial epochs): nothing is adopted
    other = start_run(dataclasses.replace(ceal_cfg, train=dataclasses.replace(cfg.train, epochs=1)), tmp_path / "other")
    assert adopt_initial_round(other, out / "runs" / "random-s0") is False
    with RunStore.open_readonly(other) as store:
        assert store.rounds() == [] and store.epochs() == [] and not other.checkpoint_dir(0).exists()
    # a study at equal steps per round takes this study's round 0 and references (they depend on no
    # active setting) instead of training them again; the rounds after take the steps it asks for
    steps_cfg = dataclasses.replace(cfg, active=dataclasses.replace(cfg.active, round_steps=3))
    equal = tmp_path / "equal-steps"
    compare(steps_cfg, equal, strategies=["random"], seeds=2, full=True, only_seeds=[0], reuse_from=out)
    with RunStore.open_readonly(equal / "runs" / "random-s0") as store, \
            RunStore.open_readonly(out / "runs" / "random-s0") as first:
        assert store.adopted_from(0) == str(out / "runs" / "random-s0") and store.rounds()[0] == first.rounds()[0]
        assert store.round_facts()[1]["train_steps"] == 3 != first.round_facts()[1]["train_steps"]
    with RunStore.open_readonly(equal / "runs" / "full-s0") as copied, \
            RunStore.open_readonly(out / "runs" / "full-s0") as reference:
        assert copied.epochs() == reference.epochs() and copied.evaluations() == reference.evaluations()
    assert not (equal / "runs" / "full-s1").exists() and not list(equal.glob(".copying-*"))
    # a reference of other training settings is not taken; a folder with no study is refused
    assert _take_reference(out / "runs" / "full-s1", tmp_path / "x" / "runs" / "full-s1",
                           dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5)), SILENT) is False
    with pytest.raises(AlsegError, match="no study's runs"):
        compare(steps_cfg, equal, strategies=["random"], seeds=2, only_seeds=[0], reuse_from=tmp_path / "nothing")
    # a study whose round 0 cannot be this one's (more initial epochs) trains it once, not once an arm
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.epochs + 1))
    apart = tmp_path / "apart" / "runs"
    compare(longer, tmp_path / "apart", strategies=["random", "ceal"], seeds=2, only_seeds=[0], reuse_from=out)
    with RunStore.open_readonly(apart / "random-s0") as first, RunStore.open_readonly(apart / "ceal-s0") as second:
        assert first.adopted_from(0) is None and second.adopted_from(0) == str(apart / "random-s0")


def test_compare_jobs_makes_the_runs_in_worker_processes_and_round_0_once_per_seed(tmp_path):
    import os

    from alseg.config import build_config

    cfg = build_config("quick-lgg", None, {
        "data": {"path": str(LGG), "size": 32}, "model": {"width": 4}, "train": {"epochs": 2, "full_epochs": 3},
        "active": {"rounds": 1, "round_epochs": 1, "mc_passes": 3}})
    with pytest.raises(AlsegError, match="--jobs must be at least 1"):
        compare(cfg, tmp_path / "none", strategies=["random"], seeds=1, jobs=0)
    # a worker's error stops the study with one line naming the run; nothing else is left running
    held = RunDir(tmp_path / "held" / "runs" / "random-s0")
    held.root.mkdir(parents=True)
    with held.lock("test"):
        with pytest.raises(AlsegError, match=r"random-s0: .*in use by process"):
            compare(cfg, tmp_path / "held", strategies=["random"], seeds=1, jobs=2)

    out = tmp_path / "cmp"
    summary = compare(cfg, out, strategies=["random", "ceal"], seeds=2, full=True, jobs=2)
    runs = out / "runs"
    # each run was made in a worker process of its own, not in this one
    workers = {int((runs / f"full-s{seed}" / "lock").read_text().split()[0]) for seed in (0, 1)}
    assert len(workers) == 2 and os.getpid() not in workers
    rounds = {}
    for seed in (0, 1):
        with RunStore.open_readonly(runs / f"random-s{seed}") as store:
            assert store.adopted_from(0) is None  # the seed's first strategy trained round 0 ...
            rounds[f"random-s{seed}"] = store.rounds()
        with RunStore.open_readonly(runs / f"ceal-s{seed}") as store:
            assert Path(store.adopted_from(0)) == runs / f"random-s{seed}"  # ... the other waited for it and adopted it
            rounds[f"ceal-s{seed}"] = store.rounds()
            assert store.rounds()[0] == rounds[f"random-s{seed}"][0]
    for name in summary["strategies"]:
        assert summary["strategies"][name]["curve"]["n"] == 2
    # the full-supervision reference trains its own epoch count, round 0 the initial one
    with RunStore.open_readonly(runs / "full-s0") as full_store, RunStore.open_readonly(runs / "random-s0") as store:
        assert [e["epoch"] for e in full_store.epochs()] == [1, 2, 3]
        assert [e["epoch"] for e in store.epochs() if e["phase"] == "initial"] == [1, 2]
    assert summary["settings"]["train.full_epochs"] == 3
    # runs of other settings (another option, or a preset changed since) never join the study
    import dataclasses

    longer_full = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, full_epochs=4))
    with pytest.raises(AlsegError, match=r"full-s0: .*made with train.full_epochs = 3, not 4"):
        compare(longer_full, out, strategies=["random", "ceal"], seeds=2, full=True)
    # ... a setting of the references alone: the active runs are still this study's without them
    active_only = compare(longer_full, out, strategies=["random", "ceal"], seeds=2)
    assert active_only["strategies"] == compare(cfg, out, strategies=["random", "ceal"], seeds=2)["strategies"]
    assert "train.full_epochs" not in active_only["settings"]
    # worker processes adopt round 0 from another study too (--reuse-from): the first strategy from
    # the run there that trained it, the other, waiting for it, from its twin here
    steps_cfg = dataclasses.replace(cfg, active=dataclasses.replace(cfg.active, round_steps=2))
    equal = tmp_path / "equal" / "runs"
    compare(steps_cfg, tmp_path / "equal", strategies=["ceal", "random"], seeds=2, full=True, only_seeds=[1], jobs=2,
            reuse_from=out)
    sources = set()
    for name in ("ceal", "random"):
        with RunStore.open_readonly(equal / f"{name}-s1") as store:
            sources.add(Path(store.adopted_from(0)))
            assert store.rounds()[0] == rounds["random-s1"][0] and store.round_facts()[1]["train_steps"] == 2
    assert sources == {runs / "random-s1", equal / "ceal-s1"}
    # a study whose round 0 cannot be the other's (more initial epochs) trains it once, not once an arm
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    apart = tmp_path / "apart" / "runs"
    compare(longer, tmp_path / "apart", strategies=["ceal", "random"], seeds=2, only_seeds=[1], jobs=2, reuse_from=out)
    with RunStore.open_readonly(apart / "ceal-s1") as first, RunStore.open_readonly(apart / "random-s1") as second:
        assert first.adopted_from(0) is None and Path(second.adopted_from(0)) == apart / "ceal-s1"
        assert [e["epoch"] for e in first.epochs() if e["phase"] == "initial"] == [1, 2, 3]


def test_compare_workers_stop_when_the_parent_is_killed_outright(tmp_path):
    """kill -9 of `alseg compare --jobs 2` leaves no worker training on: they notice and exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "alseg", "compare", "--preset", "quick-lgg", "--data", str(LGG),
                             "--size", "32", "--width", "4", "--epochs", "200", "--rounds", "1", "--strategies",
                             "random", "--seeds", "2", "--out", str(tmp_path / "cmp"), "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers = []
    while len(workers) < 2 and time.time() < deadline:  # two workers (and the resource tracker)
        time.sleep(0.5)
        workers = [c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.5)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []


# --- killed studies resume to the uninterrupted study's summary ----------------------------------------
# `alseg compare` in child processes, as a user runs it: LGG at 32 px, width 4, one round, two seeds,
# random only, always with --jobs 2 (each worker then trains with cores / 2 threads, so every study
# below trains its runs with the same thread count as the uninterrupted one: the same floats).

STUDY = ["compare", "--preset", "quick-lgg", "--data", str(LGG), "--size", "32", "--width", "4", "--epochs", "2",
         "--round-epochs", "1", "--rounds", "1", "--mc-passes", "3", "--strategies", "random", "--jobs", "2"]
STUDY_WAIT_S = 600  # a hang guard only: a whole study takes about a minute here


def _study_cmd(out: Path, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "alseg", *STUDY, *extra, "--out", str(out)]


def _study_env(fault: str | None = None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "ALSEG_FAULT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="400")
    if fault:
        env["ALSEG_FAULT"] = fault  # inherited by the spawned workers: each counts its own visits
    return env


def _run_study(out: Path, *extra: str, fault: str | None = None):
    import subprocess

    return subprocess.run(_study_cmd(out, *extra), env=_study_env(fault), capture_output=True, text=True,
                          timeout=STUDY_WAIT_S)


def _run_state(run_dir: Path) -> dict:
    """What a study's run must reproduce after kills and resumes (no wall-clock seconds)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    try:
        return {name: conn.execute(sql).fetchall() for name, sql in {
            "rounds": "SELECT round, status, expert_labelled, pseudo_labelled, pool, test_dice, val_dice "
                      "FROM rounds ORDER BY round",
            "selections": "SELECT round, id, kind, reason FROM selections ORDER BY round, id",
            "masks": "SELECT id, round, sha256 FROM masks ORDER BY id",
            "epochs": "SELECT phase, round, epoch, train_loss, train_dice, val_dice FROM epochs "
                      "ORDER BY phase, round, epoch",
            "evaluations": "SELECT round, split, images, mean_dice, pooled_dice FROM evaluations ORDER BY round, split",
        }.items()}
    finally:
        conn.close()


def _round_statuses(run_dir: Path) -> dict[int, str]:
    """A run's round statuses as another process sees them now ({} before its database has rounds)."""
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
        try:
            return dict(conn.execute("SELECT round, status FROM rounds"))
        finally:
            conn.close()
    except sqlite3.Error:  # not made yet, or being created
        return {}


def _comparable(summary_file: Path) -> dict:
    """A compare.json without the one entry that names its own folder."""
    summary = json.loads(summary_file.read_text())
    assert summary.pop("figure") == str(summary_file.parent / "compare.png")
    return summary


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def uninterrupted_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "whole"
    proc = _run_study(out, "--seeds", "2")
    assert proc.returncode == 0, proc.stderr
    summary = _comparable(out / "compare.json")
    assert summary["seed_list"] == [0, 1] and set(summary["runs"]) == {"random-s0", "random-s1"}
    assert all(len(run["curve"]["test_dice"]) == 2 for run in summary["runs"].values())  # round 0 and round 1
    return out


def test_a_killed_compare_jobs_study_resumes_to_the_uninterrupted_summary(uninterrupted_study, tmp_path):
    """A worker killed (ALSEG_FAULT), then the parent killed outright (SIGKILL) mid-study: the same
    command finishes, with every run's rounds and Dice and the compare.json of an uninterrupted study."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "killed"
    runs = [out / "runs" / f"random-s{seed}" for seed in (0, 1)]
    # 1. each worker SIGKILLs itself after its first training, before round 0 is recorded: one line, exit 2
    first = _run_study(out, "--seeds", "2", fault="trained@1")
    assert first.returncode == 2, first.stderr
    assert re.search(r"random-s[01]: worker exited with code -9", first.stderr), first.stderr
    assert not (out / "compare.json").exists()
    assert all(_round_statuses(r).get(0) != "done" for r in runs)
    # 2. the same command, its parent killed outright once a run has finished round 0 (round 1 is left)
    proc = subprocess.Popen(_study_cmd(out, "--seeds", "2"), env=_study_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + STUDY_WAIT_S  # hang guard
        while not any(_round_statuses(r).get(0) == "done" for r in runs):
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "no run finished round 0"
            time.sleep(0.2)
        workers = [c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    assert workers and not (out / "compare.json").exists()
    assert not all(_round_statuses(r).get(1) == "done" for r in runs)  # killed mid-study, not after it
    deadline = time.monotonic() + 60  # orphaned workers notice within a second or so and exit
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "workers outlived their killed parent"
        time.sleep(0.2)
    # 3. the same command again finishes the study
    last = _run_study(out, "--seeds", "2")
    assert last.returncode == 0, last.stderr
    assert _comparable(out / "compare.json") == _comparable(uninterrupted_study / "compare.json")
    for run_dir in runs:
        assert _run_state(run_dir) == _run_state(uninterrupted_study / "runs" / run_dir.name), run_dir.name


def test_studies_made_apart_one_killed_and_resumed_merge_to_the_whole_study(uninterrupted_study, tmp_path):
    """Seed 0 and seed 1 made apart with --only-seeds (seed 1's worker killed mid-labelling and
    resumed by the same command), each summarised in its own folder, then `alseg merge`d: the
    whole study's summary."""
    import subprocess
    import sys

    a, b = tmp_path / "a", tmp_path / "b"
    made = _run_study(a, "--seeds", "2", "--only-seeds", "0")
    assert made.returncode == 0, made.stderr
    killed = _run_study(b, "--seeds", "2", "--only-seeds", "1", fault="mask-stored@10")
    assert killed.returncode == 2 and "random-s1: worker exited with code -9" in killed.stderr, killed.stderr
    assert _round_statuses(b / "runs" / "random-s1") == {0: "done", 1: "awaiting"}
    resumed = _run_study(b, "--seeds", "2", "--only-seeds", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert not (a / "compare.json").exists() and not (b / "compare.json").exists()  # --only-seeds: no summary
    for folder, seed in ((a, "0,"), (b, "1,")):  # each study summarises its own seed (a list of one)
        summary = _run_study(folder, "--seeds", seed)
        assert summary.returncode == 0, summary.stderr
    merged = subprocess.run([sys.executable, "-m", "alseg", "merge", str(a / "compare.json"), str(b),
                             "--out", str(tmp_path / "merged")], env=_study_env(), capture_output=True, text=True,
                            timeout=STUDY_WAIT_S)
    assert merged.returncode == 0, merged.stderr
    assert _comparable(tmp_path / "merged" / "compare.json") == _comparable(uninterrupted_study / "compare.json")
    assert _run_state(b / "runs" / "random-s1") == _run_state(uninterrupted_study / "runs" / "random-s1")
