"""The paper's U-Net with Monte Carlo dropout, and its options.

Depth ``d`` encoder levels of two 3x3 convolutions (padding same, ReLU) with dropout between
them, 2x2 max-pooling between levels (not after the last); channels ``w, 2w, ..., 2^(d-1) w``.
The decoder has ``d - 1`` levels: a 2x2 stride-2 transposed convolution halving the channels,
concatenation with the encoder skip, two 3x3 convolutions with dropout between. A final 1x1
convolution gives one logit map. With ``width=64, depth=5, in_channels=3`` and no normalisation
that is 31,031,745 parameters, the paper's "around 31 million".

``dropout_scope`` says which blocks carry dropout: ``all`` (every block, the paper),
``decoder`` (bottleneck and decoder) or ``bottleneck`` (the deepest level only). ``norm`` adds
``batch``/``instance``/``group`` normalisation after each convolution (``none`` is the paper).

:func:`set_mc_dropout` switches a model to MC inference: dropout active, normalisation in eval.

Inside :func:`seeded_dropout` the dropout masks of batch row ``i`` come from ``generators[i]``
instead of torch's global stream: the MC engine seeds one generator per (image, pass), so an
image's masks, and so its score, do not depend on which batch, batch size or process scored it.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from alseg.errors import AlsegError

DROPOUT_SCOPES = ("all", "decoder", "bottleneck")
NORMS = ("none", "batch", "instance", "group")


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 3
    width: int = 64
    depth: int = 5
    dropout: float = 0.1
    dropout_scope: str = "all"
    norm: str = "none"

    def __post_init__(self):
        if self.depth < 1:
            raise AlsegError(f"depth must be at least 1, got {self.depth}")
        if self.width < 1 or self.in_channels < 1:
            raise AlsegError("width and in_channels must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise AlsegError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dropout_scope not in DROPOUT_SCOPES:
            raise AlsegError(f"dropout_scope must be one of {', '.join(DROPOUT_SCOPES)}")
        if self.norm not in NORMS:
            raise AlsegError(f"norm must be one of {', '.join(NORMS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


# Per-row generators of the batch being run, set by `seeded_dropout`; None: torch's global stream.
_ROW_GENERATORS: contextvars.ContextVar[Sequence[torch.Generator] | None] = contextvars.ContextVar(
    "alseg_row_generators", default=None)


@contextlib.contextmanager
def seeded_dropout(generators: Sequence[torch.Generator]):
    """Within the block, active dropout draws batch row ``i``'s mask from ``generators[i]``.

    Each layer draws, in the network's fixed order, from the row's generator: the same generator
    state gives the same masks in any batch. Generators must be on the tensors' device.
    """
    token = _ROW_GENERATORS.set(generators)
    try:
        yield
    finally:
        _ROW_GENERATORS.reset(token)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def pass_seed(seed: int, key: int, t: int) -> int:
    """The dropout seed of row ``key`` in pass (or training step) ``t`` of a stream seeded with ``seed``."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (key & _MASK64)) ^ t) >> 1  # torch wants < 2^63


def pass_generators(seed: int, keys, t: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per key (an image in MC scoring, a batch row in training) for pass or step ``t``:
    what :func:`seeded_dropout` takes."""
    return [torch.Generator(device=device).manual_seed(pass_seed(seed, int(k), t)) for k in keys]


class RowSeededDropout(nn.Dropout):
    """``nn.Dropout`` that, inside :func:`seeded_dropout`, draws each batch row's mask from its own generator.

    A row's mask takes 16 random bits per element (four per 64-bit draw, a quarter of the
    generator calls of ``bernoulli_``): an element is dropped when its bits fall below
    ``round(p * 65536)``, i.e. with probability ``p`` to within 1/131072. The bits are laid out in
    the activation's memory order (channels_last on the CPU, where the engine runs so), so the
    mask is applied in one pass over memory; the same generator state gives the same mask for the
    same memory format.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        generators = _ROW_GENERATORS.get()
        if generators is None or not self.training or self.p == 0:
            return super().forward(x)
        if len(generators) != x.shape[0]:
            raise ValueError(f"seeded_dropout got {len(generators)} generators for a batch of {x.shape[0]}")
        per_row = x[0].numel()
        draws = torch.empty((x.shape[0], (per_row + 3) // 4), dtype=torch.int64, device=x.device)
        for row, gen in zip(draws, generators):  # one generator call per row: rows do not share a stream
            row.random_(-2**63, 2**63 - 1, generator=gen)
        threshold = round(self.p * 65536) - 32768
        bits = draws.view(torch.int16)[:, :per_row]
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = x.shape
            keep = (bits.reshape(n, h, w, c) >= threshold).permute(0, 3, 1, 2)
        else:
            keep = bits.reshape(x.shape) >= threshold
        return torch.where(keep, x, 0).mul_(1.0 / (1 - self.p))


class DoubleConv(nn.Sequential):
    """conv3x3 -> [norm] -> ReLU -> dropout -> conv3x3 -> [norm] -> ReLU."""

    def __init__(self, cin: int, cout: int, dropout: float, norm: str):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
            RowSeededDropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net returning one logit map of the input's height and width (a multiple of 2^(depth-1))."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        c, w, d = config, config.width, config.depth
        chans = [w * 2 ** i for i in range(d)]

        def rate(level: int, decoder: bool) -> float:
            if c.dropout_scope == "all":
                return c.dropout
            if c.dropout_scope == "decoder":
                return c.dropout if decoder or level == d - 1 else 0.0
            return c.dropout if level == d - 1 and not decoder else 0.0

        self.down = nn.ModuleList()
        cin = c.in_channels
        for level, ch in enumerate(chans):
            self.down.append(DoubleConv(cin, ch, rate(level, False), c.norm))
            cin = ch
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in range(d - 2, -1, -1):
            self.up.append(nn.ConvTranspose2d(chans[level + 1], chans[level], 2, stride=2))
            self.dec.append(DoubleConv(2 * chans[level], chans[level], rate(level, True), c.norm))
        self.head = nn.Conv2d(chans[0], 1, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.config.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise AlsegError(f"input size {tuple(x.shape[-2:])} must be a multiple of {self.multiple} for depth {self.config.depth}")
        return self.finish([], x)

    def deterministic_levels(self) -> int:
        """Encoder levels, from the input, without active dropout: the same in every MC pass."""
        levels = 0
        for block in self.down[:-1]:  # the bottleneck (last level) always keeps its dropout
            if any(isinstance(m, nn.Dropout) and m.p > 0 for m in block):
                break
            levels += 1
        return levels

    def encode(self, x: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The first ``levels`` encoder levels: their skip outputs and the next level's input."""
        skips = []
        for block in self.down[:levels]:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        return skips, x

    def finish(self, skips: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The rest of the network after :meth:`encode` (``forward`` is ``finish([], x)``)."""
        skips = list(skips)
        for i in range(len(skips), len(self.down)):
            x = self.down[i](x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_mc_dropout(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Eval mode everywhere, then dropout layers back to train mode when ``enabled`` (MC dropout)."""
    model.eval()
    if enabled:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.train()
    return model
