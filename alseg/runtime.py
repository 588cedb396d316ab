"""Where and how tensors run: device choice, mixed precision, seeding, and input normalisation.

Shared by training, evaluation and the MC-dropout engine so they agree on how uint8 pixels
become network input: ``(x / 255 - mean) / std`` per channel, with mean and std measured on
the training images and stored in every checkpoint.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from alseg.errors import AlsegError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise AlsegError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlsegError("device cuda was asked for but no CUDA GPU is available")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. ``auto``: bf16 (else fp16) on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise AlsegError(f"precision must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_seed(seed: int, round: int, step: int) -> int:
    """An independent, reproducible seed for one step of one round (the loop's steps, the batch export)."""
    return int(np.random.SeedSequence([seed, round, step]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Normalizer:
    """Per-channel mean and std of training pixels in [0, 1] units."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, images: np.ndarray, max_images: int = 512) -> "Normalizer":
        step = max(1, len(images) // max_images)
        sample = np.asarray(images[::step], dtype=np.float32) / 255.0
        mean = sample.mean(axis=(0, 1, 2))
        std = np.maximum(sample.std(axis=(0, 1, 2)), 1e-3)
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(tuple(d["mean"]), tuple(d["std"]))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` float in [0, 1] -> zero-mean, unit-std per channel."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, C)`` uint8 on any device -> ``(N, C, H, W)`` float32, normalised."""
        return self.standardize(to_unit(batch_uint8))


def to_unit(batch_uint8: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` float32 in [0, 1]."""
    return batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
