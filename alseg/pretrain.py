"""Self-supervised pre-training of the U-Net on a run's or project's own images, without masks.

Owns the pre-training task, its resumable run and the cached weights. A lab has thousands of
images and a dozen masks: the pixels are free, so before round 0 the whole U-Net (encoder and
decoder) learns to restore its input, and every model the loop starts from scratch starts from
those weights (round 0 always; later rounds only with ``warm_start`` off).

Methods (``PretrainConfig.method``):

* ``inpaint`` (the default, chosen on validation Dice in docs/benchmarks.md): square patches of
  ``patch`` pixels covering ``mask_ratio`` of the image are blanked (set to the mean, 0 after
  standardisation) and the network restores them; the loss is the mean squared error on the
  blanked pixels only (the skip connections would copy the rest). It needs context, not
  copying: the encoder learns what skin, lesions and tissue look like. (Models Genesis and
  masked autoencoders restore corrupted inputs the same way.)
* ``denoise``: Gaussian noise (std ``noise`` in standardised units) on every pixel, restore all.

The reconstruction head (one 1x1 convolution to the input's channels) replaces the segmentation
head during pre-training and is dropped after; the segmentation head starts fresh.

Length: ``epochs`` passes over the images, at least ``min_steps`` and at most ``max_steps``
optimiser steps. The state (weights, optimiser, random generator, step) is saved every
``save_every`` steps, atomically, so a killed pre-training resumes where it was; the finished
weights are cached in the run directory with a fingerprint of everything they depend on (images,
working size, normalisation, model and pre-training settings, seed) and reused until one changes.

Runs on one process (under torchrun: rank 0, while the other ranks wait for the next collective step).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alseg.errors import AlsegError
from alseg.faults import point
from alseg.model import ModelConfig, UNet
from alseg.runtime import Normalizer, resolve_device, to_unit
from alseg.store import atomic_torch_save

METHODS = ("inpaint", "denoise")
WEIGHTS_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    enabled: bool = False
    method: str = "inpaint"
    epochs: int = 20
    min_steps: int = 500
    max_steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    mask_ratio: float = 0.5
    patch: int = 8
    noise: float = 0.5
    save_every: int = 100

    def __post_init__(self):
        if self.method not in METHODS:
            raise AlsegError(f"pretrain.method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not 0 < self.mask_ratio < 1:
            raise AlsegError(f"pretrain.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.min_steps > self.max_steps or self.max_steps < 1 or self.batch_size < 1 or self.patch < 1:
            raise AlsegError("pretrain needs 1 <= min_steps <= max_steps and positive batch_size and patch")

    def steps(self, n_images: int) -> int:
        """Optimiser steps for ``n_images``: ``epochs`` passes, within [min_steps, max_steps]."""
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * n_images / self.batch_size))))

    def to_dict(self) -> dict:
        return asdict(self)


def fingerprint(config: PretrainConfig, model_config: ModelConfig, normalizer: Normalizer, ids: Sequence[str],
                size: int, seed: int) -> str:
    """What the pre-trained weights depend on, hashed (``save_every`` and ``enabled`` do not count)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("save_every", "enabled")}
    blob = json.dumps({"v": WEIGHTS_VERSION, "pretrain": settings, "model": model_config.to_dict(),
                       "normalizer": normalizer.to_dict(), "size": size, "seed": seed,
                       "ids": hashlib.sha256("\n".join(ids).encode("utf-8", "surrogateescape")).hexdigest()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def corrupt(x: torch.Tensor, config: PretrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The corrupted input and the (N, 1, H, W) weight of each pixel in the loss, for standardised ``x``."""
    n, _, h, w = x.shape
    if config.method == "denoise":
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device) * config.noise
        return x + noise, torch.ones((n, 1, h, w), device=x.device)
    gh, gw = math.ceil(h / config.patch), math.ceil(w / config.patch)
    blank = (torch.rand((n, 1, gh, gw), generator=gen, device=gen.device) < config.mask_ratio).float().to(x.device)
    blank = F.interpolate(blank, scale_factor=config.patch, mode="nearest")[:, :, :h, :w]
    return x * (1 - blank), blank


def _network(model_config: ModelConfig) -> UNet:
    net = UNet(model_config)
    net.head = nn.Conv2d(model_config.width, model_config.in_channels, 1)  # restores the input's channels
    return net


def encoder_decoder_weights(net: UNet) -> dict[str, torch.Tensor]:
    """Every weight but the head's: what a segmentation U-Net takes over."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith("head.")}


def pretrain(images: np.ndarray, model_config: ModelConfig, normalizer: Normalizer, config: PretrainConfig, *,
             folder: str | Path, ids: Sequence[str], seed: int = 0, device: str = "auto",
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Pre-train on uint8 ``images`` (N, S, S, C), or take the cached result; return the weights and facts.

    ``folder`` holds ``pretrained.pt`` (the finished weights) and, while it runs, ``state.pt``
    (resumed after a kill). Returns ``{"weights", "steps", "seconds", "loss", "images", "reused"}``.
    """
    folder = Path(folder)
    size = int(images.shape[1])
    fp = fingerprint(config, model_config, normalizer, ids, size, seed)
    done = folder / "pretrained.pt"
    cached = _load(done, fp)
    if cached is not None:
        return {**cached, "reused": True}
    if len(images) == 0:
        raise AlsegError("no images to pre-train on")
    # Its own random streams: whether it ran or was reused, the caller's stream is the same after it.
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _pretrain(images, model_config, normalizer, config, folder, fp, seed, dev, progress)


def _pretrain(images, model_config, normalizer, config, folder, fp, seed, dev, progress) -> dict:
    torch.manual_seed(seed)  # initial weights and dropout masks
    net = _network(model_config).to(dev)
    if dev.type == "cpu":  # faster on the CPU, as in training
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = config.steps(len(images))
    step, seconds, losses = 0, 0.0, []
    state_file = folder / "state.pt"
    state = _load_state(state_file, fp)
    if state is not None:  # a killed pre-training: go on from its last saved step
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch"])
        step, seconds, losses, order = state["step"], state["seconds"], state["losses"], state["order"]
    else:
        order = torch.empty(0, dtype=torch.long)  # what is left of the current shuffle
    x_all = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
    net.train()
    t0 = time.perf_counter() - seconds
    while step < total:
        if len(order) < config.batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=gen)])
        idx, order = order[:config.batch_size], order[config.batch_size:]
        x = normalizer.standardize(_flip(to_unit(x_all[idx.to(dev)]), gen))
        corrupted, weight = corrupt(x, config, gen)
        out = net(corrupted.contiguous(memory_format=torch.channels_last) if dev.type == "cpu" else corrupted)
        loss = (((out - x) ** 2) * weight).sum() / (weight.sum() * x.shape[1]).clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if progress:
            progress(step, total)
        if step % config.save_every == 0 and step < total:
            atomic_torch_save({"fingerprint": fp, "net": net.state_dict(), "opt": opt.state_dict(),
                               "gen": gen.get_state(), "torch": torch.get_rng_state(), "order": order,
                               "step": step, "seconds": time.perf_counter() - t0, "losses": losses}, state_file)
            point("pretrain-saved")
    seconds = time.perf_counter() - t0
    facts = {"steps": total, "seconds": seconds, "loss": float(np.mean(losses[-50:])), "images": len(images)}
    atomic_torch_save({"version": WEIGHTS_VERSION, "fingerprint": fp, "weights": encoder_decoder_weights(net),
                       "facts": facts}, folder / "pretrained.pt")
    state_file.unlink(missing_ok=True)
    return {"weights": encoder_decoder_weights(net), **facts, "reused": False}


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips per image: more views of few images."""
    n = x.shape[0]
    h = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
    v = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
    x = torch.where(h, x.flip(-1), x)
    return torch.where(v, x.flip(-2), x)


def _load(path: Path, fp: str) -> dict | None:
    """The cached weights and facts when ``path`` holds weights with this fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged or foreign file: pre-train again (and overwrite it)
        return None
    if not isinstance(blob, dict) or blob.get("fingerprint") != fp or blob.get("version") != WEIGHTS_VERSION:
        return None
    return {"weights": blob["weights"], **blob["facts"]}


def _load_state(path: Path, fp: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # killed mid-write cannot happen (atomic), but a foreign file is not ours
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == fp else None


def load_into(model: UNet, weights: dict[str, torch.Tensor]) -> UNet:
    """Give a segmentation U-Net the pre-trained encoder and decoder; its head stays as initialised."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise AlsegError("pre-trained weights do not fit this U-Net (width, depth or channels changed)")
    return model
