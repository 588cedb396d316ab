"""Applying a trained model to labelled images and scoring it with Dice.

Owns the step from "a checkpoint and some images with masks" to a Dice summary (see
:mod:`alseg.metrics` for the empty-mask convention). Dice is measured at the checkpoint's
working size, on the deterministic prediction (dropout off) thresholded at 0.5.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from alseg.data.cache import CachedData, load_cached
from alseg.data.sources import open_dataset
from alseg.errors import AlsegError
from alseg.metrics import dice_counts, summarize_dice
from alseg.progress import SILENT, Reporter, staged
from alseg.runtime import resolve_device
from alseg.train import Checkpoint, predict_probs

EVAL_SPLITS = ("all", "train", "val", "test")


@dataclass
class Evaluation:
    summary: dict
    ids: list[str]
    dice: np.ndarray

    def per_image(self) -> list[dict]:
        return [{"id": i, "dice": float(d)} for i, d in zip(self.ids, self.dice)]


def score_model(checkpoint: Checkpoint, data: CachedData, indices: np.ndarray, *, device="cpu",
                precision: str = "auto", batch_size: int = 16, reporter: Reporter = SILENT) -> Evaluation:
    """Dice of ``checkpoint`` on ``data`` rows ``indices`` (which must all have masks)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise AlsegError("no images with masks to evaluate")
    inter_all, total_all = [], []
    with staged(reporter, "evaluate", len(indices)) as advance:
        for start in range(0, len(indices), 256):  # bounded memory on large sets
            idx = indices[start:start + 256]
            probs = predict_probs(checkpoint.model, np.asarray(data.images[idx]), checkpoint.normalizer,
                                  device=device, precision=precision, batch_size=batch_size)
            inter, total = dice_counts(probs > 0.5, np.asarray(data.masks[idx]) > 0)
            inter_all.append(inter)
            total_all.append(total)
            advance(start + len(idx))
    inter, total = np.concatenate(inter_all), np.concatenate(total_all)
    groups = [data.groups[i] for i in indices]
    grouped = any(g is not None for g in groups)
    summary = summarize_dice(inter, total, groups if grouped else None)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return Evaluation(summary, [data.ids[i] for i in indices], dice)


def write_per_image_csv(path: str | Path, ids: Sequence[str], dice: Iterable[float]) -> None:
    """Write ``id,dice`` rows (Dice to 6 decimals) to ``path`` atomically, quoting ids as CSV needs
    (an id holding a comma, quote or newline stays one field)."""
    from alseg.store import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("id", "dice"))
    writer.writerows((sid, f"{float(d):.6f}") for sid, d in zip(ids, dice, strict=True))
    atomic_write_text(path, buf.getvalue())


def resolve_checkpoint(target: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint file, run dir or None) for a checkpoint path or a run directory (its latest model)."""
    from alseg.store import RunStore

    target = Path(target)
    if target.is_dir():
        with RunStore.open_readonly(target) as store:
            latest = store.latest_checkpoint()
        if not latest:
            raise AlsegError("run has no trained model yet", target)
        return target / latest, target
    if not target.exists():
        raise AlsegError("no such checkpoint or run directory", target)
    return target, None


def evaluate(target: str | Path, data_path: str | Path, *, format: str | None = None, positive_only: bool = False,
             split: str = "all", device: str = "auto", cache_dir: str | Path | None = None,
             reporter: Reporter = SILENT) -> Evaluation:
    """Evaluate a checkpoint (or a run's latest model) on the labelled images at ``data_path``.

    ``split`` other than ``all`` needs a run directory and keeps that split's ids of the run.
    """
    from alseg.store import RunStore

    if split not in EVAL_SPLITS:
        raise AlsegError(f"split must be one of {', '.join(EVAL_SPLITS)}")
    ckpt_path, run_dir = resolve_checkpoint(target)
    dev = resolve_device(device)
    ckpt = Checkpoint.load(ckpt_path, device=dev)
    dataset = open_dataset(data_path, format)
    with staged(reporter, "decode", len(dataset.samples)) as advance:
        data = load_cached(dataset, ckpt.size, channels=ckpt.model.config.in_channels, cache_dir=cache_dir,
                           progress=advance, note=reporter.note)
    keep = data.has_mask.copy()
    if split != "all":
        if run_dir is None:
            raise AlsegError(f"--split {split} needs a run directory, not a checkpoint file", target)
        with RunStore.open_readonly(run_dir) as store:
            wanted = set(store.sample_ids(split=split))
        keep &= np.array([i in wanted for i in data.ids])
    if positive_only:
        keep &= data.positive
    indices = np.flatnonzero(keep)
    if len(indices) == 0:
        raise AlsegError("no images with masks to evaluate" + (" (after --positive-only)" if positive_only else ""),
                         data_path)
    return score_model(ckpt, data, indices, device=dev, reporter=reporter)
