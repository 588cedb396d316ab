"""Supervised experiments (``alseg train``): data -> cache -> split -> fit -> test Dice, recorded in a
run directory. The data comes from :mod:`alseg.rundata`, validated completely before the run
directory is created, so bad input leaves nothing behind. The test summary names its headline
(:func:`alseg.evaluate.headline_metric`: per-volume Dice for whole volumes, else per-image), the
same figure an active-learning run on the same data reports, so the full-supervision reference
and the learning curves it is drawn against measure one thing.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from alseg.config import ExperimentConfig
from alseg.evaluate import headline_metric, score_model, validation_volumes, voxel_ml_by_volume, with_headline
from alseg.model import UNet
from alseg.progress import SILENT, Reporter, batch_progress
from alseg.rundata import data_record, fitted_config, prepare_data, sample_rows
from alseg.runtime import Normalizer, resolve_device, seed_everything
from alseg.rundir import RunDir
from alseg.store import RunStore, atomic_write_text
from alseg.train import Checkpoint, TrainConfig, fit


def _fit_settings(train: TrainConfig, full: bool) -> TrainConfig:
    """The training settings of a supervised run: the full-supervision reference's own epoch count."""
    return dataclasses.replace(train, epochs=train.reference_epochs) if full else train


def train_supervised(config: ExperimentConfig, out: str | Path, *, full: bool = False,
                     reporter: Reporter = SILENT, notes: tuple[str, ...] = ()) -> dict:
    """Fit on the split's labelled part (all of train with ``full``); record history and test Dice.
    ``notes`` are told once the data is valid."""
    run_dir = RunDir.check_new(out)
    prepared = prepare_data(config, reporter)
    config = fitted_config(config, prepared.data)
    data, split = prepared.data, prepared.split
    labelled = split.train if full else split.labelled
    reporter.note(f"effective config ({config.preset}):\n{config.to_yaml()}")
    for note in (*notes, *split.notes):
        reporter.note(note)
    device = resolve_device(config.train.device)
    seed_everything(config.seed)
    train_idx = data.indices(labelled)
    normalizer = Normalizer.fit(data.images[train_idx])
    model = UNet(config.model)

    with RunStore(run_dir, create=True) as store, run_dir.lock("train"):
        atomic_write_text(run_dir.config_file, config.to_yaml())
        store.start(kind="supervised", annotator="simulated", config=config.to_dict(), data=data_record(prepared),
                    normalizer=normalizer.to_dict(), split=split.to_dict(), samples=sample_rows(split, labelled))
        started = time.perf_counter()
        val_idx = data.indices(split.val)
        settings = _fit_settings(config.train, full)
        result = fit(model, data.images[train_idx], data.masks[train_idx], data.images[val_idx], data.masks[val_idx],
                     settings, normalizer,
                     size=data.size, checkpoint_dir=run_dir.checkpoint_dir(), seed=config.seed,
                     on_epoch=lambda r: (store.add_epoch("initial", 0, r), reporter.epoch("initial", 0, r)),
                     on_batch=batch_progress(reporter),
                     checkpoint_meta={"config": config.to_dict()},
                     val_volumes=validation_volumes(prepared.dataset, data, split))
        store.set_latest_checkpoint(run_dir.relative(run_dir.checkpoint()))
        best = Checkpoint.load(run_dir.checkpoint(), device=device)
        evaluation = score_model(best, data, data.indices(split.test), device=device,
                                 precision=config.train.precision, reporter=reporter,
                                 slice_index=prepared.dataset.slice_indices(),
                                 voxel_ml=voxel_ml_by_volume(prepared.dataset, data))
        evaluation.summary = with_headline(evaluation.summary, headline_metric(prepared.dataset.format, split.preset,
                                                                               split.split_by))
        store.add_evaluation(0, "test", evaluation.summary)
        seconds = time.perf_counter() - started
        store.set_supervised_seconds(seconds)
    return {"run_dir": str(run_dir.root), "labelled": len(labelled), "split": split.counts(), "split_by": split.split_by,
            "epochs": settings.epochs,
            "best_epoch": result["best_epoch"], "best_val_dice": result["best_val_dice"],
            "test": evaluation.summary, "seconds": seconds}
