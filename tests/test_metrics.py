"""Dice conventions, cross-checked against MONAI's DiceMetric on real masks."""
import numpy as np
import torch
from monai.metrics import DiceMetric
from scipy import ndimage

from alseg.data import load_cached, open_dataset
from alseg.metrics import dice_counts, dice_per_image, pooled_dice, summarize_dice, volume_dice
from conftest import ISIC, LGG


def test_empty_mask_convention():
    empty = np.zeros((1, 4, 4), bool)
    some = empty.copy()
    some[0, 1, 1] = True
    assert dice_per_image(empty, empty)[0] == 1.0
    assert dice_per_image(some, empty)[0] == 0.0
    assert dice_per_image(empty, some)[0] == 0.0
    assert dice_per_image(some, some)[0] == 1.0


def test_matches_monai_on_real_masks():
    data = load_cached(open_dataset(ISIC), 64)
    truth = np.asarray(data.masks[:40]) > 0
    pred = np.stack([ndimage.binary_dilation(t, iterations=k % 4) if k % 2 else ndimage.binary_erosion(t, iterations=2)
                     for k, t in enumerate(truth)])
    ours = dice_per_image(pred, truth)
    metric = DiceMetric(include_background=True, reduction="none")
    theirs = metric(torch.from_numpy(pred[:, None].astype(np.float32)), torch.from_numpy(truth[:, None].astype(np.float32)))
    assert np.allclose(ours, theirs.numpy()[:, 0], atol=1e-6)
    assert 0.3 < ours.mean() < 1.0


def test_pooled_and_volume_dice_on_lgg_patients():
    data = load_cached(open_dataset(LGG), 32)
    truth = np.asarray(data.masks[:100]) > 0
    pred = np.roll(truth, 1, axis=2)
    inter, total = dice_counts(pred, truth)
    groups = data.groups[:100]
    vols = volume_dice(inter, total, groups)
    assert set(vols) == set(groups)
    for g, v in vols.items():
        rows = [i for i, x in enumerate(groups) if x == g]
        p, t = pred[rows], truth[rows]
        direct = 1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum())
        assert np.isclose(v, direct)
    s = summarize_dice(inter, total, groups)
    assert np.isclose(s["pooled_dice"], 2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    assert np.isclose(s["mean_dice"], dice_per_image(pred, truth).mean())
    assert summarize_dice(inter, total)["volume_dice_mean"] is None
    assert pooled_dice([0], [0]) == 1.0
