"""Annotators: whoever supplies the masks for the ids a strategy queued.

Two kinds walk the same durable steps (select -> *awaiting labels* -> labelled -> train):

* :class:`SimulatedAnnotator` answers at once with the masks the dataset already holds (how the
  paper's experiments are run); its answers are stored like an expert's, so training reads every
  expert label from the store;
* :class:`ExpertAnnotator` is a person: the loop exports the batch and stops; masks arrive later,
  from files (``alseg ingest``) or the review page, through :mod:`alseg.annotate.ingest`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from alseg.data.cache import CachedData
from alseg.errors import AlsegError

ANNOTATORS = ("simulated", "expert")


class SimulatedAnnotator:
    """Answers with the dataset's own masks (at the working size)."""

    name = "simulated"
    answers_at_once = True

    def __init__(self, data: CachedData):
        self.data = data

    def masks(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        idx = self.data.indices(ids)
        missing = [i for i, k in zip(ids, idx) if not self.data.has_mask[k]]
        if missing:
            raise AlsegError(f"the simulated annotator has no mask for {missing[0]!r} ({len(missing)} such ids)")
        return {i: np.asarray(self.data.masks[k]) for i, k in zip(ids, idx)}


class ExpertAnnotator:
    """A person: answers later, through files or the review page."""

    name = "expert"
    answers_at_once = False


def make_annotator(kind: str, data: CachedData):
    if kind == "simulated":
        return SimulatedAnnotator(data)
    if kind == "expert":
        return ExpertAnnotator()
    raise AlsegError(f"unknown annotator {kind!r}; choose one of {', '.join(ANNOTATORS)}")
