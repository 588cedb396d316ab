"""A run's data: the configured dataset decoded (cached) and split, checked before anything is written.

Owns what every run starts from and reopens: :func:`prepare_data` turns an experiment's
:class:`~alseg.config.DataConfig` into decoded pixels and a split (every split checked, so bad
input leaves nothing behind); :func:`open_run_data` reopens a recorded run's data; the records a
new run stores about it (:func:`data_record`, :func:`sample_rows`) and the model's input channels
taken from the data (:func:`fitted_config`). Used by the loop, ``alseg train`` and the report.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from alseg.config import ExperimentConfig
from alseg.data.cache import CachedData, load_cached
from alseg.data.sources import Dataset, open_dataset, open_recorded_dataset
from alseg.data.splits import Split, make_project_split, make_split
from alseg.errors import AlsegError
from alseg.progress import SILENT, Reporter, staged
from alseg.store import RunStore


@dataclass
class ExperimentData:
    dataset: Dataset
    data: CachedData
    split: Split


def prepare_data(config: ExperimentConfig, reporter: Reporter = SILENT, *, pool: str = "split") -> ExperimentData:
    """Open, decode (cached) and split the configured dataset; check every split before anything is written.

    ``pool="split"`` (experiments): images with masks are split and 37.5 % of train starts labelled,
    the rest is the pool whose masks the simulated annotator reveals. ``pool="unmasked"`` (a lab's
    project): the images the user has masks for are the labelled set (and validation), every
    image without a mask is the pool.
    """
    dc = config.data
    if not dc.path:
        raise AlsegError("no dataset given (--data PATH)")
    dataset = open_dataset(dc.path, dc.format, dc.volume_axis)
    with staged(reporter, "decode", len(dataset.samples)) as advance:
        data = load_cached(dataset, dc.size, cache_dir=dc.cache_dir, progress=advance)
    seed = config.seed if dc.split_seed is None else dc.split_seed
    if pool == "unmasked":
        split = make_project_split(data.ids, has_mask=data.has_mask, groups=data.groups, seed=seed,
                                   split_by=dc.split_by)
        return ExperimentData(dataset, data, split)
    split = make_split(data.ids, has_mask=data.has_mask, positive=data.positive, groups=data.groups,
                       subsets=data.subsets, preset=dc.split_preset, split_by=dc.split_by, seed=seed,
                       labelled_fraction=dc.labelled_fraction, test_source=dc.test_source, test_seed=dc.test_seed)
    for name in ("train", "val", "test"):
        if not getattr(split, name):
            groups = {g for g in data.groups if g is not None}
            where = dataset.root / "groups.csv" if (dataset.root / "groups.csv").is_file() else dataset.root
            why = (f"{len(groups)} group(s) cannot fill train, validation and test; give at least 3 groups "
                   "or use --split-by sample") if split.split_by == "group" else "too few images with masks"
            raise AlsegError(f"the {name} split would be empty: {why}", where)
    return ExperimentData(dataset, data, split)


def open_run_data(store: RunStore, cache_dir: str | Path | None = None, reporter: Reporter = SILENT) -> ExperimentData:
    """The dataset a run was made on and its decoded pixels (from the cache, or decoded again)."""
    info = store.data_info()
    dataset = open_recorded_dataset(info)
    with staged(reporter, "decode", len(dataset.samples)) as advance:
        data = load_cached(dataset, info["size"], channels=info["channels"], cache_dir=cache_dir, progress=advance)
    missing = set(store.sample_ids()) - set(data.ids)  # every split: train, validation and test
    if missing:
        first = sorted(missing)[0]
        raise AlsegError(f"the dataset no longer holds {len(missing)} of the run's samples (e.g. {first!r}); "
                         "restore them to resume", info["path"])
    return ExperimentData(dataset, data, Split.from_dict(store.split()))


def fitted_config(config: ExperimentConfig, data: CachedData) -> ExperimentConfig:
    """The config with the model's input channels set from the decoded data."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, in_channels=data.channels))


def data_record(prepared: ExperimentData) -> dict:
    data = prepared.data
    return {"path": str(prepared.dataset.root), "format": prepared.dataset.format, "size": data.size,
            "channels": data.channels, "cache": str(data.path), "volume_axis": prepared.dataset.volume_axis}


def sample_rows(split: Split, labelled_ids) -> list[tuple[str, str, str, str, int | None]]:
    """The store's sample rows (id, split, state, origin, round) for a fresh run."""
    labelled = set(labelled_ids)
    rows = [(i, "train", "labelled" if i in labelled else "pool", "initial" if i in labelled else "none",
             0 if i in labelled else None) for i in split.train]
    rows += [(i, "val", "labelled", "initial", 0) for i in split.val]
    rows += [(i, "test", "labelled", "initial", 0) for i in split.test]
    return rows
