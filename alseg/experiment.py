"""Supervised experiments: data -> cache -> split -> fit -> test Dice, recorded in a run directory.

Owns the glue that :mod:`alseg.active.loop` also starts from: :func:`prepare_data` turns a
:class:`~alseg.config.DataConfig` into decoded pixels and a split; :func:`train_supervised`
is ``alseg train``. Data is validated completely before the run directory is created, so bad
input leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from alseg.config import ExperimentConfig
from alseg.data.cache import CachedData, load_cached
from alseg.data.sources import Dataset, open_dataset
from alseg.data.splits import Split, make_split
from alseg.errors import AlsegError
from alseg.evaluate import score_model
from alseg.model import UNet
from alseg.progress import SILENT, Reporter, batch_progress, staged
from alseg.runtime import Normalizer, resolve_device, seed_everything
from alseg.store import RunStore, atomic_write_text
from alseg.train import Checkpoint, fit


@dataclass
class ExperimentData:
    dataset: Dataset
    data: CachedData
    split: Split


def prepare_data(config: ExperimentConfig, reporter: Reporter = SILENT) -> ExperimentData:
    """Open, decode (cached) and split the configured dataset."""
    dc = config.data
    if not dc.path:
        raise AlsegError("no dataset given (--data PATH)")
    dataset = open_dataset(dc.path, dc.format)
    with staged(reporter, "decode", len(dataset.samples)) as advance:
        data = load_cached(dataset, dc.size, cache_dir=dc.cache_dir, progress=advance)
    split = make_split(data.ids, has_mask=data.has_mask, positive=data.positive, groups=data.groups,
                       subsets=data.subsets, preset=dc.split_preset, split_by=dc.split_by,
                       seed=config.seed if dc.split_seed is None else dc.split_seed,
                       labelled_fraction=dc.labelled_fraction, test_source=dc.test_source)
    return ExperimentData(dataset, data, split)


def open_run_data(store: RunStore, cache_dir: str | Path | None = None, reporter: Reporter = SILENT) -> CachedData:
    """The decoded pixels of the dataset a run was made on (from the cache, or decoded again)."""
    info = store.get("data")
    dataset = open_dataset(info["path"], info["format"])
    with staged(reporter, "decode", len(dataset.samples)) as advance:
        data = load_cached(dataset, info["size"], channels=info["channels"], cache_dir=cache_dir, progress=advance)
    split = store.get("split")
    missing = (set(split["train"]) | set(split["test"])) - set(data.ids)
    if missing:
        raise AlsegError(f"the dataset no longer holds {len(missing)} of the run's samples", info["path"])
    return data


def new_run_dir(out: str | Path) -> Path:
    """Check that ``out`` can become a fresh run directory (created later, once inputs are valid)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlsegError("output folder exists and is not empty; choose another --out", out)
    return out


def fitted_config(config: ExperimentConfig, data: CachedData) -> ExperimentConfig:
    """The config with the model's input channels set from the decoded data."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, in_channels=data.channels))


def record_split(store: RunStore, split: Split, labelled_ids) -> None:
    labelled = set(labelled_ids)
    rows = [(i, "train", "labelled" if i in labelled else "pool", "initial" if i in labelled else "none", 0 if i in labelled else None)
            for i in split.train]
    rows += [(i, "val", "labelled", "initial", 0) for i in split.val]
    rows += [(i, "test", "labelled", "initial", 0) for i in split.test]
    store.add_samples(rows)
    store.set("split", split.to_dict())


def train_supervised(config: ExperimentConfig, out: str | Path, *, full: bool = False,
                     reporter: Reporter = SILENT) -> dict:
    """Fit on the split's labelled part (all of train with ``full``); record history and test Dice."""
    out = new_run_dir(out)
    prepared = prepare_data(config, reporter)
    config = fitted_config(config, prepared.data)
    data, split = prepared.data, prepared.split
    labelled = split.train if full else split.labelled
    reporter.note(f"effective config ({config.preset}):\n{config.to_yaml()}")
    for note in split.notes:
        reporter.note(note)
    device = resolve_device(config.train.device)
    seed_everything(config.seed)
    train_idx = data.indices(labelled)
    normalizer = Normalizer.fit(data.images[train_idx])
    model = UNet(config.model)

    with RunStore(out, create=True) as store:
        atomic_write_text(out / "config.yaml", config.to_yaml())
        store.set("config", config.to_dict())
        store.set("kind", "supervised")
        store.set("data", {"path": str(prepared.dataset.root), "format": prepared.dataset.format,
                           "size": data.size, "channels": data.channels, "cache": str(data.path)})
        record_split(store, split, labelled)
        started = time.perf_counter()
        val_idx = data.indices(split.val)
        result = fit(model, data.images[train_idx], data.masks[train_idx], data.images[val_idx], data.masks[val_idx],
                     config.train, normalizer,
                     size=data.size, checkpoint_dir=store.checkpoint_dir, seed=config.seed,
                     on_epoch=lambda r: (store.add_epoch("initial", 0, r), reporter.epoch("initial", 0, r)),
                     on_batch=batch_progress(reporter),
                     checkpoint_meta={"config": config.to_dict()})
        store.set("latest_checkpoint", "checkpoints/best.pt")
        best = Checkpoint.load(store.checkpoint_dir / "best.pt", device=device)
        evaluation = score_model(best, data, data.indices(split.test), device=device,
                                 precision=config.train.precision, reporter=reporter)
        store.add_evaluation(0, "test", evaluation.summary)
        seconds = time.perf_counter() - started
        store.set("seconds", seconds)
    return {"run_dir": str(out), "labelled": len(labelled), "split": split.counts(), "split_by": split.split_by,
            "best_epoch": result["best_epoch"], "best_val_dice": result["best_val_dice"],
            "test": evaluation.summary, "seconds": seconds}
