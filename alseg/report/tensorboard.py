"""Live metrics as TensorBoard event files (``alseg run --tensorboard``; optional dependency).

A :class:`~alseg.progress.Reporter` that writes, under ``RUN_DIR/tensorboard``:
``initial/*`` and ``active/*`` per epoch (train loss, train and validation Dice; the active
phase's step counts epochs across rounds) and ``round/*`` per round (test Dice mean, median,
pooled and per-volume, pool size, seconds at step = round; ``round/test_dice_vs_labels`` at
step = expert-labelled images, a learning curve of the run's headline test Dice: per volume for
whole volumes, else per image).
"""
from __future__ import annotations

from pathlib import Path

from alseg.errors import AlsegError
from alseg.progress import Reporter


class TensorboardReporter(Reporter):
    def __init__(self, log_dir: str | Path, round_epochs: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise AlsegError("--tensorboard needs the tensorboard package: pip install 'alseg[tensorboard]'") from None
        self._make_writer = lambda: SummaryWriter(log_dir=str(log_dir))
        self._writer = None  # created at the first event: the run directory must not exist before validation
        self.round_epochs = round_epochs

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._make_writer()
        return self._writer

    def epoch(self, phase, round, record):
        step = record["epoch"] if phase == "initial" else (round - 1) * self.round_epochs + record["epoch"]
        for key in ("train_loss", "train_dice", "val_dice"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"{phase}/{key}", record[key], step)
        self.writer.flush()

    def round(self, row):
        r = row["round"]
        test = row.get("test") or {}  # a project has no test split
        for key in ("mean_dice", "median_dice", "pooled_dice", "volume_dice_mean"):
            if test.get(key) is not None:
                self.writer.add_scalar(f"round/test_{key}", test[key], r)
        headline = test.get("headline_dice", test.get("mean_dice"))
        if headline is not None:
            self.writer.add_scalar("round/test_dice_vs_labels", headline, row["expert_labelled"])
        if row.get("val_dice") is not None:
            self.writer.add_scalar("round/val_dice", row["val_dice"], r)
        for key in ("expert_labelled", "pseudo_labelled", "pool", "seconds"):
            self.writer.add_scalar(f"round/{key}", row[key], r)
        self.writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
