"""Dice per volume as Buda et al. count it: hand-made volumes with known answers, then a tiny trained
model evaluated on three real LGG patients (TIFF slices and the same patients as NIfTI volumes),
every figure checked against a direct numpy computation."""
from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage

from alseg.data import load_cached, open_dataset
from alseg.errors import AlsegError
from alseg.evaluate import evaluate
from alseg.metrics import (false_positive_voxels, largest_component_3d, lesion_slice_dice, per_volume_scores,
                           score_volume, stack_slices, summarize_volumes, volume_dice_3d)
from alseg.train import Checkpoint, predict_probs
from conftest import LGG, run_json
from volume_fixtures import PATIENTS


def _vol(z=3, s=6):
    return np.zeros((z, s, s), bool)


# --- hand-made volumes --------------------------------------------------------------------------

def test_lesion_split_across_slices_is_one_3d_dice():
    truth, pred = _vol(), _vol()
    truth[0, 1:3, 1:3] = truth[1, 1:3, 1:3] = True  # 8 voxels over two slices; slice 2 tumour-free
    pred[0, 1:3, 1:3] = True
    pred[1, 1, 1:3] = True  # 6 voxels, all inside
    score = score_volume(pred, truth)
    assert score.dice == pytest.approx(2 * 6 / (6 + 8))
    # not the mean of the slices' Dice (1.0, 2/3 and an empty slice's 1.0)
    assert score.lesion_slice_dice == pytest.approx((1.0, 2 * 2 / (2 + 4)))
    assert score.lesion_free_slices == 1 and score.false_positive_voxels == 0 and not score.empty


def test_slices_are_stacked_by_index_not_by_input_or_string_order():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 0, 0] = True   # slice 10
    masks[1, 0, 0] = True   # slice 2
    masks[2, 3, 3] = True   # slice 1
    vol = stack_slices(masks, [10, 2, 1])
    assert vol.shape == (10, 4, 4)
    assert vol[9, 0, 0] and vol[1, 0, 0] and vol[0, 3, 3] and vol.sum() == 3
    with pytest.raises(ValueError):
        stack_slices(masks, [1, 1, 2])


def test_a_missing_slice_separates_components():
    truth = np.zeros((3, 4, 4), bool)
    pred = truth.copy()
    pred[0, 0, 0:2] = True           # slice 0: 2 voxels
    pred[1, 0, 0] = True             # slice 2, under them: 1 voxel (slice 1 is absent)
    pred[2, 3, 3] = True             # slice 3, apart: 1 voxel
    vol = stack_slices(pred, [0, 2, 3])
    assert vol.shape == (4, 4, 4) and not vol[1].any()
    kept = largest_component_3d(vol)
    # stacked without the gap, slices 0 and 2 would touch and make one 3-voxel component
    assert kept.sum() == 2 and kept[0, 0, 0] and kept[0, 0, 1]


def test_empty_volume_predicted_empty_or_with_a_false_positive():
    empty = _vol()
    nothing = score_volume(empty, empty)
    assert nothing.dice == 1.0 and nothing.empty and nothing.false_positive_voxels == 0
    assert nothing.lesion_slice_dice == () and nothing.lesion_free_slices == 3
    assert np.isnan(volume_dice_3d(empty, empty, empty=float("nan")))  # Buda's 0/0
    fp = empty.copy()
    fp[2, 0, 0:3] = True
    wrong = score_volume(fp, empty)
    assert wrong.dice == 0.0 and not wrong.empty and wrong.false_positive_voxels == 3
    hit_truth, hit = _vol(), _vol()
    hit_truth[0, 2, 2] = hit[0, 2, 2] = True
    summary = summarize_volumes({"a": nothing, "b": wrong, "c": score_volume(hit, hit_truth)},
                                voxel_ml={"a": 0.5, "b": 0.25, "c": 1.0})
    assert summary["volumes"] == 3 and summary["empty_volumes"] == 1
    assert summary["volume_dice_mean"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert summary["volume_dice_mean_nonempty"] == pytest.approx(0.5)  # Buda's mean where it is defined
    assert summary["false_positive_voxels"] == 3 and summary["false_positive_ml"] == pytest.approx(0.75)
    assert summary["lesion_slices"] == 1 and summary["lesion_slice_dice_mean"] == 1.0
    assert summary["lesion_free_slices"] == 3 + 3 + 2
    # without every volume's voxel size there is no mL figure
    assert summarize_volumes({"a": nothing, "b": wrong}, voxel_ml={"a": 0.5})["false_positive_ml"] is None


def test_largest_component_changes_dice_both_ways():
    truth, pred = _vol(4, 8), _vol(4, 8)
    truth[0:2, 0:3, 0:3] = True                     # the lesion: 18 voxels
    pred[0:2, 0:3, 0:3] = True
    pred[3, 6:8, 6:8] = True                        # a stray blob: 4 voxels
    assert score_volume(pred, truth).dice == pytest.approx(2 * 18 / (22 + 18))
    cleaned = score_volume(pred, truth, largest_component=True)
    assert cleaned.dice == 1.0 and cleaned.false_positive_voxels == 0
    assert score_volume(pred, truth).false_positive_voxels == 4  # slice 3 is lesion-free
    # when the lesion is the smaller component, keeping the largest loses it
    small_truth = _vol(4, 8)
    small_truth[3, 6:8, 6:8] = True
    assert score_volume(pred, small_truth, largest_component=True).dice == 0.0
    assert score_volume(pred, small_truth).dice == pytest.approx(2 * 4 / (22 + 4))


def test_26_connectivity_joins_diagonal_neighbours_6_does_not():
    vol = np.zeros((4, 4, 4), bool)
    vol[0, 0, 0] = vol[1, 1, 1] = True   # corner neighbours across slices
    vol[3, 3, 3] = True                  # touches neither
    assert largest_component_3d(vol).sum() == 2
    assert largest_component_3d(vol, connectivity=6).sum() == 1
    assert not largest_component_3d(np.zeros((2, 2, 2), bool)).any()
    with pytest.raises(ValueError):
        largest_component_3d(vol, connectivity=8)


def test_per_slice_figures_and_per_volume_scores():
    truth = np.zeros((4, 4, 4), bool)
    pred = truth.copy()
    truth[0, 0, 0:2] = True
    pred[0, 0, 0] = True
    pred[1, 3, 3] = True    # false positive on a lesion-free slice
    truth[2, 1, 1] = True   # missed
    assert lesion_slice_dice(pred, truth) == pytest.approx([2 / 3, 0.0])
    assert false_positive_voxels(pred, truth) == 1
    scores = per_volume_scores(pred, truth, ["p", "p", "q", None], [5, 6, 0, 0])
    assert set(scores) == {"p", "q"}
    assert scores["p"].dice == pytest.approx(2 * 1 / (2 + 2)) and scores["q"].dice == 0.0


# --- real LGG patients, a tiny trained model ----------------------------------------------------

def _calibrated(trained, data_dir, out):
    """``trained`` with its output bias lowered until half the lesion pixels of ``data_dir`` are
    predicted: a 2-epoch model predicts nothing, which would leave every figure trivially empty."""
    import torch

    ckpt = Checkpoint.load(trained)
    data = load_cached(open_dataset(data_dir), ckpt.size, channels=ckpt.model.config.in_channels)
    probs = predict_probs(ckpt.model, np.array(data.images), ckpt.normalizer).astype(np.float64)
    logits = np.log(np.clip(probs, 1e-12, None)) - np.log(np.clip(1 - probs, 1e-12, None))
    with torch.no_grad():
        ckpt.model.head.bias -= float(np.median(logits[np.asarray(data.masks) > 0]))
    ckpt.save(out)
    return out


@pytest.fixture(scope="module")
def three_patients(tmp_path_factory, lgg_nifti):
    """The fixture's three patients as kaggle_3m TIFF slices (links) and as NIfTI volumes (flat
    layout: 0.9 x 0.9 x 5 mm voxels), with a tiny model trained on the TIFFs for 2 epochs and
    calibrated (:func:`_calibrated`) to each layout."""
    root = tmp_path_factory.mktemp("lgg3")
    tiffs = root / "kaggle_3m"
    tiffs.mkdir()
    for p in PATIENTS:
        (tiffs / p).symlink_to(LGG / p, target_is_directory=True)
    run = root / "run"
    run_json("train", "--data", tiffs, "--size", "32", "--width", "4", "--epochs", "2", "--out", run)
    best = run / "checkpoints" / "best.pt"
    layouts = {"tiff": tiffs, "nifti": lgg_nifti["flat"]}
    models = {name: _calibrated(best, path, root / f"{name}.pt") for name, path in layouts.items()}
    return layouts, models


def _slice_number(sid: str) -> int:
    return int(re.search(r"(?:_|/z)(\d+)$", sid).group(1))


def _direct(model_path, data_dir):
    """Every volume figure recomputed here with numpy and scipy from the model's own predictions."""
    ckpt = Checkpoint.load(model_path)
    data = load_cached(open_dataset(data_dir), ckpt.size, channels=ckpt.model.config.in_channels)
    pred = predict_probs(ckpt.model, np.array(data.images), ckpt.normalizer) > 0.5
    truth = np.asarray(data.masks) > 0
    out = {"raw": [], "lcc": [], "lesion": {"raw": [], "lcc": []}, "fp": {"raw": 0, "lcc": 0}}
    for patient in sorted(set(data.groups)):
        rows = sorted((i for i, g in enumerate(data.groups) if g == patient), key=lambda i: _slice_number(data.ids[i]))
        assert np.all(np.diff([_slice_number(data.ids[i]) for i in rows]) == 1)
        p, t = pred[rows], truth[rows]
        labels, n = ndimage.label(p, structure=np.ones((3, 3, 3)))
        big = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1) if n else p
        for name, q in (("raw", p), ("lcc", big)):
            denom = q.sum() + t.sum()
            out[name].append(1.0 if denom == 0 else 2 * (q & t).sum() / denom)
            for k in range(len(t)):
                if t[k].any():
                    out["lesion"][name].append(2 * (q[k] & t[k]).sum() / (q[k].sum() + t[k].sum()))
                else:
                    out["fp"][name] += int(q[k].sum())
    return out


@pytest.mark.parametrize("layout", ["tiff", "nifti"])
def test_evaluate_on_real_patients_matches_numpy(three_patients, layout):
    layouts, models = three_patients
    data_dir, run = layouts[layout], models[layout]
    want = _direct(run, data_dir)
    got = evaluate(run, data_dir).summary
    assert got["largest_component"] is False and got["volumes"] == 3 and got["images"] == 60
    assert got["volume_dice_mean"] == pytest.approx(np.mean(want["raw"]))
    assert got["volume_dice_mean_raw"] == pytest.approx(np.mean(want["raw"]))
    assert got["volume_dice_mean_largest_component"] == pytest.approx(np.mean(want["lcc"]))
    assert got["lesion_slices"] == len(want["lesion"]["raw"]) > 0
    assert got["lesion_slice_dice_mean"] == pytest.approx(np.mean(want["lesion"]["raw"]))
    assert got["false_positive_voxels"] == want["fp"]["raw"]
    assert got["lesion_free_slices"] == 60 - got["lesion_slices"]
    if layout == "nifti":
        # a 32 px voxel stands for 2 x 2 native 0.9 x 0.9 x 5 mm voxels
        assert got["false_positive_ml"] == pytest.approx(want["fp"]["raw"] * 0.9 * 0.9 * 5 * 4 / 1000)
    else:
        assert got["false_positive_ml"] is None  # TIFF slices carry no voxel size
    post = evaluate(run, data_dir, largest_component=True)
    s = post.summary
    assert s["largest_component"] is True
    assert s["volume_dice_mean"] == pytest.approx(np.mean(want["lcc"])) == pytest.approx(
        np.mean(list(post.volumes.values())))
    assert s["volume_dice_mean_raw"] == got["volume_dice_mean_raw"]
    assert s["lesion_slice_dice_mean"] == pytest.approx(np.mean(want["lesion"]["lcc"]))
    assert s["false_positive_voxels"] == want["fp"]["lcc"] <= want["fp"]["raw"]
    # the figures compared above are not trivial: some overlap, false positives, and a largest-component
    # step that changes the Dice
    assert 0 < got["volume_dice_mean"] < 1 and got["false_positive_voxels"] > 0
    assert got["volume_dice_mean_largest_component"] != got["volume_dice_mean_raw"]


def test_slice_order_comes_from_the_slice_number(three_patients):
    layouts, _ = three_patients
    ds = open_dataset(layouts["tiff"])
    assert ds.slice_indices() == [_slice_number(i) for i in ds.ids]
    assert sorted(ds.ids[:20], key=str) != ds.ids[:20]  # string order would put _10 before _2
    flat = open_dataset(layouts["nifti"])
    assert flat.slice_indices() == [s.slice for s in flat.samples]


def test_ungrouped_data_keeps_its_keys_and_refuses_largest_component(three_patients, tmp_path):
    from PIL import Image

    run = three_patients[1]["tiff"]
    folder = tmp_path / "plain"  # a `folder` layout without groups.csv: 2D images, no volumes
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / "images" / f"i{k}.png")
        mask = np.zeros((48, 48), np.uint8)
        mask[10:20 + k, 10:30] = 255
        Image.fromarray(mask).save(folder / "masks" / f"i{k}.png")
    summary = evaluate(run, folder).summary
    assert set(summary) == {"headline", "headline_dice", "images", "mean_dice", "median_dice", "pooled_dice",
                            "volume_dice_mean"}
    assert summary["volume_dice_mean"] is None
    assert summary["headline"] == "mean_dice" and summary["headline_dice"] == summary["mean_dice"]
    with pytest.raises(AlsegError, match="largest 3D component needs volumes"):
        evaluate(run, folder, largest_component=True)
