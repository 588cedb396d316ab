"""The evidence a comparison gives beyond intervals, on hand-made numbers (pure functions, no runs):
sign-flip p-values, labels counted with validation masks, 98 % of full, Dice at fixed label counts,
the expert's effort as the cost, and whether the full-supervision references had converged."""
import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from alseg.compare import _finished_full, _recorded_run, _write_summary, merge, summarise
from alseg.stats import (EXACT_FLIPS_UP_TO, MONTE_CARLO_FLIPS, convergence, cumulative_pixels_changed,
                         default_fixed_counts, interval_name, paired_differences, sign_flip_method, sign_flip_p)
from alseg.errors import AlsegError
from alseg.store import RunStore


# --- sign_flip_p ----------------------------------------------------------------------------------------

def test_sign_flip_p_hand_computed_cases():
    assert sign_flip_p([0.02, 0.05, 0.01]) == pytest.approx(0.25)  # all + or all -: 2 of 8
    assert sign_flip_p([1.0, -1.0]) == 1.0  # observed mean 0: every assignment is as extreme
    assert sign_flip_p([0.03] * 5) == pytest.approx(2 / 32)
    # sums of ±3 ±1 ±1: 5, 3, 3, 1, -1, -3, -3, -5; |sum| >= 3 in 6 of 8
    assert sign_flip_p([3.0, 1.0, -1.0]) == pytest.approx(6 / 8)
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p([0.4]) == 1.0  # one seed: both signs are as extreme
    with pytest.raises(ValueError):
        sign_flip_p([])
    with pytest.raises(ValueError):
        sign_flip_p([0.1, float("nan")])


def _exact_p(decimals: list[str]) -> Fraction:
    """The sign-flip p in exact rational arithmetic: no float ties to tolerate."""
    d = [Fraction(v) for v in decimals]
    observed = abs(sum(d))
    hits = sum(abs(sum(s * v for s, v in zip(signs, d))) >= observed
               for signs in itertools.product((1, -1), repeat=len(d)))
    return Fraction(hits, 2 ** len(d))


@pytest.mark.parametrize("decimals", [["0.1", "0.2", "-0.3", "0.4"], ["0.7", "0.1", "0.2", "0.3", "0.1"],
                                      ["0.3", "-0.1", "-0.2"], ["0.01", "0.02", "0.03", "-0.06", "0.05", "0.01"]])
def test_sign_flip_p_counts_float_ties_as_ties(decimals):
    # assignments whose sum equals the observed one in exact arithmetic differ from it in floats
    assert sign_flip_p([float(v) for v in decimals]) == pytest.approx(float(_exact_p(decimals)), abs=1e-12)


def test_sign_flip_p_matches_scipys_permutation_test():
    rng = np.random.default_rng(7)
    for n in (2, 4, 7, 10):
        diffs = rng.normal(0.01, 0.03, n)
        ref = stats.permutation_test((diffs,), lambda x, axis: np.abs(np.mean(x, axis=axis)),
                                     permutation_type="samples", alternative="greater", n_resamples=np.inf)
        assert sign_flip_p(diffs) == pytest.approx(ref.pvalue, abs=1e-12), n


def test_above_sixteen_seeds_p_is_a_seeded_monte_carlo_close_to_the_exact_value():
    assert sign_flip_method(EXACT_FLIPS_UP_TO) == "exact" and sign_flip_method(EXACT_FLIPS_UP_TO + 1) == "monte carlo"
    diffs = np.random.default_rng(3).normal(0.004, 0.02, 18)
    mc = sign_flip_p(diffs)
    assert mc == sign_flip_p(diffs)  # seeded: the same differences give the same p
    assert round(mc * (MONTE_CARLO_FLIPS + 1)) == pytest.approx(mc * (MONTE_CARLO_FLIPS + 1))  # (hits + 1) / (M + 1)
    ref = stats.permutation_test((diffs,), lambda x, axis: np.abs(np.mean(x, axis=axis)),
                                 permutation_type="samples", alternative="greater", n_resamples=np.inf)
    assert mc == pytest.approx(ref.pvalue, abs=0.006)  # 4 standard errors of 100,000 flips at p near 0.5
    # all 20 seeds agree: exact p is 2 / 2^20; no random flip reaches it, so p is 1 / (M + 1)
    assert sign_flip_p([0.01] * 20) <= 3 / (MONTE_CARLO_FLIPS + 1)


def test_paired_differences_carry_p_beside_the_interval():
    d = paired_differences([0.62, 0.57, 0.73], [0.60, 0.55, 0.70])
    assert d["excludes_zero"] is True and d["p_value"] == pytest.approx(0.25) and d["p_method"] == "exact"
    ten = paired_differences([0.6 + 0.01 * k for k in range(10)], [0.59 + 0.01 * k for k in range(10)])
    assert ten["p_value"] == pytest.approx(2 / 1024)
    for none in (paired_differences([0.7], [0.6]), paired_differences([0.7, None], [0.6, 0.5])):
        assert none["p_value"] is None and none["p_method"] is None


# --- small pure helpers -------------------------------------------------------------------------------

def test_interval_name_says_what_the_band_is_for_the_number_of_seeds():
    assert interval_name(1) == "no interval (1 seed)"
    assert interval_name(3) == "range of the 3 seeds"
    assert interval_name(5) == "95 % percentile bootstrap interval over 5 seeds"


def test_convergence_follows_the_checkpoint_rule():
    def epochs(val, train=None):
        train = train or [0.1] * len(val)
        return [{"epoch": k + 1, "val_dice": v, "train_dice": t} for k, (v, t) in enumerate(zip(val, train))]

    assert convergence(epochs([0.3, 0.5, 0.4])) == {"best_epoch": 2, "epochs": 3, "still_improving": False}
    assert convergence(epochs([0.3, 0.4, 0.5])) == {"best_epoch": 3, "epochs": 3, "still_improving": True}
    assert convergence(epochs([0.3, 0.5, 0.5]))["best_epoch"] == 2  # a tie keeps the first, as fit does
    # no validation recorded: the training Dice chose the checkpoint
    assert convergence(epochs([None, None], [0.6, 0.2])) == {"best_epoch": 1, "epochs": 2, "still_improving": False}
    assert convergence([]) == {"best_epoch": None, "epochs": None, "still_improving": None}


def test_default_fixed_counts_are_round_one_and_the_last_but_one():
    assert default_fixed_counts([10, 20, 30, 40, 50]) == [20.0, 40.0]
    assert default_fixed_counts([10, 20, 30]) == [20.0]  # round 1 is the last-but-one
    assert default_fixed_counts([10, 20]) == [10.0, 20.0]
    assert default_fixed_counts([10]) == []


def test_cumulative_pixels_changed_from_round_facts():
    rounds = [{"effort": None}, {"effort": {"pixels_changed": 1500}}, {"effort": {"pixels_changed": 500}}]
    assert cumulative_pixels_changed(rounds) == [0, 1500, 2000]
    assert cumulative_pixels_changed([{"effort": {"pixels_changed": 99}}]) == [0]  # round 0: no model to correct
    assert cumulative_pixels_changed([{}, {"effort": {"pixels_changed": 3}}, {}]) is None  # round 2 not recorded


# --- the summary ----------------------------------------------------------------------------------------

X = [10, 20, 30, 40]
DICE = {"random": [[0.50, 0.60, 0.66, 0.72], [0.40, 0.50, 0.56, 0.62], [0.45, 0.52, 0.60, 0.70]],
        "ceal": [[0.50, 0.64, 0.72, 0.78], [0.40, 0.56, 0.60, 0.68], [0.45, 0.55, 0.66, 0.74]]}
CHANGED = {"random": [2_000_000, 1_000_000, 1_000_000], "ceal": [1_000_000, 500_000, 500_000]}  # per round 1..3


def _results(effort: bool = True, val: bool = True) -> dict:
    return {name: [{"seed": s, "train_size": 90, **({"val_size": 10 + s} if val else {}),
                    "rounds": [{"expert_labelled": x, "test_dice": y,
                                "effort": {"pixels_changed": CHANGED[name][s] * k} if effort and k else None}
                               for k, (x, y) in enumerate(zip(X, dice))]}
                   for s, dice in enumerate(curves)] for name, curves in DICE.items()}


FULL = {0: {"test_dice": 0.78, "best_epoch": 12, "epochs": 20}, 1: {"test_dice": 0.70, "best_epoch": 20, "epochs": 20},
        2: {"test_dice": 0.74, "best_epoch": 19, "epochs": 20}}


def test_summary_counts_validation_masks_as_labels():
    out = summarise(_results(), FULL, train_size=90)
    ceal = out["strategies"]["ceal"]
    assert ceal["curve"]["x"] == X  # the curve's axis stays expert labels
    assert ceal["curve"]["labels_with_validation"] == pytest.approx([x + 11 for x in X])  # mean of 10, 11, 12
    assert ceal["final_labels_with_validation"] == pytest.approx(51)
    assert ceal["final_fraction_labelled_per_seed"] == pytest.approx([40 / 90] * 3)
    assert ceal["final_fraction_labelled_with_validation_per_seed"] == pytest.approx([50 / 100, 51 / 101, 52 / 102])
    run = out["runs"]["ceal-s2"]
    assert run["val_size"] == 12 and run["labels_with_validation"] == [22.0, 32.0, 42.0, 52.0]
    without = summarise(_results(val=False), FULL, train_size=90)["strategies"]["ceal"]
    assert without["curve"]["labels_with_validation"] is None and without["final_labels_with_validation"] is None


def test_summary_gives_98pct_of_full_and_dice_at_fixed_counts_with_p_values():
    out = summarise(_results(), FULL, train_size=90)
    ceal, rand = out["strategies"]["ceal"], out["strategies"]["random"]
    # seed 0: 0.98 x 0.78 = 0.7644, between (30, 0.72) and (40, 0.78): 30 + 10 x 0.0444 / 0.06
    assert ceal["labels_to_98pct_full_per_seed"][0] == pytest.approx(30 + 10 * (0.7644 - 0.72) / 0.06)
    # seed 1: 0.98 x 0.70 = 0.686 never reached (0.68 at most); 95 %: 0.665 reached between 30 and 40
    assert ceal["labels_to_98pct_full_per_seed"][1] is None and ceal["labels_to_98pct_full"] is None
    assert ceal["labels_to_98pct_full_not_reached"] == [1]
    assert ceal["labels_to_95pct_full_per_seed"][1] == pytest.approx(30 + 10 * (0.665 - 0.60) / 0.08)
    assert rand["labels_to_98pct_full_not_reached"] == [0, 1, 2]
    # default counts: round 1 (20) and the last-but-one round (30)
    assert out["dice_at_labels_counts"] == [20.0, 30.0]
    at = {d["labels"]: d for d in ceal["dice_at_labels"]}
    assert at[30.0]["per_seed"] == pytest.approx([0.72, 0.60, 0.66]) and at[30.0]["mean"] == pytest.approx(0.66)
    vs = ceal["vs_random"]
    d30 = next(d for d in vs["dice_at_labels"] if d["labels"] == 30.0)
    assert d30["per_seed"] == pytest.approx([0.06, 0.04, 0.06]) and d30["p_value"] == pytest.approx(0.25)
    assert vs["final_dice"]["p_value"] == pytest.approx(0.25) and vs["final_dice"]["p_method"] == "exact"
    assert vs["labels_to_98pct_full"]["mean"] is None and vs["labels_to_98pct_full"]["p_value"] is None
    # counts given: interpolated between rounds, None outside a curve
    given = summarise(_results(), FULL, train_size=90, fixed_counts=[25, 45])
    at = given["strategies"]["ceal"]["dice_at_labels"]
    assert at[0]["per_seed"] == pytest.approx([0.68, 0.58, 0.605]) and at[1]["per_seed"] == [None] * 3
    assert given["runs"]["ceal-s0"]["dice_at_labels"] == pytest.approx([0.68, None])
    assert "given" in given["dice_at_labels_rule"]
    with pytest.raises(AlsegError, match="fixed label counts"):
        summarise(_results(), FULL, train_size=90, fixed_counts=[-5])
    assert "weaker evidence" in out["intervals"]["note"] and out["paired_tests"]["exact_up_to_seeds"] == 16


def test_every_strategy_is_paired_against_both_baselines_when_both_ran(tmp_path):
    results = _results()
    # fg-random: random's curves lowered by 0.01 on seed 0 and 0.03 on seeds 1 and 2
    results["fg-random"] = [{**r, "rounds": [{**v, "test_dice": v["test_dice"] - (0.01 if r["seed"] == 0 else 0.03)}
                                             for v in r["rounds"]]} for r in results["random"]]
    out = summarise(results, FULL, train_size=90)
    assert out["baselines"] == ["random", "fg-random"] and out["baseline"] == "random"
    ceal, rand, fg = (out["strategies"][s] for s in ("ceal", "random", "fg-random"))
    d_rand, d_fg = ceal["vs_random"]["final_dice"], ceal["vs_fg-random"]["final_dice"]
    assert d_fg["per_seed"] == pytest.approx([a + b for a, b in zip(d_rand["per_seed"], [0.01, 0.03, 0.03])])
    assert fg["vs_random"]["final_dice"]["per_seed"] == pytest.approx([-0.01, -0.03, -0.03])
    assert rand["vs_fg-random"]["final_dice"]["mean"] == pytest.approx(0.07 / 3)
    assert "vs_random" not in rand and "vs_fg-random" not in fg
    _write_summary(tmp_path, out, preset="quick-lgg", split_preset="lgg", seed_list=[0, 1, 2], external=None,
                   settings={})
    head, *rows = [line.split(",") for line in (tmp_path / "compare.csv").read_text().splitlines()]
    row = dict(zip(head, rows[[r[0] for r in rows].index("ceal")]))
    assert float(row["diff_vs_fg-random_final_dice_mean"]) == pytest.approx(d_fg["mean"])
    assert row["diff_vs_fg-random_p_method"] == "exact" and row["diff_vs_random_p_method"] == "exact"
    only_fg = summarise({k: v for k, v in results.items() if k != "random"}, FULL, train_size=90)
    assert only_fg["baselines"] == ["fg-random"] and "vs_random" not in only_fg["strategies"]["ceal"]


def test_summary_counts_the_pseudo_labels_each_run_trained_on(tmp_path):
    results = _results()
    for r in results["ceal"]:
        for k, v in enumerate(r["rounds"]):  # seed 0: 0, 5, 10, 15 a round; seed 1: the gate took none
            v["pseudo_labelled"] = 5 * k if r["seed"] != 1 else 0
    for r in results["random"]:
        for v in r["rounds"]:
            v["pseudo_labelled"] = 0
    out = summarise(results, FULL, train_size=90)
    ceal = out["strategies"]["ceal"]
    assert ceal["pseudo_labels_trained_per_seed"] == [30, 0, 30] and ceal["pseudo_labels_trained"] == 20
    assert out["runs"]["ceal-s0"]["curve"]["pseudo_labelled"] == [0, 5, 10, 15]
    assert out["strategies"]["random"]["pseudo_labels_trained"] == 0
    assert summarise(_results(), FULL, train_size=90)["strategies"]["ceal"]["pseudo_labels_trained"] is None
    # a merge of the written summary keeps them
    _write_summary(tmp_path / "s", out, preset="quick-lgg", split_preset="lgg", seed_list=[0, 1, 2], external=None,
                   settings={})
    merged = merge([tmp_path / "s"], tmp_path / "m")
    assert merged["strategies"]["ceal"]["pseudo_labels_trained_per_seed"] == [30, 0, 30]
    head, *rows = [line.split(",") for line in (tmp_path / "m" / "compare.csv").read_text().splitlines()]
    row = dict(zip(head, rows[[r[0] for r in rows].index("ceal")]))
    assert float(row["pseudo_labels_trained_mean"]) == 20 and [float(v) for v in row["pseudo_labels_trained_per_seed"].split()] == [30, 0, 30]


def test_summary_effort_curve_from_round_facts():
    out = summarise(_results(), FULL, train_size=90)
    ceal, rand = out["strategies"]["ceal"], out["strategies"]["random"]
    # ceal seed 0 changed 1, 2 and 3 Mpx in rounds 1..3: cumulative 0, 1, 3, 6
    assert out["runs"]["ceal-s0"]["effort_megapixels"] == pytest.approx([0, 1, 3, 6])
    assert out["runs"]["ceal-s0"]["curve"]["pixels_changed"] == [None, 1_000_000, 2_000_000, 3_000_000]
    assert ceal["effort_curve"]["x_per_seed"][1] == pytest.approx([0, 0.5, 1.5, 3])
    assert ceal["effort_curve"]["x"] == pytest.approx([0, 2 / 3, 2, 4])
    assert ceal["effort_curve"]["mean"] == ceal["curve"]["mean"] and ceal["effort_curve"]["n"] == 3
    assert ceal["final_pixels_changed_per_seed"] == [6_000_000, 3_000_000, 3_000_000]
    assert rand["final_pixels_changed"] == pytest.approx(8_000_000)
    diff = ceal["vs_random"]["final_pixels_changed"]
    assert diff["per_seed"] == [-6_000_000, -3_000_000, -3_000_000] and diff["p_value"] == pytest.approx(0.25)
    # runs without the fact: no effort curve, no error
    none = summarise(_results(effort=False), FULL, train_size=90)
    assert none["strategies"]["ceal"]["effort_curve"] is None
    assert none["strategies"]["ceal"]["final_pixels_changed"] is None
    assert none["strategies"]["ceal"]["vs_random"]["final_pixels_changed"] is None
    assert none["runs"]["ceal-s0"]["effort_megapixels"] is None
    # one seed without it: the strategy has no curve (a mean over the seeds that had it would mislead)
    mixed = _results()
    for r in mixed["ceal"][1]["rounds"]:
        r["effort"] = None
    part = summarise(mixed, FULL, train_size=90)["strategies"]["ceal"]
    assert part["effort_curve"] is None and part["final_pixels_changed_per_seed"] == [6_000_000, None, 3_000_000]
    assert part["final_pixels_changed"] is None


def test_summary_says_which_references_were_still_improving():
    out = summarise(_results(), FULL, train_size=90)
    assert out["full"]["best_epoch_per_seed"] == [12, 20, 19] and out["full"]["epochs"] == 20
    assert out["full"]["still_improving_per_seed"] == [False, True, False]
    assert out["full"]["still_improving_seeds"] == [1]
    assert out["runs"]["full-s1"]["still_improving"] is True and out["runs"]["full-s0"]["best_epoch"] == 12
    unknown = summarise(_results(), {0: {"test_dice": 0.7}}, train_size=90)["full"]  # recorded before epochs were read
    assert unknown["best_epoch_per_seed"] == [None] and unknown["still_improving_seeds"] == []


# --- files: csv, figure, merge and summaries written before ----------------------------------------------

def _write(folder, seeds, results=None, full=None):
    results = results or _results()
    results = {name: [r for r in per_seed if r["seed"] in seeds] for name, per_seed in results.items()}
    full = {s: f for s, f in (full or FULL).items() if s in seeds}
    return _write_summary(folder, summarise(results, full, 90), preset="quick-lgg", split_preset="lgg",
                          seed_list=list(seeds), external=None, settings={"train.lr": 0.001})


def test_csv_and_figure_show_p_values_effort_and_what_the_band_is(tmp_path):
    _write(tmp_path, [0, 1, 2])
    head, *rows = [line.split(",") for line in (tmp_path / "compare.csv").read_text().splitlines()]
    ceal = dict(zip(head, rows[[r[0] for r in rows].index("ceal")]))
    assert head[-1] == "metric"
    assert float(ceal["diff_vs_random_final_dice_p_value"]) == pytest.approx(0.25)
    assert ceal["diff_vs_random_p_method"] == "exact"
    assert float(ceal["dice_at_30_labels_mean"]) == pytest.approx(0.66)
    assert float(ceal["diff_vs_random_dice_at_30_labels_p_value"]) == pytest.approx(0.25)
    assert ceal["labels_to_98pct_full_seeds_not_reached"] == "1"
    assert float(ceal["final_pixels_changed_mean"]) == pytest.approx(4_000_000)
    assert float(ceal["final_labels_with_validation"]) == pytest.approx(51)
    assert ceal["full_still_improving_seeds"] == "1" and ceal["full_best_epoch_per_seed"] == "12 20 19"
    with open(tmp_path / "compare.png", "rb") as f:
        from PIL import Image

        about = json.loads(Image.open(f).info["Description"])
    assert "range of the 3 seeds" in about["title"]
    labels, cost = about["axes"][0], about["axes"][1]
    assert "ceal (mean, band: range of the 3 seeds)" in labels["legend"]
    assert "megapixels" in cost["xlabel"] and cost["lines"]["ceal (mean, band: range of the 3 seeds)"]["points"] == 4
    # five seeds: the band is a bootstrap interval, and no effort recorded: one panel
    five = {name: [{**per_seed[k % 3], "seed": k} for k in range(5)]
            for name, per_seed in _results(effort=False).items()}
    _write(tmp_path / "five", range(5), five, {k: FULL[k % 3] for k in range(5)})
    with open(tmp_path / "five" / "compare.png", "rb") as f:
        about = json.loads(Image.open(f).info["Description"])
    assert "95 % percentile bootstrap interval over 5 seeds" in about["title"] and len(about["axes"]) == 1


def test_merge_keeps_the_new_measures_and_reads_summaries_written_before_them(tmp_path):
    whole = _write(tmp_path / "whole", [0, 1, 2])
    a, b = _write(tmp_path / "a", [0, 2]), _write(tmp_path / "b", [1])
    merged = merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    for key in ("strategies", "full", "runs", "dice_at_labels_counts"):
        assert merged[key] == json.loads(json.dumps(whole[key])), key
    assert a["dice_at_labels_counts"] == b["dice_at_labels_counts"] == [20.0, 30.0]
    given = merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m2", fixed_counts=[25])
    assert given["dice_at_labels_counts"] == [25.0]
    # a compare.json written before validation sizes, effort and the references' epochs were recorded
    old = json.loads((tmp_path / "whole" / "compare.json").read_text())
    for run in old["runs"].values():
        for key in ("val_size", "best_epoch", "epochs", "labels_with_validation", "effort_megapixels"):
            run.pop(key, None)
        if run["strategy"] != "full":
            del run["curve"]["pixels_changed"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    again = merge([tmp_path / "old.json"], tmp_path / "from-old")
    ceal = again["strategies"]["ceal"]
    assert ceal["final_dice_per_seed"] == whole["strategies"]["ceal"]["final_dice_per_seed"]
    assert ceal["effort_curve"] is None and ceal["curve"]["labels_with_validation"] is None
    assert again["full"]["best_epoch_per_seed"] == [None] * 3 and again["runs"]["ceal-s0"]["val_size"] is None
    assert ceal["vs_random"]["final_dice"]["p_value"] == pytest.approx(0.25)
    assert (tmp_path / "from-old" / "compare.csv").is_file() and (tmp_path / "from-old" / "compare.png").is_file()
    # the old file and the new one hold the same runs with more recorded: the new one is not the same run
    with pytest.raises(AlsegError, match="also in an earlier study"):
        merge([tmp_path / "old.json", tmp_path / "whole"], tmp_path / "mixed")


# --- what compare reads from a run's store --------------------------------------------------------------

def _store(run_dir, kind: str) -> None:
    """A hand-made run store: 6 training, 2 validation and 2 test images, two epochs, two rounds."""
    split = {"train": [f"t{k}" for k in range(6)], "val": ["v0", "v1"], "test": ["x0", "x1"], "labelled": ["t0"],
             "pool": [f"t{k}" for k in range(1, 6)], "preset": "isic2017", "split_by": "group"}
    summary = {"images": 2, "mean_dice": 0.5, "median_dice": 0.5, "pooled_dice": 0.5, "volume_dice_mean": None}
    with RunStore(run_dir, create=True) as store:
        store.start(kind=kind, annotator="simulated", config={}, data={"format": "isic2017"}, normalizer=None,
                    split=split, samples=[])
        for epoch, val in ((1, 0.4), (2, 0.6), (3, 0.5)):
            store.add_epoch("initial", 0, {"epoch": epoch, "train_dice": 0.9, "val_dice": val})
        for r in (0, 1):
            store.add_evaluation(r, "test", {**summary, "mean_dice": 0.5 + 0.1 * r})
            facts = {"effort": {"images": 1, "pixels": 1024, "pixels_changed": 300, "changed_fraction": 0.29,
                                "prediction": "deterministic"}} if r else {}
            store.finish_round(r, expert_labelled=1 + r, pseudo_labelled=0, pool=5 - r, test_dice=None,
                               val_dice=None, seconds=1.0, timings={}, latest_checkpoint="x", facts=facts)


def test_compare_reads_validation_size_effort_and_convergence_from_the_stores(tmp_path):
    _store(tmp_path / "ceal-s0", "active")
    with RunStore.open_readonly(tmp_path / "ceal-s0") as store:
        rows = store.rounds()
    metric, record = _recorded_run(tmp_path / "ceal-s0", rows)
    assert metric == "mean_dice" and record["train_size"] == 6 and record["val_size"] == 2
    assert [r["test_dice"] for r in record["rounds"]] == pytest.approx([0.5, 0.6])
    assert record["rounds"][0]["effort"] is None and record["rounds"][1]["effort"]["pixels_changed"] == 300
    assert cumulative_pixels_changed(record["rounds"]) == [0, 300]
    _store(tmp_path / "full-s0", "supervised")
    assert _finished_full(tmp_path / "full-s0") == {"test_dice": 0.5, "metric": "mean_dice", "best_epoch": 2,
                                                    "epochs": 3}
