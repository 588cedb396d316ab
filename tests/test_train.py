"""Training: a tiny U-Net learns on real ISIC pairs; augmentation keeps pairs aligned; checkpoints."""
import numpy as np
import pytest
import torch

from alseg.data import load_cached, open_dataset
from alseg.errors import AlsegError
from alseg.metrics import dice_per_image
from alseg.model import ModelConfig, UNet
from alseg.runtime import Normalizer, seed_everything
from alseg.train import LOSSES, Checkpoint, TrainConfig, augment, fit, predict_probs
from conftest import ISIC


@pytest.fixture(scope="module")
def isic64():
    return load_cached(open_dataset(ISIC), 64)


def test_tiny_unet_learns_real_lesions(isic64, tmp_path):
    seed_everything(0)
    train_idx, val_idx = np.arange(0, 48), np.arange(48, 64)
    norm = Normalizer.fit(isic64.images[train_idx])
    model = UNet(ModelConfig(width=8, depth=4, dropout=0.1))
    start = dice_per_image(predict_probs(model, np.asarray(isic64.images[train_idx]), norm) > 0.5,
                           isic64.masks[train_idx] > 0).mean()
    result = fit(model, isic64.images[train_idx], isic64.masks[train_idx], isic64.images[val_idx], isic64.masks[val_idx],
                 TrainConfig(epochs=8, batch_size=8, lr=2e-3, device="cpu"), norm, size=64, checkpoint_dir=tmp_path)
    hist = result["history"]
    assert len(hist) == 8 and all(r["val_dice"] is not None for r in hist)
    end = dice_per_image(predict_probs(model, np.asarray(isic64.images[train_idx]), norm) > 0.5,
                         isic64.masks[train_idx] > 0).mean()
    # beats its start and the trivial "everything is lesion" answer by a clear margin
    everything = dice_per_image(np.ones_like(isic64.masks[train_idx], bool), isic64.masks[train_idx] > 0).mean()
    assert end > start + 0.1 and end > everything + 0.1 and end > 0.7, (start, everything, end)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    best = Checkpoint.load(tmp_path / "best.pt")
    assert best.meta["epoch"] == result["best_epoch"]
    assert best.meta["val_dice"] == pytest.approx(max(r["val_dice"] for r in hist))
    again = predict_probs(best.model, np.asarray(isic64.images[val_idx]), best.normalizer)
    assert dice_per_image(again > 0.5, isic64.masks[val_idx] > 0).mean() == pytest.approx(result["best_val_dice"])
    assert (tmp_path / "last.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_augmentation_moves_image_and_mask_together():
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(6, 1, 32, 32)
    y[:, :, 8:20, 5:14] = 1
    x = y.repeat(1, 3, 1, 1)
    xa, ya = augment(x, y, gen)
    assert xa.shape == x.shape and ya.shape == y.shape
    assert not torch.equal(ya, y)  # something moved
    # the image's bright region (before intensity jitter) follows the mask
    agreement = ((xa.mean(1, keepdim=True) > xa.mean(dim=(1, 2, 3), keepdim=True)) == (ya > 0.5)).float().mean()
    assert agreement > 0.97


def test_losses_weigh_empty_images_and_small_lesions_as_documented():
    """Per-image Dice pulls an empty image toward 0 on its own; batch Dice lets a big lesion drown a
    small one; the lesion-image Dice weighs each lesion image alike and leaves empty ones to BCE."""
    target = torch.zeros(3, 1, 16, 16)
    target[0, 0, :12, :12] = 1  # a big lesion (144 px)
    target[1, 0, 7:9, 7:9] = 1  # a small one (4 px)
    logits = torch.where(target > 0, 3.0, -3.0)  # confident and right on the lesions
    logits[2, 0, 0, 0] = 3.0  # one false-positive pixel on the empty image
    logits[1, 0, 7, 7] = -3.0  # one missed pixel of the small lesion
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
    per_image = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    over_batch = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert torch.isclose(LOSSES["dice_bce"](logits, target), bce + (1 - per_image).mean())
    assert torch.isclose(LOSSES["batch_dice_bce"](logits, target), bce + 1 - over_batch)
    assert torch.isclose(LOSSES["lesion_dice_bce"](logits, target), bce + (1 - per_image[:2]).mean())
    # the small lesion's missed pixel weighs more in the lesion-image Dice term than over the batch
    hit = logits.clone()
    hit[1, 0, 7, 7] = 3.0
    cost = {name: LOSSES[name](logits, target) - LOSSES[name](hit, target) for name in ("lesion_dice_bce", "batch_dice_bce")}
    assert cost["lesion_dice_bce"] > 3 * cost["batch_dice_bce"] > 0
    # a batch of empty images: BCE alone, no Dice term
    empty = torch.zeros(2, 1, 8, 8)
    assert torch.isclose(LOSSES["lesion_dice_bce"](torch.full_like(empty, -2.0), empty),
                         torch.nn.functional.binary_cross_entropy_with_logits(torch.full_like(empty, -2.0), empty))


def test_fit_needs_labelled_images(isic64):
    with pytest.raises(AlsegError, match="no labelled"):
        fit(UNet(ModelConfig(width=4, depth=3)), isic64.images[:0], isic64.masks[:0], None, None,
            TrainConfig(epochs=1, device="cpu"), Normalizer((0.5,) * 3, (0.2,) * 3), size=64)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AlsegError, match="checkpoint"):
        Checkpoint.load(bad)


def test_empty_ratio_draws_every_lesion_image_and_fresh_empty_ones():
    from alseg.train import _epoch_subset, epoch_rows

    lesion = np.array([True] * 5 + [False] * 20)
    assert epoch_rows(lesion, None) == 25 and epoch_rows(lesion, 1.0) == 10 and epoch_rows(lesion, 0.0) == 5
    assert epoch_rows(lesion, 10.0) == 25 and epoch_rows(np.zeros(4, bool), 1.0) == 4
    gen = torch.Generator().manual_seed(0)
    assert _epoch_subset(lesion, None, gen) is None
    draws = [_epoch_subset(lesion, 2.0, gen).tolist() for _ in range(3)]
    for rows in draws:
        assert len(rows) == 15 and set(range(5)) <= set(rows) and len(set(rows)) == 15
    assert len({tuple(r) for r in draws}) == 3  # another draw of empty images each epoch
    with pytest.raises(AlsegError, match="empty_ratio"):
        TrainConfig(empty_ratio=-1)


def test_validation_per_volume_picks_on_volume_dice(isic64):
    """With val_volumes the recorded validation figure is the mean 3D Dice of the groups."""
    from alseg.metrics import per_volume_scores
    from alseg.train import validation_dice

    truth = np.asarray(isic64.masks[:6]) > 0
    pred = truth.copy()
    pred[0] = ~pred[0]  # one slice of volume "a" wrong
    groups, where = ["a", "a", "a", "b", "b", "b"], [0, 1, 2, 0, 1, 2]
    expected = np.mean([v.dice for v in per_volume_scores(pred, truth, groups, where).values()])
    assert validation_dice(pred, truth, (groups, where)) == pytest.approx(expected)
    assert validation_dice(pred, truth, (groups, where)) != pytest.approx(validation_dice(pred, truth))
    seed_everything(0)
    model = UNet(ModelConfig(width=4, depth=3, dropout=0.1))
    norm = Normalizer.fit(isic64.images[:16])
    result = fit(model, isic64.images[6:22], isic64.masks[6:22], isic64.images[:6], isic64.masks[:6],
                 TrainConfig(epochs=1, batch_size=8, device="cpu", empty_ratio=1.0), norm, size=64,
                 val_volumes=(groups, where))
    probs = predict_probs(model, np.asarray(isic64.images[:6]), norm)
    assert result["history"][0]["val_dice"] == pytest.approx(validation_dice(probs > 0.5, truth, (groups, where)))


def test_weight_average_keeps_the_moving_average_of_every_steps_weights(isic64, tmp_path):
    """With train.weight_average = d the kept and saved weights are e_1 = w_1, e_t = d e_(t-1) +
    (1 - d) w_t over the weights after each optimiser step (batch-norm statistics too), each epoch
    validates them, and the caller's model ends holding them; off, the last step's weights."""
    seed_everything(0)
    model = UNet(ModelConfig(width=4, depth=3, dropout=0.1))
    norm = Normalizer.fit(isic64.images[:16])
    steps = []
    config = TrainConfig(epochs=2, batch_size=8, lr=2e-3, device="cpu", min_epoch_steps=3, weight_average=0.7)
    result = fit(model, isic64.images[:16], isic64.masks[:16], isic64.images[16:22], isic64.masks[16:22], config, norm,
                 size=64, checkpoint_dir=tmp_path,
                 on_batch=lambda *_: steps.append({k: v.detach().clone() for k, v in model.state_dict().items()}))
    assert len(steps) == 6 == result["steps"]
    floats = [k for k, v in steps[0].items() if v.is_floating_point()]
    expected = dict(steps[0])
    for w in steps[1:]:
        expected = {k: 0.7 * expected[k] + 0.3 * w[k] if k in floats else w[k] for k in expected}
    last = Checkpoint.load(tmp_path / "last.pt").model.state_dict()
    assert all(torch.allclose(last[k], expected[k], atol=1e-6) for k in floats)
    assert not all(torch.allclose(last[k], steps[-1][k], atol=1e-4) for k in floats)  # not the last step's
    assert all(torch.equal(model.state_dict()[k], last[k]) for k in floats)
    best = Checkpoint.load(tmp_path / "best.pt")
    again = predict_probs(best.model, np.asarray(isic64.images[16:22]), norm)
    assert dice_per_image(again > 0.5, isic64.masks[16:22] > 0).mean() == pytest.approx(best.meta["val_dice"])
    seed_everything(0)
    plain = UNet(ModelConfig(width=4, depth=3, dropout=0.1))
    steps.clear()
    fit(plain, isic64.images[:16], isic64.masks[:16], None, None, TrainConfig(**{**config.to_dict(), "weight_average": None}),
        norm, size=64, checkpoint_dir=tmp_path / "off",
        on_batch=lambda *_: steps.append({k: v.detach().clone() for k, v in plain.state_dict().items()}))
    off = Checkpoint.load(tmp_path / "off" / "last.pt").model.state_dict()
    assert all(torch.equal(off[k], steps[-1][k]) for k in floats)  # off: the last step's weights
    for bad in (0, 1, 1.5):
        with pytest.raises(AlsegError, match="weight_average"):
            TrainConfig(weight_average=bad)


def test_patches_are_crops_a_third_on_the_lesion_and_the_model_still_sees_whole_images(isic64, tmp_path, monkeypatch):
    """train.patch_size: each training image is a random crop of the working-size image, a third of
    them centred on a lesion pixel; validation and the kept checkpoint work on whole images."""
    from alseg.train import PATCH_FOREGROUND, crop_patches

    n, side, size = 600, 64, 16
    x = torch.arange(side * side, dtype=torch.int32).view(1, side, side, 1).repeat(n, 1, 1, 3)
    y = torch.zeros(n, side, side, dtype=torch.uint8)
    y[:, 60, 2] = 1  # one lesion pixel in a corner: a uniform crop rarely holds it
    xc, yc = crop_patches(x, y, size, torch.Generator().manual_seed(0))
    assert xc.shape == (n, size, size, 3) and yc.shape == (n, size, size)
    tops, lefts = xc[:, 0, 0, 0] // side, xc[:, 0, 0, 0] % side
    for i in range(0, n, 37):  # each crop is the image's pixels at one offset, image and mask alike
        t, l = int(tops[i]), int(lefts[i])
        assert torch.equal(xc[i], x[i, t:t + size, l:l + size]) and torch.equal(yc[i], y[i, t:t + size, l:l + size])
    holding = yc.flatten(1).any(1).float().mean().item()
    # a uniform crop holds the pixel with probability 4/49 x 3/49 (0.005): about a third do here
    assert PATCH_FOREGROUND - 0.06 < holding < PATCH_FOREGROUND + 0.06
    # the generator is drawn alike whatever the masks hold (ranks stay in step), and a seed repeats
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    crop_patches(x[:8], y[:8], size, g1)
    crop_patches(x[:8], torch.zeros_like(y[:8]), size, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert torch.equal(crop_patches(x[:8], y[:8], size, torch.Generator().manual_seed(5))[0],
                       crop_patches(x[:8], y[:8], size, torch.Generator().manual_seed(5))[0])
    whole = x[:2]
    assert crop_patches(whole, y[:2], side, torch.Generator())[0] is whole  # no larger than the patch: whole
    with pytest.raises(AlsegError, match="patch_size"):
        TrainConfig(patch_size=20)
    # a fit on 32 px patches of 64 px images trains on the crops, validates and keeps a model for
    # whole 64 px images
    import alseg.train as train_module

    trained_on = []

    def watched(*args):
        out = crop_patches(*args)
        trained_on.append(tuple(out[0].shape[1:3]))
        return out

    monkeypatch.setattr(train_module, "crop_patches", watched)
    seed_everything(0)
    model = UNet(ModelConfig(width=4, depth=3, dropout=0.1))
    norm = Normalizer.fit(isic64.images[:32])
    result = fit(model, isic64.images[:32], isic64.masks[:32], isic64.images[32:40], isic64.masks[32:40],
                 TrainConfig(epochs=2, batch_size=8, device="cpu", patch_size=32), norm, size=64,
                 checkpoint_dir=tmp_path)
    best = Checkpoint.load(tmp_path / "best.pt")
    probs = predict_probs(best.model, np.asarray(isic64.images[32:40]), best.normalizer)
    assert trained_on == [(32, 32)] * result["steps"]  # every step, on crops
    assert probs.shape == (8, 64, 64) and best.size == 64
    assert result["best_val_dice"] == pytest.approx(dice_per_image(probs > 0.5, isic64.masks[32:40] > 0).mean())
