"""Supervised fitting of the U-Net: loss, on-device augmentation, per-epoch validation, checkpoints.

Loss: soft Dice (per image, smoothed by 1) + binary cross-entropy on the logits, equally
weighted: Dice alone is unstable on small lesions early in training, BCE alone under-segments.
Optimiser: Adam. Augmentation runs on whole batches on the training device: random horizontal
and vertical flips, a rotation of up to +-15 degrees and a scale of 0.9-1.1 (one affine warp,
reflected borders), and brightness/contrast jitter of +-10 %. With ``train.patch_size`` each
image of a batch is first cut to a random crop (:func:`crop_patches`, a third on the lesion).

Validation each epoch predicts the validation images deterministically (dropout off) and keeps
the checkpoint with the best mean Dice (``best.pt``) beside the latest (``last.pt``), both
written atomically.

In a process group (:mod:`alseg.distributed`) :func:`fit` is a collective step: rank 0 announces
it, every rank trains a DistributedDataParallel copy on every world-th image of each batch, and
only rank 0 writes checkpoints and calls back.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from alseg import distributed
from alseg.errors import AlsegError
from alseg.metrics import dice_per_image, per_volume_scores
from alseg.model import ModelConfig, UNet, pass_generators, seeded_dropout
from alseg.runtime import Normalizer, autocast, resolve_device, resolve_precision, to_unit
from alseg.stats import epoch_score
from alseg.store import atomic_torch_save

CHECKPOINT_VERSION = 1
TRAIN_KEYS = 1 << 32  # dropout keys of training rows start here (MC scoring's are image indices)


@dataclass
class TrainConfig:
    epochs: int = 20
    # The full-supervision reference (`alseg train --full`, `alseg compare --full`) trains on the
    # whole train split, ~2.7x the images of round 0, and may need more epochs to converge than
    # round 0 (measured for quick-lgg); None: the same as `epochs`.
    full_epochs: int | None = None
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    augment: bool = True
    # "standard": the ranges in the module docstring; "strong": wider ones for few labels (rotation
    # +-45 degrees, scale 0.8-1.25, brightness and contrast +-20 %, gamma 0.7-1.4, colour balance +-10 %).
    augment_strength: str = "standard"
    # A floor in optimiser steps, whatever the labelled set's size: each epoch takes at least this
    # many batches (from successive shuffles), so 16 images at batch 8 get 20 steps an epoch, not 2;
    # a fit of E epochs takes at least E x min_epoch_steps. 0: one pass an epoch.
    min_epoch_steps: int = 0
    # Optimiser steps of the whole fit, whatever the number of images (None: epochs x steps per
    # epoch as above). Spread over the epochs as evenly as whole steps allow (the first epochs take
    # the extra ones); min_epoch_steps then does not apply. An epoch's batches come from successive
    # shuffles, as under the floor, or from one shuffle's first rows when it has fewer batches than
    # one pass. How `active.round_steps` gives every strategy the same steps per round.
    total_steps: int | None = None
    # Linear learning-rate warm-up over the first warmup_steps optimiser steps of a fit.
    warmup_steps: int = 0
    # "constant" after the warm-up, or "cosine": decayed to lr / 20 by the fit's last step, so that
    # the last epochs settle instead of stepping around at the full rate
    lr_schedule: str = "constant"
    # Whole volumes hold mostly lesion-free slices: each epoch trains on every slice with a lesion
    # and this many lesion-free ones per lesion slice, drawn afresh (None: every slice every epoch).
    empty_ratio: float | None = None
    # Train on random square crops of this many pixels (a multiple of 16) of the working-size
    # images, a third of them centred on a lesion pixel where the image has one (nnU-Net's patches
    # and foreground oversampling): a finer working size at a coarser one's cost per step, for
    # lesions a few pixels across. Validation and prediction see whole images (the recorded
    # training loss and Dice are the crops'). None: whole images.
    patch_size: int | None = None
    # dice_bce (per-image soft Dice + BCE), batch_dice_bce (Dice over the batch + BCE),
    # lesion_dice_bce (per-image Dice over the lesion images only + BCE) or bce
    loss: str = "dice_bce"
    # Decay of an exponential moving average of the weights (and batch-norm statistics), updated
    # after every optimiser step; None: off. With it each epoch validates, keeps and saves the
    # averaged weights, not the last step's, so one unlucky step does not decide the kept model
    # (without validation images the epoch is still ranked by the training Dice of the live weights).
    # Off in every preset: at 0.995 quick-lgg-volume validated lower on 4 seeds of 4 (0.304 against
    # 0.377; docs/benchmarks.md, "A moving average of the weights").
    weight_average: float | None = None
    device: str = "auto"
    # auto: bf16 on CUDA, fp32 on CPU. bf16 trains ~1.75x faster on CPUs with bf16 instructions but
    # reached a lower validation Dice at both quick presets (docs/benchmarks.md, "Training precision").
    precision: str = "auto"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise AlsegError(f"train.loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise AlsegError(f"train.lr_schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.empty_ratio is not None and not self.empty_ratio >= 0:
            raise AlsegError(f"train.empty_ratio must be a number >= 0 or null, not {self.empty_ratio!r}")
        check_total_steps(self.total_steps, self.epochs, "train.total_steps", "train.epochs")
        if self.patch_size is not None and not (isinstance(self.patch_size, int) and not isinstance(self.patch_size, bool)
                                                and self.patch_size >= 16 and self.patch_size % 16 == 0):
            raise AlsegError(f"train.patch_size must be null or a multiple of 16, as a working size is, "
                             f"not {self.patch_size!r}")
        if self.weight_average is not None and not 0 < self.weight_average < 1:
            raise AlsegError(f"train.weight_average must be null or a decay between 0 and 1, not {self.weight_average!r}")

    @property
    def reference_epochs(self) -> int:
        """Epochs the full-supervision reference trains."""
        return self.full_epochs or self.epochs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Checkpoint:
    """A trained model with what it needs to be applied: input normalisation and working size."""

    model: UNet
    normalizer: Normalizer
    size: int
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path, **extra) -> None:
        atomic_torch_save({
            "version": CHECKPOINT_VERSION,
            "model_config": self.model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "normalizer": self.normalizer.to_dict(),
            "size": self.size,
            "meta": {**self.meta, **extra},
        }, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Checkpoint":
        path = Path(path)
        if not path.is_file():
            raise AlsegError("checkpoint not found", path)
        try:
            blob = torch.load(path, map_location=device, weights_only=True)
            model = UNet(ModelConfig(**blob["model_config"]))
            model.load_state_dict(blob["state_dict"])
            normalizer, size = Normalizer.from_dict(blob["normalizer"]), int(blob["size"])
        except AlsegError:
            raise
        except Exception as exc:  # torch.load and a foreign file can fail in many ways; all mean "not ours"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
            raise AlsegError(f"not a readable alseg checkpoint ({reason})", path) from None
        return cls(model.to(device), normalizer, size, blob.get("meta", {}))


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice per image (smoothed by 1), averaged over the batch."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + (1 - dice).mean()


def batch_dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over the whole batch as one volume (nnU-Net's batch Dice): a small lesion is
    not one image's whole Dice term, and an empty mask does not pull its image toward 1 on its own."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + (1 - dice)


def lesion_dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over every image + soft Dice per image over the images with a lesion only (smoothed by
    1): each lesion slice weighs the same in the Dice term however small its lesion, which batch
    Dice does not give, and a lesion-free slice is left to BCE, so it does not pull every pixel of
    its own image toward 0 as per-image Dice does."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
    has = (t.sum(1) > 0).float()  # a weight, not a filter: no wait on the device to count them
    dice = (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + ((1 - dice) * has).sum() / has.sum().clamp_min(1)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target)


LOSSES = {"dice_bce": dice_bce_loss, "batch_dice_bce": batch_dice_bce_loss, "lesion_dice_bce": lesion_dice_bce_loss,
          "bce": bce_loss}


AUGMENT_RANGES = {  # rotation (degrees), scale, contrast and brightness (+-), gamma, per-channel gain (+-)
    "standard": {"rotate": 15, "scale": (0.9, 1.1), "contrast": 0.1, "brightness": 0.1, "gamma": None, "gain": 0.0},
    "strong": {"rotate": 45, "scale": (0.8, 1.25), "contrast": 0.2, "brightness": 0.2, "gamma": (0.7, 1.4),
               "gain": 0.1},
}


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
            strength: str = "standard") -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, rotation/scale and intensity jitter of a batch ``x`` (N,C,H,W) in [0,1], ``y`` (N,1,H,W)."""
    if strength not in AUGMENT_RANGES:
        raise AlsegError(f"train.augment_strength must be one of {', '.join(AUGMENT_RANGES)}, not {strength!r}")
    r = AUGMENT_RANGES[strength]
    n, dev = x.shape[0], x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen, device=gen.device) * (hi - lo) + lo).to(dev)

    flip_h = u(0, 1) < 0.5
    flip_v = u(0, 1) < 0.5
    x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(-1), x)
    y = torch.where(flip_h.view(-1, 1, 1, 1), y.flip(-1), y)
    x = torch.where(flip_v.view(-1, 1, 1, 1), x.flip(-2), x)
    y = torch.where(flip_v.view(-1, 1, 1, 1), y.flip(-2), y)
    angle = u(-r["rotate"], r["rotate"]) * math.pi / 180
    scale = u(*r["scale"])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="reflection", align_corners=False) > 0.5).float()
    contrast = u(1 - r["contrast"], 1 + r["contrast"]).view(-1, 1, 1, 1)
    brightness = u(-r["brightness"], r["brightness"]).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness).clamp(0, 1)
    if r["gamma"] is not None:
        x = x.clamp_min(1e-6) ** u(*r["gamma"]).view(-1, 1, 1, 1)
    if r["gain"] and x.shape[1] > 1:  # colour balance: one gain per channel and image
        gain = torch.stack([u(1 - r["gain"], 1 + r["gain"]) for _ in range(x.shape[1])], 1).view(n, -1, 1, 1)
        x = (x * gain).clamp(0, 1)
    return x, y


@torch.no_grad()
def predict_probs(model: UNet, images: np.ndarray, normalizer: Normalizer, *, device: torch.device | str = "cpu",
                  precision: str = "auto", batch_size: int = 16) -> np.ndarray:
    """Deterministic foreground probabilities (dropout off) for ``(N, S, S, C)`` uint8 images."""
    device = torch.device(device) if isinstance(device, str) else device
    dtype = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    out = np.empty(images.shape[:3], np.float32)
    try:
        for start in range(0, len(images), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
            with autocast(device, dtype):
                logits = model(normalizer(xb))
            out[start:start + len(xb)] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    finally:
        model.train(was_training)
    return out


EpochCallback = Callable[[dict], None]
BatchCallback = Callable[[int, int], None]


@distributed.collective
def fit(model: UNet, train_images: np.ndarray, train_masks: np.ndarray, val_images: np.ndarray | None,
        val_masks: np.ndarray | None, config: TrainConfig, normalizer: Normalizer, *, size: int,
        checkpoint_dir: str | Path | None = None, on_epoch: EpochCallback | None = None,
        on_batch: BatchCallback | None = None, checkpoint_meta: dict | None = None, seed: int = 0,
        val_volumes: tuple | None = None) -> dict:
    """Train ``model`` in place on uint8 ``train_images`` (N, S, S, C) and {0, 1} ``train_masks``.

    Validates on ``val_images`` each epoch (dropout off): the mean Dice per image or, with
    ``val_volumes`` = (group, slice position) of each validation image, the mean 3D Dice per
    volume (:func:`alseg.metrics.per_volume_scores`); without them the training Dice picks the
    best epoch. Returns ``{"history": [...], "best_val_dice", "best_epoch", "steps"}`` (optimiser
    steps taken: :func:`epoch_plan`'s sum). With ``checkpoint_dir``
    it writes ``best.pt`` and ``last.pt`` there. With ``config.weight_average`` the averaged
    weights are what each epoch validates and saves, and what ``model`` holds at the end.
    """
    if len(train_images) == 0:
        raise AlsegError("no labelled training images to fit on")
    distributed.announce("fit", lambda: {
        "model_config": model.config, "train_images": np.asarray(train_images), "train_masks": np.asarray(train_masks),
        "val_images": None if val_images is None else np.asarray(val_images),
        "val_masks": None if val_masks is None else np.asarray(val_masks),
        "config": config, "normalizer": normalizer, "size": size, "seed": seed, "val_volumes": val_volumes})
    rank, world = distributed.rank_and_world()
    writer = rank == 0
    device = distributed.local_device(resolve_device(config.device))
    dtype = resolve_precision(config.precision, device)
    model.to(device)
    if device.type == "cpu":  # 10-17 % faster training steps on the CPU (docs/benchmarks.md, "Training speed")
        model.to(memory_format=torch.channels_last)
    net = model
    if world > 1:  # rank 0's weights are broadcast here; gradients are averaged over ranks in backward
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # fp16 needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Training pixels live on the device as uint8: a few MB at working size, no loader needed.
    x_all = torch.from_numpy(np.ascontiguousarray(train_images)).to(device)
    y_all = torch.from_numpy(np.ascontiguousarray(train_masks)).to(device)
    if val_images is not None and len(val_images) == 0:
        val_images = None
    best_val_dice = -1.0
    history: list[dict] = []
    best_epoch = None
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir and writer else None
    lesion = y_all.flatten(1).any(1).cpu().numpy()
    plan = epoch_plan(epoch_rows(lesion, config.empty_ratio), config)
    schedule = _Schedule(opt, config, sum(plan))
    averaged = None if config.weight_average is None else torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.weight_average), use_buffers=True)
    kept = model if averaged is None else averaged.module  # what is validated, kept and saved
    after_step = None if averaged is None else lambda: averaged.update_parameters(model)
    for epoch, steps in enumerate(plan, start=1):
        t0 = time.perf_counter()
        model.train()
        rows = _epoch_subset(lesion, config.empty_ratio, gen)
        xs, ys = (x_all, y_all) if rows is None else (x_all[rows.to(device)], y_all[rows.to(device)])
        loss_sum, dices = _train_epoch(net, opt, scaler, xs, ys, config, normalizer, gen,
                                       (device, dtype), (rank, world), on_batch, steps, schedule,
                                       (seed, sum(plan[:epoch - 1])), after_step)
        if world > 1:
            shares = distributed.all_gather((loss_sum, dices))
            loss_sum, dices = sum(s[0] for s in shares), [d for s in shares for d in s[1]]
        record = {"epoch": epoch, "train_loss": loss_sum / len(dices), "train_dice": float(np.mean(dices)),
                  "val_dice": None, "lr": schedule.lr, "steps": steps}
        if val_images is not None:  # every rank holds the same weights: each validates, none waits
            probs = predict_probs(kept, np.asarray(val_images), normalizer, device=device, precision=config.precision)
            record["val_dice"] = validation_dice(probs > 0.5, np.asarray(val_masks) > 0, val_volumes)
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        score = epoch_score(record)
        ckpt = Checkpoint(kept, normalizer, size, dict(checkpoint_meta or {}))
        if score > best_val_dice:
            best_val_dice, best_epoch = score, epoch
            if ckpt_dir:
                ckpt.save(ckpt_dir / "best.pt", epoch=epoch, val_dice=record["val_dice"], train_config=config.to_dict())
        if ckpt_dir:
            ckpt.save(ckpt_dir / "last.pt", epoch=epoch, val_dice=record["val_dice"], train_config=config.to_dict())
        if on_epoch and writer:
            on_epoch(record)
    if averaged is not None:  # the caller's model ends as last.pt does: averaged
        model.load_state_dict(averaged.module.state_dict())
    return {"history": history, "best_val_dice": best_val_dice, "best_epoch": best_epoch, "steps": schedule.step}


def validation_dice(pred: np.ndarray, truth: np.ndarray, volumes: tuple | None = None) -> float:
    """Mean Dice per image, or with ``volumes`` = (groups, slice positions) mean 3D Dice per volume."""
    if volumes is None:
        return float(dice_per_image(pred, truth).mean())
    groups, where = volumes
    scores = per_volume_scores(pred, truth, list(groups), list(where))
    return float(np.mean([v.dice for v in scores.values()]))


def epoch_rows(lesion: np.ndarray, empty_ratio: float | None) -> int:
    """Images an epoch trains on: all, or every lesion image and ``empty_ratio`` empty ones per lesion image."""
    n_lesion = int(lesion.sum())
    if empty_ratio is None or n_lesion == 0:
        return len(lesion)
    return n_lesion + min(len(lesion) - n_lesion, round(empty_ratio * n_lesion))


def _epoch_subset(lesion: np.ndarray, empty_ratio: float | None, gen: torch.Generator) -> torch.Tensor | None:
    """This epoch's rows: None for every row, or the lesion rows and a fresh draw of empty ones
    (the same on every rank: the generator is)."""
    n_rows = epoch_rows(lesion, empty_ratio)
    if n_rows == len(lesion):
        return None
    lesion_rows = torch.from_numpy(np.flatnonzero(lesion))
    empty_rows = torch.from_numpy(np.flatnonzero(~lesion))
    drawn = empty_rows[torch.randperm(len(empty_rows), generator=gen)[:n_rows - len(lesion_rows)]]
    return torch.cat([lesion_rows, drawn.sort().values])


def epoch_steps(n: int, config: TrainConfig) -> int:
    """Optimiser steps per epoch on ``n`` images: one pass, or more to meet ``config.min_epoch_steps``."""
    return max(math.ceil(n / config.batch_size), config.min_epoch_steps)


def check_total_steps(steps, epochs: int, name: str, epochs_name: str) -> None:
    """A fixed number of optimiser steps over ``epochs`` epochs (``train.total_steps``,
    ``active.round_steps``): null, or a whole number of at least one step an epoch."""
    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool)
                                  and steps >= max(1, epochs)):
        raise AlsegError(f"{name} must be null or a whole number >= {epochs_name} ({epochs}: every epoch trains "
                         f"at least one batch), not {steps!r}")


def epoch_plan(n: int, config: TrainConfig) -> list[int]:
    """Optimiser steps of each epoch of a fit on ``n`` images: :func:`epoch_steps` each, or
    ``config.total_steps`` spread over the epochs (the first ``total % epochs`` take one more)."""
    if config.total_steps is None:
        return [epoch_steps(n, config)] * config.epochs
    each, extra = divmod(config.total_steps, config.epochs)
    return [each + (1 if e < extra else 0) for e in range(config.epochs)]


class _Schedule:
    """The learning rate of each optimiser step: linear warm-up to ``config.lr``, then constant or
    a cosine down to ``config.lr / 20`` at step ``total``."""

    FLOOR = 0.05

    def __init__(self, opt, config: TrainConfig, total: int):
        self.opt, self.config, self.step, self.total = opt, config, 0, max(1, total)
        self.lr = config.lr

    def advance(self) -> None:
        """Set the rate of the step about to be taken."""
        warm = self.config.warmup_steps
        self.step += 1
        factor = min(1.0, self.step / warm) if warm > 0 else 1.0
        if self.config.lr_schedule == "cosine" and self.step > warm:
            done = (self.step - warm) / max(1, self.total - warm)
            factor = self.FLOOR + (1 - self.FLOOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        self.lr = self.config.lr * factor
        for group in self.opt.param_groups:
            group["lr"] = self.lr


def _batch_order(n: int, steps: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Image indices for an epoch's batches: one shuffle (the last batch may be short) or, when the
    epoch asks for more or fewer batches than one pass (the step floor, ``total_steps``), successive
    shuffles cut into full batches (fewer: the first rows of one shuffle)."""
    if steps == math.ceil(n / batch_size):
        return torch.randperm(n, generator=gen)
    shuffles = math.ceil(steps * batch_size / n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(shuffles)])[:steps * batch_size]


PATCH_FOREGROUND = 1 / 3  # nnU-Net's share of patches forced onto the foreground


def crop_patches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``size`` x ``size`` crops of a batch of square images ``x`` (N, S, S, C) and masks ``y``
    (N, S, S): each crop is placed uniformly, or with probability :data:`PATCH_FOREGROUND` centred
    (as far as the border allows) on a random lesion pixel of its mask when it has one. The
    generator is drawn the same number of times whatever the masks hold, so every rank of a
    process group crops alike. Images no larger than ``size`` are returned whole."""
    n, side = x.shape[0], x.shape[1]
    if x.shape[2] != side:
        raise ValueError(f"crop_patches takes square images, not {tuple(x.shape[1:3])}")
    if size >= side:
        return x, y
    room = side - size
    on_lesion = torch.rand(n, generator=gen) < PATCH_FOREGROUND
    anywhere = torch.randint(0, room + 1, (n, 2), generator=gen)
    which = torch.rand(n, generator=gen)
    xs, ys = [], []
    for i in range(n):
        top, left = int(anywhere[i, 0]), int(anywhere[i, 1])
        if on_lesion[i]:
            lesion = torch.nonzero(y[i]).cpu()
            if len(lesion):
                r, c = lesion[min(int(which[i] * len(lesion)), len(lesion) - 1)].tolist()
                top, left = min(max(r - size // 2, 0), room), min(max(c - size // 2, 0), room)
        xs.append(x[i, top:top + size, left:left + size])
        ys.append(y[i, top:top + size, left:left + size])
    return torch.stack(xs), torch.stack(ys)


def _train_epoch(net, opt, scaler, x_all: torch.Tensor, y_all: torch.Tensor, config: TrainConfig,
                 normalizer: Normalizer, gen: torch.Generator, where: tuple, ranks: tuple[int, int],
                 on_batch: BatchCallback | None, steps: int, schedule: _Schedule,
                 dropout: tuple[int, int], after_step: Callable[[], None] | None = None) -> tuple[float, list[float]]:
    """``steps`` batches of the training images; this rank's loss sum and per-image train Dice.

    ``dropout`` = (seed, steps before this epoch): row ``j`` of the whole batch of global step ``t``
    draws its dropout masks from a generator seeded by (seed, j, t), whichever rank trains it, so a
    run trains the same in any number of processes, up to float rounding of the gradient sum (and
    but for the losses whose Dice term spans images, batch_dice_bce and lesion_dice_bce: each rank
    takes it over its own share of the batch).
    ``after_step`` is called after each optimiser step (the weight average's update)."""
    (device, dtype), (rank, world) = where, ranks
    dropout_seed, steps_before = dropout
    order = _batch_order(len(x_all), steps, config.batch_size, gen)
    loss_sum, dices = 0.0, []
    for step in range(steps):
        schedule.advance()
        idx = order[step * config.batch_size:(step + 1) * config.batch_size].to(device)
        xb, yb = x_all[idx], y_all[idx]
        if config.patch_size is not None:
            xb, yb = crop_patches(xb, yb, config.patch_size, gen)
        xb = to_unit(xb)
        yb = yb.unsqueeze(1).float()
        if config.augment:  # the whole batch on every rank: the generator stays in step everywhere
            xb, yb = augment(xb, yb, gen, config.augment_strength)
        rows = torch.arange(len(xb))
        xb, yb, weight = _rank_share(xb, yb, rank, world)
        rows = _rank_share(rows, rows, rank, world)[0]
        xb = normalizer.standardize(xb)
        if device.type == "cpu":
            xb = xb.contiguous(memory_format=torch.channels_last)
        # keys past 2^32 keep training's streams apart from MC scoring's (keyed by image index)
        generators = pass_generators(dropout_seed, (TRAIN_KEYS + int(r) for r in rows), steps_before + step, device)
        with autocast(device, dtype), seeded_dropout(generators):
            logits = net(xb)
        loss = LOSSES[config.loss](logits, yb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss * weight).backward()
        scaler.step(opt)
        scaler.update()
        if after_step:
            after_step()
        if weight:
            loss_sum += float(loss.detach()) * len(xb)
            pred = (logits.detach().float() > 0).cpu().numpy()[:, 0]
            dices.extend(dice_per_image(pred, yb.cpu().numpy()[:, 0] > 0.5))
        if on_batch:
            on_batch(step + 1, steps)
    return loss_sum, dices


def _rank_share(xb: torch.Tensor, yb: torch.Tensor, rank: int, world: int):
    """This rank's rows of a batch (every world-th) and its loss weight: DDP averages gradients over
    ranks, so weighting each rank's mean loss by rows * world / batch gives the whole batch's mean.
    A rank left without rows runs one with weight 0, so that it still joins the gradient all-reduce."""
    if world == 1:
        return xb, yb, 1.0
    rows = slice(rank, None, world)
    x_share, y_share = xb[rows], yb[rows]
    if len(x_share) == 0:
        return xb[:1], yb[:1], 0.0
    return x_share, y_share, len(x_share) * world / len(xb)


@distributed.handler("fit")
def _serve_fit(payload: dict) -> None:
    fit(UNet(payload["model_config"]), payload["train_images"], payload["train_masks"], payload["val_images"],
        payload["val_masks"], payload["config"], payload["normalizer"], size=payload["size"], seed=payload["seed"],
        val_volumes=payload["val_volumes"])
