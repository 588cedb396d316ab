"""The headline test Dice (issue 30): per-volume Dice (Buda et al.) where the test split holds whole
volumes, per-image Dice elsewhere; recorded by runs and the full-supervision reference, compared by
``compare`` and named by the report. Tiny runs on six real LGG patients (20 slices each, every slice
kept: whole patients) and on generated, ungrouped images."""
from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from alseg.active.loop import run_active, status
from alseg.compare import compare, merge
from alseg.config import build_config
from alseg.errors import AlsegError
from alseg.evaluate import evaluate, headline_label, headline_metric, with_headline
from alseg.experiment import train_supervised
from alseg.report import make_report
from alseg.store import RunStore
from conftest import LGG

PATIENTS = ("TCGA_CS_4942_19970222", "TCGA_CS_5395_19981004", "TCGA_CS_6290_20000917", "TCGA_HT_7686_19950629",
            "TCGA_HT_7874_19950902", "TCGA_HT_8018_19970411")
VOLUME_LABEL = "per-volume test Dice (Buda et al.)"


def _config(data, **active) -> object:
    return build_config("demo", None, {
        "data": {"path": str(data), "size": 32, "split_preset": "default"}, "model": {"width": 4},
        "train": {"epochs": 1, "full_epochs": 1},
        "active": {"rounds": 1, "round_epochs": 1, "mc_passes": 2, "batch_size": 10, **active}})


def _about(path) -> dict:
    """What a PNG drawn by alseg.report.figures says it shows (its Description chunk)."""
    with Image.open(path) as im:
        return json.loads(im.text["Description"])


def _test_evaluations(run_dir) -> dict[int, dict]:
    with RunStore.open_readonly(run_dir) as store:
        return {e["round"]: e for e in store.evaluations() if e["split"] == "test"}


# --- the rule -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("format, preset, split_by, expected", [
    ("lgg", "default", "group", "volume_dice_mean"),      # whole patients, tumour-free slices included
    ("lgg", "lgg-volume", "group", "volume_dice_mean"),
    ("lgg", "isic", "group", "volume_dice_mean"),         # any preset that keeps empty slices
    ("nifti", "default", "group", "volume_dice_mean"),
    ("dicom", "default", "group", "volume_dice_mean"),
    ("lgg", "lgg", "group", "mean_dice"),                 # tumour slices only: part of each volume
    ("nifti", "lgg", "group", "mean_dice"),
    ("lgg", "default", "sample", "mean_dice"),            # a volume's slices scattered over the splits
    ("folder", "default", "group", "mean_dice"),          # photos grouped by groups.csv are no volumes
    ("isic2017", "isic", "group", "mean_dice"),
    (None, "default", "group", "mean_dice"),
])
def test_headline_metric_cases(format, preset, split_by, expected):
    assert headline_metric(format, preset, split_by) == expected
    if split_by == "group":
        assert headline_metric(format, preset) == expected  # by group unless told


def test_with_headline_names_the_figure_it_holds():
    summary = {"images": 3, "mean_dice": 0.8, "volume_dice_mean": 0.4}
    named = with_headline(summary, "volume_dice_mean")
    assert list(named)[:2] == ["headline", "headline_dice"]  # first: the line `alseg evaluate` leads with
    assert named["headline"] == "volume_dice_mean" and named["headline_dice"] == 0.4
    assert with_headline(named, "mean_dice")["headline_dice"] == 0.8 and summary == {
        "images": 3, "mean_dice": 0.8, "volume_dice_mean": 0.4}  # the input is left alone
    # no volume figure scored (ungrouped rows): the per-image figure, and named so
    assert with_headline({"mean_dice": 0.7, "volume_dice_mean": None}, "volume_dice_mean") == {
        "headline": "mean_dice", "headline_dice": 0.7, "mean_dice": 0.7, "volume_dice_mean": None}
    assert headline_label("volume_dice_mean") == "per-volume Dice" and headline_label("mean_dice") == "Dice"


# --- whole LGG patients -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """Six real LGG patients (links into ../shared/data), every slice: whole volumes."""
    root = tmp_path_factory.mktemp("lgg6") / "kaggle_3m"
    root.mkdir()
    for p in PATIENTS:
        (root / p).symlink_to(LGG / p, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def volume_study(patients, tmp_path_factory):
    """A comparison of random and uncertainty (one seed, round 0 shared) with its full reference."""
    out = tmp_path_factory.mktemp("volume-study")
    cfg = _config(patients)
    return cfg, out, compare(cfg, out, strategies=["random", "uncertainty"], seeds=1, full=True)


def test_a_run_on_whole_volumes_records_per_volume_dice(volume_study):
    _, out, _ = volume_study
    for name in ("random-s0", "uncertainty-s0"):
        run = out / "runs" / name
        rounds = status(run)["rounds"]
        evaluations = _test_evaluations(run)
        assert [r["round"] for r in rounds] == [0, 1]
        for r in rounds:
            ev = evaluations[r["round"]]
            assert r["test_dice"] == ev["volume_dice_mean"] is not None
        # not the per-slice mean under another name: tumour-free slices make the two differ
        assert any(r["test_dice"] != evaluations[r["round"]]["mean_dice"] for r in rounds)


def test_the_full_reference_and_compare_use_per_volume_dice(volume_study):
    _, out, summary = volume_study
    assert summary["metric"] == "volume_dice_mean" and summary["metric_label"] == "per-volume Dice"
    assert json.loads((out / "compare.json").read_text())["metric_label"] == "per-volume Dice"
    full = _test_evaluations(out / "runs" / "full-s0")[0]
    assert summary["full_dice"] == full["volume_dice_mean"] != full["mean_dice"]
    for name in ("random-s0", "uncertainty-s0"):
        evaluations = _test_evaluations(out / "runs" / name)
        curve = summary["runs"][name]["curve"]["test_dice"]
        assert curve == [evaluations[k]["volume_dice_mean"] for k in (0, 1)]
        assert summary["runs"][name]["final_dice"] == curve[-1]
    head, *rows = (out / "compare.csv").read_text().splitlines()
    assert head.split(",")[-1] == "metric" and rows and all(r.split(",")[-1] == "per-volume Dice" for r in rows)
    ax = next(a for a in _about(out / "compare.png")["axes"] if a["lines"])
    assert ax["ylabel"].startswith(VOLUME_LABEL) and VOLUME_LABEL in _about(out / "compare.png")["title"]


def test_compare_refuses_runs_measuring_different_dice(volume_study, tmp_path):
    from alseg.data.synthetic import make_synthetic

    cfg, out, _ = volume_study
    photos = make_synthetic(tmp_path / "photos", n=40, size=32)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(photos)))
    # seed 0 is the LGG runs already there; seed 1 made on photos: the same settings, another headline
    with pytest.raises(AlsegError, match="runs measure different test Dice") as caught:
        compare(other, out, strategies=["random"], seeds=2)
    assert "\n" not in str(caught.value) and "per-volume Dice" in str(caught.value)
    assert json.loads((out / "compare.json").read_text())["seed_list"] == [0]  # the mix was not summarised
    # studies summarised apart: one per-volume, one per-image
    per_image = json.loads((out / "compare.json").read_text())
    per_image.update(metric="mean_dice", metric_label="Dice")
    (tmp_path / "per-image.json").write_text(json.dumps(per_image))
    with pytest.raises(AlsegError, match="compares Dice"):
        merge([out / "compare.json", tmp_path / "per-image.json"], tmp_path / "merged")
    assert merge([out / "compare.json"], tmp_path / "merged")["metric"] == "volume_dice_mean"


def test_the_report_names_per_volume_test_dice(volume_study):
    _, out, _ = volume_study
    run = out / "runs" / "uncertainty-s0"
    page = make_report(run, images=1, device="cpu").read_text()
    about = _about(run / "report" / "learning-curve.png")
    (ax,) = [a for a in about["axes"] if a["lines"]]
    assert ax["ylabel"].startswith(VOLUME_LABEL) and VOLUME_LABEL in about["title"]
    with RunStore.open_readonly(run) as store:
        volumes = {i.rsplit("_", 1)[0] for i in store.split()["test"]}  # LGG slice ids: <patient>_<n>
    test_line = next(k for k in ax["lines"] if k.startswith(VOLUME_LABEL))
    assert test_line == f"{VOLUME_LABEL}, {len(volumes)} volume{'s' * (len(volumes) > 1)}"
    assert ax["lines"][test_line]["points"] == 2
    assert f"<th>{VOLUME_LABEL}</th>" in page and "per-slice Dice mean" in page
    # the headline column comes before the per-slice ones
    assert page.index(VOLUME_LABEL + "</th>") < page.index("per-slice Dice mean")


def test_supervised_and_evaluate_lead_with_the_same_headline(patients, tmp_path):
    result = train_supervised(_config(patients), tmp_path / "sup")
    test = result["test"]
    assert test["headline"] == "volume_dice_mean" and test["headline_dice"] == test["volume_dice_mean"]
    again = evaluate(tmp_path / "sup", patients, split="test", device="cpu").summary
    assert list(again)[:2] == ["headline", "headline_dice"]
    assert again["headline"] == "volume_dice_mean" and again["headline_dice"] == pytest.approx(test["headline_dice"])
    assert evaluate(tmp_path / "sup", patients, device="cpu").summary["headline"] == "volume_dice_mean"
    # lesion slices only are no whole volumes
    lesions = evaluate(tmp_path / "sup", patients, positive_only=True, device="cpu").summary
    assert lesions["headline"] == "mean_dice" and lesions["headline_dice"] == lesions["mean_dice"]


# --- ungrouped images --------------------------------------------------------------------------------------

def test_a_run_on_ungrouped_images_keeps_per_image_dice(tmp_path):
    from alseg.data.synthetic import make_synthetic

    photos = make_synthetic(tmp_path / "photos", n=40, size=32)
    run = tmp_path / "run"
    run_active(_config(photos), run)
    rounds = status(run)["rounds"]
    evaluations = _test_evaluations(run)
    assert [r["test_dice"] for r in rounds] == [evaluations[r["round"]]["mean_dice"] for r in rounds]
    assert all(evaluations[r["round"]]["volume_dice_mean"] is None for r in rounds)
    page = make_report(run, images=1, device="cpu").read_text()
    (ax,) = [a for a in _about(run / "report" / "learning-curve.png")["axes"] if a["lines"]]
    assert ax["ylabel"].startswith("per-image test Dice") and any(k.startswith("test Dice (") for k in ax["lines"])
    assert "per-image test Dice mean" in page and "per-volume test Dice" not in page
