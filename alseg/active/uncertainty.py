"""The Monte Carlo dropout engine: T stochastic passes, streamed, and the per-image scores.

For each image, T forward passes with dropout active (normalisation layers in eval mode)
give foreground probabilities p_1..p_T per pixel. From running statistics (Welford's update,
so memory is bounded by one batch of maps, never by the pool or by T) we compute per pixel:

* the MC mean p_bar and the **variance** of the T probabilities (the uncertainty map);
* the **entropy** of the mean, H(p_bar), with H the two-class (foreground/background) entropy
  H(p) = -p ln p - (1 - p) ln(1 - p);
* **BALD** (mutual information) H(p_bar) - mean_t H(p_t).

Each image's scores are the sums of these maps over its pixels; ``variance`` is the paper's
uncertainty score. ``weighting="edt"`` multiplies the variance map by the distance transform
of the *thresholded* MC-mean mask, scaled to [0, 1] (the published CEAL code's option, which
wrongly used a soft output there); with no predicted foreground the weight is zero.

Encoder levels without dropout (``dropout_scope`` ``decoder`` or ``bottleneck``) give the same
output in every pass: they run once per batch and only the stochastic rest runs T times, with
the same result as T whole passes.

Each image's dropout masks are seeded by (seed, image, pass), so results are deterministic for a
seed and the same, up to float rounding, whatever the batch size or number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from alseg import distributed
from alseg.errors import AlsegError
from alseg.metrics import dice_per_image
from alseg.model import UNet, pass_generators, pass_seed, seeded_dropout, set_mc_dropout  # noqa: F401 (pass_seed: API)
from alseg.progress import SILENT, Reporter
from alseg.runtime import Normalizer, autocast, resolve_precision

SCORE_NAMES = ("variance", "entropy", "bald")
_EPS = 1e-6


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def mc_precision(precision: str, device: torch.device) -> str:
    """``auto`` for MC passes: bf16 on CUDA and on CPUs with bf16 instructions, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "auto"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


@dataclass
class McResult:
    """Per-image scores (aligned with the indices scored) and, on request, per-pixel maps."""

    indices: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray
    bald: np.ndarray
    mean: np.ndarray | None = None       # (N, S, S) float32 MC-mean probability
    variance_map: np.ndarray | None = None
    dice: np.ndarray | None = None       # Dice of the thresholded MC mean, when masks were given
    foreground: np.ndarray | None = None  # pixels of the thresholded MC mean (0: the model sees nothing)
    packed_masks: np.ndarray | None = None  # (N, ceil(S*S/8)) the thresholded MC mean, bit-packed

    def scores(self) -> dict[str, np.ndarray]:
        return {**{name: getattr(self, name) for name in SCORE_NAMES}, "foreground": self.foreground}

    def masks(self, positions) -> np.ndarray:
        """(k, S, S) uint8 thresholded MC means of the images at ``positions`` (of ``indices``)."""
        if self.packed_masks is None:
            raise ValueError("scored without keep_masks")
        size = int(round(np.sqrt(self.packed_masks.shape[1] * 8)))
        rows = self.packed_masks[np.asarray(positions, np.int64)]
        return np.unpackbits(rows, axis=1, count=None)[:, : size * size].reshape(-1, size, size)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_EPS, 1 - _EPS)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def edt_weight(mask: np.ndarray) -> np.ndarray:
    """Distance transform of a binary mask scaled to [0, 1] (zero where nothing is predicted)."""
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    d = distance_transform_edt(mask).astype(np.float32)
    return d / d.max()


_FIELDS = (*SCORE_NAMES, "foreground")


@distributed.collective
@torch.no_grad()
def mc_dropout(model: UNet, images: np.ndarray, indices, normalizer: Normalizer, *, passes: int = 20,
               batch_size: int = 16, device: torch.device | str = "cpu", precision: str = "auto", seed: int = 0,
               weighting: str = "none", keep_maps: bool = False, keep_masks: bool = False,
               masks: np.ndarray | None = None, reporter: Reporter = SILENT) -> McResult:
    """Run ``passes`` dropout-on forward passes over ``images[indices]`` and score each image.

    Image ``images[k]``'s dropout masks in pass ``t`` come from a generator seeded with
    :func:`pass_seed` ``(seed, k, t)``: scores do not depend on the batch size or on how the pool
    is shared out. In a process group (:mod:`alseg.distributed`) each rank scores every
    world-th image and the results are gathered, in order, on every rank.

    With ``masks`` (aligned with ``images``) it also returns each image's Dice of the thresholded
    MC mean, for the uncertainty-vs-Dice figure; the simulated oracle knows them, a human one not.
    ``keep_masks`` keeps every image's thresholded MC mean, bit-packed (S*S/8 bytes an image): the
    pseudo-labels are taken from the very pass that scored and selected them.
    """
    if passes < 2:
        raise AlsegError(f"MC dropout needs at least 2 passes, got {passes}")
    if weighting not in ("none", "edt"):
        raise AlsegError("weighting must be 'none' or 'edt'")
    indices = np.asarray(indices, dtype=np.int64)
    device = distributed.local_device(torch.device(device) if isinstance(device, str) else device)
    options = dict(passes=passes, batch_size=batch_size, precision=precision, seed=seed, weighting=weighting,
                   keep_maps=keep_maps, keep_masks=keep_masks)

    def share(rank: int, world: int) -> dict:  # a serving rank gets only the images it scores
        keys = indices[rank::world]
        return {"keys": keys, "images": np.asarray(images[keys]),
                "masks": None if masks is None else np.asarray(masks[keys])}

    distributed.announce("mc", lambda: {
        "model_config": model.config, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "normalizer": normalizer, "device": device.type, "total": len(indices), "options": options}, share)
    rank, world = distributed.rank_and_world()
    part = _mc_shard(model, images, indices[rank::world], normalizer, device=device, masks=masks, reporter=reporter,
                     total=len(indices), world=world, **options)
    if world == 1:
        return part
    return _interleave(distributed.all_gather(part), indices)


class _Rows:
    """Rows of an image (or mask) array addressed by their keys in the full array: what a serving
    rank receives instead of the whole dataset."""

    def __init__(self, rows: np.ndarray, keys: np.ndarray):
        self.rows, self.shape = rows, (len(rows), *rows.shape[1:])
        self.position = {int(k): i for i, k in enumerate(keys)}

    def __getitem__(self, keys) -> np.ndarray:
        return self.rows[[self.position[int(k)] for k in np.atleast_1d(keys)]]


@distributed.handler("mc")
@distributed.collective
def _serve_mc(payload: dict) -> None:
    """A serving rank's part of :func:`mc_dropout`: score its share, then join the gather."""
    model = UNet(payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    keys = payload["keys"]
    masks = None if payload["masks"] is None else _Rows(payload["masks"], keys)
    _, world = distributed.rank_and_world()
    part = _mc_shard(model, _Rows(payload["images"], keys), keys, payload["normalizer"],
                     device=distributed.local_device(torch.device(payload["device"])), masks=masks, reporter=SILENT,
                     total=payload["total"], world=world, **payload["options"])
    distributed.all_gather(part)


def _interleave(parts: list[McResult], indices: np.ndarray) -> McResult:
    """Rank r scored positions r, r + world, ...: put the gathered parts back in ``indices`` order."""
    world = len(parts)
    fields = {}
    for name in ("variance", "entropy", "bald", "mean", "variance_map", "dice", "foreground", "packed_masks"):
        pieces = [getattr(p, name) for p in parts]
        if pieces[0] is None:
            fields[name] = None
            continue
        out = np.empty((len(indices), *pieces[0].shape[1:]), pieces[0].dtype)
        for r, piece in enumerate(pieces):
            out[r::world] = piece
        fields[name] = out
    return McResult(indices, **fields)


@torch.no_grad()
def _mc_shard(model: UNet, images: np.ndarray, indices: np.ndarray, normalizer: Normalizer, *, passes: int,
              batch_size: int, device, precision: str, seed: int, weighting: str, keep_maps: bool,
              keep_masks: bool, masks: np.ndarray | None, reporter: Reporter, total: int, world: int) -> McResult:
    """:func:`mc_dropout` over this process's share of the pool."""
    device = torch.device(device) if isinstance(device, str) else device
    dtype = resolve_precision(mc_precision(precision, device), device)
    n = len(indices)
    size = images.shape[1]
    out = {k: np.zeros(n, np.float64) for k in _FIELDS}
    mean_maps = np.zeros((n, size, size), np.float32) if keep_maps else None
    var_maps = np.zeros((n, size, size), np.float32) if keep_maps else None
    dice = np.zeros(n, np.float64) if masks is not None else None
    packed = np.zeros((n, (size * size + 7) // 8), np.uint8) if keep_masks else None
    was_training = model.training
    set_mc_dropout(model, True)
    model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    fixed_levels = model.deterministic_levels()  # > 0 with dropout_scope "decoder" or "bottleneck"
    # progress counts the whole pool (``total``): this rank's share times the number of ranks
    advance = reporter.stage(f"MC dropout x{passes}", total)
    try:
        for start in range(0, n, batch_size):
            idx = indices[start:start + batch_size]
            x = normalizer(torch.from_numpy(np.ascontiguousarray(images[idx])).to(device))
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            mean = torch.zeros((len(idx), size, size), device=device)
            m2 = torch.zeros_like(mean)
            ent_sum = torch.zeros_like(mean)
            with autocast(device, dtype):
                skips, h = model.encode(x, fixed_levels)  # no dropout there: once, not T times
            for t in range(1, passes + 1):
                with autocast(device, dtype), seeded_dropout(pass_generators(seed, idx, t, device)):
                    logits = model.finish(skips, h)
                p = torch.sigmoid(logits.float())[:, 0]
                delta = p - mean
                mean += delta / t
                m2 += delta * (p - mean)
                ent_sum += binary_entropy(p)
            var = m2 / passes  # population variance of the T probabilities
            h_mean = binary_entropy(mean)
            bald = (h_mean - ent_sum / passes).clamp_min(0)
            var_np = var.cpu().numpy()
            mean_np = mean.cpu().numpy()
            if weighting == "edt":
                var_np = var_np * np.stack([edt_weight(m > 0.5) for m in mean_np])
            sl = slice(start, start + len(idx))
            out["variance"][sl] = var_np.reshape(len(idx), -1).sum(1)
            out["entropy"][sl] = h_mean.flatten(1).sum(1).cpu().numpy()
            out["bald"][sl] = bald.flatten(1).sum(1).cpu().numpy()
            out["foreground"][sl] = (mean_np > 0.5).reshape(len(idx), -1).sum(1)
            if dice is not None:
                dice[sl] = dice_per_image(mean_np > 0.5, np.asarray(masks[idx]) > 0)
            if keep_masks:
                packed[sl] = np.packbits((mean_np > 0.5).reshape(len(idx), -1), axis=1)
            if keep_maps:
                mean_maps[sl] = mean_np
                var_maps[sl] = var_np
            advance(min(total, (start + len(idx)) * world))
    finally:
        reporter.end_stage()
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return McResult(indices, out["variance"], out["entropy"], out["bald"], mean_maps, var_maps, dice,
                    out["foreground"], packed)


@torch.no_grad()
def bottleneck_features(model: UNet, images: np.ndarray, indices, normalizer: Normalizer, *,
                        batch_size: int = 16, device: torch.device | str = "cpu") -> np.ndarray:
    """(N, 16w) the deepest encoder level's activations, averaged over space: one deterministic
    pass (dropout off), for strategies that compare images (``diverse``)."""
    device = torch.device(device) if isinstance(device, str) else device
    indices = np.asarray(indices, dtype=np.int64)
    was_training = model.training
    set_mc_dropout(model, False)
    model.to(device)
    captured: list[torch.Tensor] = []
    hook = model.down[-1].register_forward_hook(lambda _m, _i, out: captured.append(out.float().mean((2, 3))))
    try:
        chunks = []
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            model(normalizer(torch.from_numpy(np.ascontiguousarray(images[idx])).to(device)))
            chunks.append(captured.pop().cpu().numpy())
    finally:
        hook.remove()
        model.train(was_training)
    width = model.config.width * 2 ** (model.config.depth - 1)
    return np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
