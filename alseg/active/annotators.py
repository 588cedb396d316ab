"""Oracles: whoever supplies the expert's masks for the ids a strategy chose.

:class:`SimulatedOracle` reveals the ground truth the dataset already holds (how the paper's
experiments are run). A human oracle (export a batch to a folder, import the corrected masks)
implements the same one-method interface.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from alseg.data.cache import CachedData
from alseg.errors import AlsegError


class Oracle(Protocol):
    def label(self, ids: Sequence[str]) -> np.ndarray:
        """Binary masks ``(len(ids), S, S)`` uint8 in {0, 1} for the given sample ids."""
        ...


class SimulatedOracle:
    """Answers with the dataset's own masks (at the working size)."""

    def __init__(self, data: CachedData):
        self.data = data

    def label(self, ids: Sequence[str]) -> np.ndarray:
        idx = self.data.indices(ids)
        missing = [i for i, k in zip(ids, idx) if not self.data.has_mask[k]]
        if missing:
            raise AlsegError(f"the simulated oracle has no mask for {missing[0]!r} ({len(missing)} such ids)")
        return np.asarray(self.data.masks[idx])
