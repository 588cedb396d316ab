"""Applying a trained model to labelled images and scoring it with Dice.

Owns the step from "a checkpoint and some images with masks" to a Dice summary (see
:mod:`alseg.metrics` for the empty-mask and volume conventions). Dice is measured at the
checkpoint's working size, on the deterministic prediction (dropout off) thresholded at 0.5.

Grouped data (LGG patients as TIFF slices, NIfTI volumes as slices, a folder with
``groups.csv``) is also scored per volume, as Buda et al. count it: each group's slices are
stacked in slice order (the slice index, never the id's string order; gaps stay empty) and
scored as one 3D mask, tumour-free slices included. The summary then adds the per-volume
figures of :func:`alseg.metrics.summarize_volumes` and the mean volume Dice both without
(``volume_dice_mean_raw``) and with (``volume_dice_mean_largest_component``) keeping only the
largest 3D component (26-connected) of each predicted volume; ``largest_component`` says
which of the two the primary figures (every per-image, per-volume and false-positive figure,
and the per-image CSV) were measured on. Predictions are made volume by volume, so memory
holds about one volume's masks, not the dataset's.

The headline figure (:func:`headline_metric`): the one number a run reports as its test Dice,
that ``compare`` and the report plot. Per-volume Dice (``volume_dice_mean``) where the scored
images are whole volumes, every slice of each, tumour-free ones included: data read as volumes
or patients (``lgg``, ``nifti``, ``dicom``) split by group with a preset that keeps empty slices
(every preset but ``lgg``). Elsewhere the mean Dice over images (``mean_dice``): 2D photos,
grouped by a ``groups.csv`` or not, are no volumes, and ``lgg``'s tumour slices are only part of
one. :func:`with_headline` names it in a summary (``headline``, ``headline_dice``);
:func:`run_headline` reads it from a run's records.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from alseg.data.cache import CachedData, load_cached
from alseg.data.sources import SLICED_LAYOUTS, Dataset, open_dataset
from alseg.errors import AlsegError
from alseg.metrics import (VolumeScore, dice_counts, largest_component_3d, score_volume, stack_slices,
                           summarize_dice, summarize_volumes)
from alseg.progress import SILENT, Reporter, staged
from alseg.runtime import resolve_device
from alseg.train import Checkpoint, predict_probs

EVAL_SPLITS = ("all", "train", "val", "test")
CHUNK = 256  # images predicted at once: bounded memory on large sets

TUMOUR_SLICES_ONLY = "lgg"  # the split preset that keeps only lesion slices: no whole volumes
# splits that hold no whole volumes: tumour slices only, or a project's few labelled slices
PART_VOLUME_SPLITS = (TUMOUR_SLICES_ONLY, "project")
HEADLINE_LABELS = {"volume_dice_mean": "per-volume Dice", "mean_dice": "Dice"}
# the test figure as the report names it on axes and in tables
HEADLINE_TEST_LABELS = {"volume_dice_mean": "per-volume test Dice (Buda et al.)", "mean_dice": "per-image test Dice"}


def headline_metric(format: str | None, split_preset: str, split_by: str = "group") -> str:
    """The summary key that is a run's headline test Dice: ``"volume_dice_mean"`` when the test
    split holds whole volumes, else ``"mean_dice"``.

    Whole volumes: ``format`` is a volume layout (:data:`~alseg.data.sources.SLICED_LAYOUTS`: LGG
    patients, NIfTI, DICOM), ``split_preset`` keeps every slice with a mask (any preset but ``lgg``,
    which keeps tumour slices only, and a project's, whose labelled slices are a few of each
    volume) and the split went by group (``split_by="sample"`` scatters a volume's
    slices over train, validation and test). Photos grouped by ``groups.csv`` (``folder``,
    ``isic2017``) are no volumes: their headline is the mean Dice over images.
    """
    whole = format in SLICED_LAYOUTS and split_preset not in PART_VOLUME_SPLITS and split_by == "group"
    return "volume_dice_mean" if whole else "mean_dice"


def headline_label(metric: str) -> str:
    """``"per-volume Dice"`` or ``"Dice"``: how tables name a headline metric."""
    return HEADLINE_LABELS[metric]


def with_headline(summary: dict, metric: str) -> dict:
    """``summary`` with ``headline`` (the metric's key) and ``headline_dice`` (its value) first.

    A per-volume headline whose summary has no volume figure (no grouped rows were scored) falls
    back to ``mean_dice``, so ``headline`` always names the figure ``headline_dice`` holds."""
    if summary.get(metric) is None:
        metric = "mean_dice"
    rest = {k: v for k, v in summary.items() if k not in ("headline", "headline_dice")}
    return {"headline": metric, "headline_dice": summary[metric], **rest}


def validation_volumes(dataset: Dataset, data: CachedData, split) -> tuple[list, list] | None:
    """``(group, slice position)`` of each validation row when the validation split holds whole
    volumes (the headline rule, a run's own split; not a project's few labelled slices), so that
    training keeps the epoch with the best per-volume Dice (:func:`alseg.train.fit`); else None."""
    if not split.val or headline_metric(dataset.format, split.preset, split.split_by) != "volume_dice_mean":
        return None
    where = dataset.slice_indices()
    rows = data.indices(list(split.val))
    return [data.groups[i] for i in rows], [where[i] for i in rows]


def run_headline(store) -> str:
    """The headline metric of a recorded run (a :class:`~alseg.store.RunStore`), from the data
    layout and the split it recorded."""
    split = store.split()
    return headline_metric(store.data_info()["format"], split["preset"], split["split_by"])


@dataclass
class Evaluation:
    summary: dict
    ids: list[str]
    dice: np.ndarray
    volumes: dict[str, float] = field(default_factory=dict)  # group -> 3D Dice (primary figures)

    def per_image(self) -> list[dict]:
        return [{"id": i, "dice": float(d)} for i, d in zip(self.ids, self.dice)]

    def per_volume(self) -> list[dict]:
        return [{"volume": g, "dice": float(d)} for g, d in self.volumes.items()]


def voxel_ml_by_volume(dataset: Dataset, data: CachedData) -> dict[str, float]:
    """mL of one working-size voxel of each volume whose spacing is known (NIfTI): the native
    voxel (mm³) times the native pixels one working pixel stands for, over 1000."""
    first_row: dict[str | None, int] = {}
    for i, g in enumerate(data.groups):
        first_row.setdefault(g, i)
    out = {}
    for info in dataset.volumes:
        if info.case in first_row:
            w, h = data.orig_sizes[first_row[info.case]]
            out[info.case] = float(np.prod(info.spacing)) * w * h / data.size ** 2 / 1000.0
    return out


def score_model(checkpoint: Checkpoint, data: CachedData, indices: np.ndarray, *, device="cpu",
                precision: str = "auto", batch_size: int = 16, reporter: Reporter = SILENT,
                slice_index: Sequence[int] | None = None, voxel_ml: Mapping[str, float] | None = None,
                largest_component: bool = False) -> Evaluation:
    """Dice of ``checkpoint`` on ``data`` rows ``indices`` (which must all have masks).

    For grouped rows, ``slice_index`` (one per row of ``data``; default the row number, which
    the readers keep in slice order) places each slice in its volume, ``voxel_ml`` (group -> mL
    per working-size voxel) turns false positives into mL, and ``largest_component`` measures
    the primary figures after keeping each volume's largest 3D component.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise AlsegError("no images with masks to evaluate")
    groups = [data.groups[i] for i in indices]
    if any(g is not None for g in groups):
        where = np.arange(len(data.ids)) if slice_index is None else np.asarray(slice_index, dtype=np.int64)
        if len(where) != len(data.ids):
            raise ValueError(f"slice_index has {len(where)} entries for {len(data.ids)} rows")
        return _score_volumes(checkpoint, data, indices, groups, where[indices], device=device, precision=precision,
                              batch_size=batch_size, reporter=reporter, voxel_ml=voxel_ml,
                              largest_component=largest_component)
    if largest_component:
        raise AlsegError("the largest 3D component needs volumes (grouped data: LGG patients, NIfTI volumes, "
                         "a folder with groups.csv); these images have no groups")
    inter_all, total_all = [], []
    with staged(reporter, "evaluate", len(indices)) as advance:
        for start in range(0, len(indices), CHUNK):
            idx = indices[start:start + CHUNK]
            inter, total = dice_counts(_predict(checkpoint, data, idx, device, precision, batch_size),
                                       np.asarray(data.masks[idx]) > 0)
            inter_all.append(inter)
            total_all.append(total)
            advance(start + len(idx))
    inter, total = np.concatenate(inter_all), np.concatenate(total_all)
    summary = summarize_dice(inter, total, None)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return Evaluation(summary, [data.ids[i] for i in indices], dice)


def _predict(checkpoint: Checkpoint, data: CachedData, idx: np.ndarray, device, precision: str,
             batch_size: int) -> np.ndarray:
    probs = predict_probs(checkpoint.model, np.asarray(data.images[idx]), checkpoint.normalizer,
                          device=device, precision=precision, batch_size=batch_size)
    return probs > 0.5


def _score_volumes(checkpoint: Checkpoint, data: CachedData, indices: np.ndarray, groups: list[str | None],
                   where: np.ndarray, *, device, precision: str, batch_size: int, reporter: Reporter,
                   voxel_ml: Mapping[str, float] | None, largest_component: bool) -> Evaluation:
    """Grouped rows: predicted in volume order, each volume scored when its last slice is in."""
    n = len(indices)
    # ungrouped rows first, then volume by volume in slice order
    order = sorted(range(n), key=lambda j: (groups[j] is not None, groups[j] or "", int(where[j]), j))
    left: dict[str, int] = {}
    for g in groups:
        if g is not None:
            left[g] = left.get(g, 0) + 1
    pending: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    inter = np.zeros(n, np.int64)
    total = np.zeros(n, np.int64)
    raw: dict[str, VolumeScore] = {}
    lcc: dict[str, VolumeScore] = {}
    with staged(reporter, "evaluate", n) as advance:
        for start in range(0, n, CHUNK):
            pos = np.asarray(order[start:start + CHUNK], dtype=np.int64)
            idx = indices[pos]
            pred = _predict(checkpoint, data, idx, device, precision, batch_size)
            truth = np.asarray(data.masks[idx]) > 0
            for j, p, t in zip(pos, pred, truth):
                g = groups[j]
                if g is None:
                    i, tot = dice_counts(p[None], t[None])
                    inter[j], total[j] = i[0], tot[0]
                    continue
                pending.setdefault(g, []).append((int(j), p, t))
                left[g] -= 1
                if left[g] == 0:
                    rows = pending.pop(g)
                    at = where[[r[0] for r in rows]]
                    pred_vol = stack_slices(np.stack([r[1] for r in rows]), at)
                    truth_vol = stack_slices(np.stack([r[2] for r in rows]), at)
                    kept = largest_component_3d(pred_vol)
                    raw[g], lcc[g] = score_volume(pred_vol, truth_vol), score_volume(kept, truth_vol)
                    primary = kept if largest_component else pred_vol
                    planes = at - at.min()
                    i, tot = dice_counts(primary[planes], truth_vol[planes])
                    inter[[r[0] for r in rows]], total[[r[0] for r in rows]] = i, tot
            advance(start + len(pos))
    scores = lcc if largest_component else raw
    summary = summarize_dice(inter, total, groups)
    summary.update(summarize_volumes(scores, voxel_ml))
    summary["volume_dice_mean_raw"] = summarize_volumes(raw)["volume_dice_mean"]
    summary["volume_dice_mean_largest_component"] = summarize_volumes(lcc)["volume_dice_mean"]
    summary["largest_component"] = largest_component
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return Evaluation(summary, [data.ids[i] for i in indices], dice, {g: s.dice for g, s in sorted(scores.items())})


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
             largest_component: bool = False, reporter: Reporter = SILENT) -> Evaluation:
    """Evaluate a checkpoint (or a run's latest model) on the labelled images at ``data_path``.

    ``split`` other than ``all`` needs a run directory and keeps that split's ids of the run.
    Grouped data is also scored per volume (see the module's docstring); ``largest_component``
    measures the primary figures after keeping each volume's largest 3D component.
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
    evaluation = score_model(ckpt, data, indices, device=dev, reporter=reporter, slice_index=dataset.slice_indices(),
                             voxel_ml=voxel_ml_by_volume(dataset, data), largest_component=largest_component)
    evaluation.summary = with_headline(evaluation.summary, _evaluated_headline(dataset.format, run_dir, split,
                                                                               positive_only))
    return evaluation


def _evaluated_headline(format: str, run_dir: Path | None, split: str, positive_only: bool) -> str:
    """The headline of an ``evaluate`` call: every masked image (``split="all"``) is whole volumes;
    a run's split is whole volumes as the run's own headline says; ``positive_only`` never is."""
    from alseg.store import RunStore

    if positive_only:
        return headline_metric(format, TUMOUR_SLICES_ONLY)
    if split == "all" or run_dir is None:
        return headline_metric(format, "default")
    with RunStore.open_readonly(run_dir) as store:
        recorded = store.split()
    return headline_metric(format, recorded["preset"], recorded["split_by"])
