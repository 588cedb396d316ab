"""Reports, comparisons and TensorBoard metrics from tiny runs on real LGG data."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import LGG, run_cli, run_json

TINY = ["--size", "32", "--width", "4", "--epochs", "2", "--round-epochs", "1", "--mc-passes", "3"]
EXPECTED = {"predictions-initial.png", "predictions-final.png", "uncertainty-vs-dice-round-01.png",
            "uncertainty-vs-dice-round-02.png", "histogram-round-01.png", "histogram-round-02.png",
            "training-initial.png", "training-active.png", "learning-curve.png"}


@pytest.fixture(scope="module")
def lgg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    run_json("run", "--preset", "quick-lgg", "--data", LGG, "--rounds", "2", "--out", out, "--tensorboard", *TINY)
    return out


def _assert_figure(path, min_size=(600, 300)):
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        pixels = np.asarray(im.convert("L"), float)
    assert w >= min_size[0] and h >= min_size[1] and w <= 2000, (path.name, im.size)
    assert pixels.std() > 10, f"{path.name} looks blank"  # axes, text and data, not a flat image


def test_report_writes_every_figure_and_a_self_contained_page(lgg_run):
    result = run_json("report", lgg_run)
    page = lgg_run / "report" / "index.html"
    assert result["html"] == str(page) and page.is_file()
    pngs = {p.name for p in (lgg_run / "report").glob("*.png")}
    assert pngs == EXPECTED
    for name in pngs:
        _assert_figure(lgg_run / "report" / name)
    text = page.read_text()
    refs = set(re.findall(r'(?:src|href)="([^"]+)"', text))
    assert EXPECTED <= refs
    assert all((lgg_run / "report" / r).is_file() for r in refs)  # nothing missing, nothing fetched
    assert "http://" not in text and "https://" not in text and "<script" not in text
    rows = (lgg_run / "report" / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,expert_labelled,pseudo_labelled,pool,mean_dice,median_dice,pooled_dice,volume_dice_mean")
    assert len(rows) == 4
    # the predictions figure holds 4 fixed test images: four rows of four square panels
    with Image.open(lgg_run / "report" / "predictions-final.png") as im:
        assert 0.8 * im.size[0] < im.size[1] < 1.3 * im.size[0]
    assert not (lgg_run / "report" / "effort.csv").exists()  # the simulated annotator spends no effort


def _about(path) -> dict:
    """What a report PNG says it draws (alseg.report.figures.describe, kept in its Description chunk)."""
    with Image.open(path) as im:
        return json.loads(im.text["Description"])


def test_a_simulated_runs_learning_curve_is_test_dice_with_validation_dashed(lgg_run):
    run_json("report", lgg_run, "--images", "2")
    report = lgg_run / "report"
    status = run_json("status", lgg_run)
    about = _about(report / "learning-curve.png")
    assert about["title"].startswith("Learning curve: test Dice")
    (ax,) = [a for a in about["axes"] if a["lines"]]
    lines = ax["lines"]
    test = next(k for k in lines if k.startswith("test Dice ("))
    val = next(k for k in lines if k.startswith("validation Dice ("))
    assert lines[test] == {"points": 3, "linestyle": "-"} and lines[val] == {"points": 3, "linestyle": "--"}
    from alseg.store import RunStore

    with RunStore.open_readonly(lgg_run) as store:
        test_images = {e["images"] for e in store.evaluations() if e["split"] == "test"}
        val_images = len(store.split()["val"])
    assert test == f"test Dice ({test_images.pop()} images)" and val == f"validation Dice ({val_images} images)"
    assert [r["round"] for r in status["rounds"] if r["test_dice"] is not None] == [0, 1, 2]
    for name, round in (("predictions-initial.png", 0), ("predictions-final.png", 2)):
        assert _about(report / name)["title"].startswith(f"Predictions on test images, round {round}")
    page = (report / "index.html").read_text()
    assert "test Dice mean" in page and "No test split" not in page


def test_tensorboard_events_hold_epochs_and_rounds(lgg_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(lgg_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"initial/train_dice", "initial/val_dice", "active/train_dice", "round/test_mean_dice",
            "round/test_dice_vs_labels", "round/pool"} <= tags
    assert [e.step for e in acc.Scalars("initial/val_dice")] == [1, 2]
    assert [e.step for e in acc.Scalars("active/train_dice")] == [1, 2]
    assert [e.step for e in acc.Scalars("round/test_mean_dice")] == [0, 1, 2]
    status = run_json("status", lgg_run)
    assert [e.value for e in acc.Scalars("round/pool")] == [r["pool"] for r in status["rounds"]]


def test_compare_two_strategies_two_seeds(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "quick-lgg", "--data", LGG, "--strategies", "ceal,random", "--seeds", "2", "--full",
            "--rounds", "1", "--out", out, *TINY, "--full-epochs", "3"]
    summary = run_json(*args)
    assert summary["settings"]["train.epochs"] == 2 and summary["settings"]["train.full_epochs"] == 3
    assert set(summary["strategies"]) == {"ceal", "random"} and summary["seeds"] == 2
    assert summary["paper_dice"] == 0.58 and 0 <= summary["full_dice"] <= 1
    for name, s in summary["strategies"].items():
        assert s["curve"]["n"] == 2 and len(s["curve"]["x"]) == 2
        assert s["curve"]["x"][1] == s["curve"]["x"][0] + 35
        assert len(s["labels_to_95pct_full_per_seed"]) == 2
        assert len(s["curve"]["lo"]) == len(s["curve"]["hi"]) == 2
        assert s["aulc_interval"][0] <= s["aulc"] <= s["aulc_interval"][1]
    assert set(summary["strategies"]["ceal"]["vs_random"]) >= {"aulc", "final_dice", "labels_to_95pct_full"}
    _assert_figure(out / "compare.png")
    table = (out / "compare.csv").read_text().splitlines()
    assert table[0].startswith("strategy,labels_to_95pct_full_mean") and len(table) == 3
    assert {p.name for p in (out / "runs").iterdir()} == {"full-s0", "full-s1", "ceal-s0", "ceal-s1", "random-s0",
                                                           "random-s1"}
    checkpoints = sorted((out / "runs").rglob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    text = run_cli(*args).stdout  # finished runs are reused, not redone; the human tables
    assert "AULC" in text and "paired per-seed differences vs random" in text and "2 seeds" in text
    assert "(3 epochs)" in " ".join(text.split())  # the reference's own epoch count, in the table's title
    assert json.loads((out / "compare.json").read_text())["strategies"] == summary["strategies"]
    assert [p.stat().st_mtime_ns for p in sorted((out / "runs").rglob("*.pt"))] == stamps  # nothing retrained


def test_report_of_a_missing_run_is_one_line(tmp_path):
    proc = run_cli("report", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("alseg: error:") and "Traceback" not in proc.stderr
