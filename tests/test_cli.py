"""End to end through the CLI on real LGG data at a tiny size: train, then evaluate."""
import csv
import sqlite3

import pytest

from conftest import ISIC, LGG, run_cli, run_json


@pytest.fixture(scope="module")
def lgg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lgg"
    result = run_json("train", "--data", LGG, "--size", "32", "--width", "4", "--epochs", "2", "--out", out)
    return out, result


def test_train_records_history_checkpoints_and_test_dice(lgg_run):
    out, result = lgg_run
    assert result["split_by"] == "group"
    assert result["labelled"] == result["split"]["labelled"] > 0
    assert 0.0 <= result["test"]["mean_dice"] <= 1.0 and result["test"]["volume_dice_mean"] is not None
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert "preset: quick-lgg" in (out / "config.yaml").read_text()
    with sqlite3.connect(out / "run.db") as db:
        epochs = db.execute("SELECT epoch, train_dice, val_dice FROM epochs ORDER BY epoch").fetchall()
        splits = dict(db.execute("SELECT split, COUNT(*) FROM samples GROUP BY split").fetchall())
    assert [e[0] for e in epochs] == [1, 2] and all(e[1] is not None and e[2] is not None for e in epochs)
    assert sum(splits.values()) == 360


def test_train_full_takes_epochs_as_the_references_count(tmp_path):
    """`--full --epochs N` trains N epochs on the whole train split, not the preset's full_epochs (70)."""
    result = run_json("train", "--data", LGG, "--size", "32", "--width", "4", "--epochs", "2", "--full",
                      "--out", tmp_path / "full")
    assert result["epochs"] == 2 and result["labelled"] == result["split"]["train"]
    with sqlite3.connect(tmp_path / "full" / "run.db") as db:
        assert [e for (e,) in db.execute("SELECT epoch FROM epochs ORDER BY epoch")] == [1, 2]
    assert "full_epochs: 2" in (tmp_path / "full" / "config.yaml").read_text()


def test_evaluate_run_dir_json_keys_and_options(lgg_run, tmp_path):
    out, result = lgg_run
    test = run_json("evaluate", out, "--data", LGG, "--split", "test")
    assert {"images", "mean_dice", "median_dice", "pooled_dice", "volume_dice_mean"} <= set(test)
    # grouped data (LGG patients): Dice per volume over all slices, lesion slices, false positives
    assert {"volumes", "volume_dice_mean_nonempty", "lesion_slice_dice_mean", "false_positive_voxels",
            "volume_dice_mean_largest_component"} <= set(test)
    assert test["images"] == result["split"]["test"]
    assert test["mean_dice"] == pytest.approx(result["test"]["mean_dice"])
    everything = run_json("evaluate", out / "checkpoints" / "best.pt", "--data", LGG, "--per-image", tmp_path / "d.csv",
                          "--per-volume", tmp_path / "v.csv")
    assert len(list(csv.DictReader(open(tmp_path / "v.csv")))) == everything["volumes"]
    positive = run_json("evaluate", out, "--data", LGG, "--positive-only")
    assert everything["images"] == 1073 and positive["images"] == 360
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(rows) == 1073 and all(0 <= float(r["dice"]) <= 1 for r in rows)


def test_evaluate_on_another_dataset(lgg_run):
    """An LGG model applied to ISIC images: runs (RGB, resized to the model's size), ungrouped."""
    out, _ = lgg_run
    result = run_json("evaluate", out, "--data", ISIC)
    assert result["images"] == 2000 and result["volume_dice_mean"] is None


def test_help_explains_commands():
    text = run_cli("--help").stdout
    for command in ("train", "evaluate", "data", "model", "demo"):
        assert command in text
    assert "--positive-only" in run_cli("evaluate", "--help").stdout


def test_report_of_a_supervised_run(lgg_run):
    out, result = lgg_run
    report = run_json("report", out, "--images", "2")
    assert report["figures"] == ["predictions-initial.png", "training-initial.png"]
    rows = (out / "report" / "rounds.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(f"0,{result['labelled']},0,")


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(122, "Disk quota exceeded"),
                                   sqlite3.OperationalError("database or disk is full")],
                         ids=["ENOSPC", "EDQUOT", "SQLITE_FULL"])
def test_every_kind_of_full_disk_is_one_line(monkeypatch, capsys, tmp_path, error):
    import alseg.active.loop as loop
    from alseg.cli import main

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "status", full)
    assert main(["status", str(tmp_path)]) == 2
    text = capsys.readouterr().err
    assert text.count("\n") == 1 and "disk full" in text and "Traceback" not in text
