"""Applying a trained model to new, unlabelled images: masks, uncertainty maps and scores on disk.

Owns ``alseg predict``: the step from "a checkpoint and a folder of images" to files a person can
open. The folder is either a layout :func:`alseg.data.sources.detect_format` recognises, read by the
same readers as training (its images are used, its masks skipped: a kaggle_3m patient folder gives
one output per slice, none for its ``*_mask.tif``), or a plain folder of image files (id = file stem).

Each image (a 2D file, or a volume's slice, read through :func:`alseg.data.samples.sample_image`) is
brought to the checkpoint's working size and channel count with :func:`alseg.data.cache.fit_image`
(exactly as training saw its pixels), and predicted in batches:

* ``mc >= 2``: T dropout-on passes (:func:`alseg.active.uncertainty.mc_dropout`); the mask is the MC mean
  and the uncertainty map the per-pixel variance of the T probabilities;
* ``mc == 0``: one deterministic pass (dropout off); no uncertainty map, no scores.

Everything is written into a hidden sibling folder ``.OUT.partial-*`` that is renamed to ``OUT`` only
when complete, so a failure (an unreadable folder, a full disk) leaves no half-written ``OUT``.
Written under ``OUT/`` for 2D layouts and plain folders:

* ``masks/<id>.png``: mode L, 0/255; the probability map resized back to the image's original
  width x height (bilinear), then thresholded at 0.5;
* ``uncertainty/<id>.png``: the variance map at original size, RGB, 'magma' colormap on the fixed
  scale 0..0.25 (the largest possible variance of a probability), so maps compare across images;
* ``scores.csv``: ``id,file,width,height,foreground_fraction,variance,entropy,bald,status``, one row
  per image found. ``foreground_fraction`` is that of the written mask; ``variance``, ``entropy`` and
  ``bald`` are the per-image sums over the working-size pixels (as in active-learning selection).
  ``status`` is ``ok`` or ``skipped: PROBLEM``.

For volume layouts (``nifti``, ``dicom``) every slice is predicted as above (mask and variance at the
slice's original size) and the slices are stacked back into their volume; a slice id (``CASE/z042``)
never becomes a path. Written per case:

* ``masks/CASE.nii.gz``: uint8 0/1. A NIfTI input gets its mask in the input file's own orientation,
  shape and header geometry (voxel order, qform/sform and their codes, spacing, units), so it
  overlays the input voxel for voxel in any viewer; a DICOM series (no file to copy) gets the
  canonical RAS+ array with the canonical affine (qform = sform, code 1), which viewers place by
  world coordinates;
* ``uncertainty/CASE.nii.gz``: float32 MC variance of the foreground probability, same geometry
  (``mc >= 2`` only);
* ``scores.csv``: one row per slice, ``id,case,axis,slice,file,width,height,foreground_fraction,
  variance,entropy,bald,status`` (``axis`` and ``slice`` index the canonical RAS+ volume, as
  :mod:`alseg.data.volumes` slices it);
* ``volumes.csv``: one row per case, ``case,file,mask,uncertainty,slices,axis,shape,spacing_mm,
  lesion_voxels,lesion_ml,variance,status``: the written files, their shape and voxel size (in the
  written file's axis order), the predicted lesion's voxel count and volume in mL (voxels x the
  voxel volume in mm^3 / 1000; spacing as the volume reader reports it, in mm), the sum of the
  slices' variance scores. A case is written whole or not at all: if any slice cannot be read,
  none of its files is written and its row (and its slices' rows) say ``skipped: PROBLEM``.

An unreadable image is reported (``Reporter.note``, once per volume for volumes), listed in the result
and in ``scores.csv``, and skipped; only when no image at all could be read is it an
:class:`~alseg.errors.AlsegError`. Results are deterministic for a seed, batch size and device.
"""
from __future__ import annotations

import csv
import errno
import io
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alseg.data.cache import fit_image, map_to_size as _to_original
from alseg.data.imageio import png_bytes
from alseg.data.samples import is_slice, sample_image
from alseg.data.sources import Sample, detect_format, images_by_stem, open_dataset
from alseg.data.volumes import VolumeInfo, nifti_gz_bytes, volume_image  # one writer for predict and export
from alseg.errors import AlsegError
from alseg.progress import SILENT, Reporter
from alseg.runtime import resolve_device
from alseg.store import atomic_write_bytes, atomic_write_text

MAX_VARIANCE = 0.25  # p(1 - p) at p = 0.5: the largest variance a probability can have
COLUMNS = ("id", "file", "width", "height", "foreground_fraction", "variance", "entropy", "bald", "status")
SLICE_COLUMNS = ("id", "case", "axis", "slice", "file", "width", "height", "foreground_fraction", "variance",
                 "entropy", "bald", "status")
VOLUME_COLUMNS = ("case", "file", "mask", "uncertainty", "slices", "axis", "shape", "spacing_mm", "lesion_voxels",
                  "lesion_ml", "variance", "status")
BATCH = 16


def list_samples(images: str | Path, format: str | None = None,
                 volume_axis: int | str | None = None) -> tuple[list[Sample], tuple[VolumeInfo, ...]]:
    """Every image to predict as samples, and the volumes they are slices of (empty for 2D).

    A known layout gives its own samples (``volume_axis`` as :func:`~alseg.data.sources.open_dataset`
    takes it); a plain folder gives one sample per image file, id = file stem.
    """
    root = Path(images)
    if not root.exists():
        raise AlsegError("no such folder", root)
    if not root.is_dir():
        raise AlsegError("not a folder (give the folder of images)", root)
    if format is None:
        try:
            format = detect_format(root)
        except AlsegError:
            format = None
    if format is not None:
        ds = open_dataset(root, format, volume_axis)
        return list(ds.samples), ds.volumes
    if volume_axis is not None:
        raise AlsegError("a volume axis applies to NIfTI or DICOM volumes, not to a plain folder of images", root)
    found = images_by_stem(root.absolute())
    if not found:
        raise AlsegError("no images found: expected image files (png, jpg, tif) or a dataset layout "
                         "(isic2017, lgg, folder, nifti, dicom)", root)
    return [Sample(sid, path, None) for sid, path in found.items()], ()


def list_images(images: str | Path, format: str | None = None) -> list[tuple[str, Path]]:
    """``(id, path)`` of every image to predict: a known layout's images, else the folder's image files."""
    return [(s.id, s.image) for s in list_samples(images, format)[0]]


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise AlsegError("output path exists and is not a folder", out)
        if any(out.iterdir()):
            raise AlsegError("output folder exists and is not empty", out)


def uncertainty_rgb(variance: np.ndarray) -> np.ndarray:
    """A variance map as ``(H, W, 3)`` uint8 via 'magma' on the fixed scale 0..0.25."""
    from matplotlib import colormaps

    scaled = np.clip(variance / MAX_VARIANCE, 0.0, 1.0)
    return colormaps["magma"](scaled, bytes=True)[:, :, :3]


def _load(sample: Sample, size: int, channels: int, failed: dict[str, str]):
    """``(fitted image, (width, height))`` or ``(None, problem)`` for an image that will not decode."""
    if is_slice(sample) and sample.group in failed:
        return None, failed[sample.group]  # its volume already failed: decoding it again would fail again
    try:
        img = sample_image(sample)
    except AlsegError as exc:
        return None, exc.problem
    h, w = img.shape[:2]
    return fit_image(img, size, channels), (w, h)


def predict_folder(checkpoint: str | Path, images: str | Path, out: str | Path, *, mc: int = 20,
                   format: str | None = None, volume_axis: int | str | None = None, device: str = "auto",
                   seed: int = 0, reporter: Reporter = SILENT) -> dict:
    """Predict every image under ``images`` with ``checkpoint`` (a file or a run directory) into ``out``.

    ``volume_axis`` slices NIfTI/DICOM volumes along that axis (default: each volume's thinnest).
    Returns ``{"images": n_predicted, "skipped": [{"file", "problem"}], "out", "mc"}``; for volume
    layouts ``images`` counts slices, ``skipped`` has one entry per volume (with its ``case``) and
    ``volumes`` counts the volumes written.
    """
    from alseg.evaluate import resolve_checkpoint
    from alseg.train import Checkpoint

    if mc == 1 or mc < 0:
        raise AlsegError(f"--mc must be 0 (deterministic) or at least 2 MC-dropout passes, got {mc}")
    out = Path(out)
    _check_out(out)
    samples, volumes = list_samples(images, format, volume_axis)
    dev = resolve_device(device)
    ckpt_path, _ = resolve_checkpoint(checkpoint)
    ckpt = Checkpoint.load(ckpt_path, dev)
    size, channels = ckpt.size, ckpt.model.config.in_channels
    if channels not in (1, 3):
        raise AlsegError(f"model takes {channels} input channels; predict handles 1 (grey) or 3 (RGB)", ckpt_path)

    created = [d for d in out.absolute().parents if not d.exists()]  # nearest first; removed again on failure
    staging: Path | None = None
    published = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        rows, skipped, volume_rows = _predict_into(staging, samples, volumes, ckpt, dev, size, channels, mc, seed,
                                                   reporter)
        n_ok = sum(r["status"] == "ok" for r in rows)
        if n_ok == 0:
            raise AlsegError(f"none of the {len(samples)} images could be read (first: "
                             f"{Path(skipped[0]['file']).name}: {skipped[0]['problem']})", images)
        atomic_write_text(staging / "scores.csv", _csv(SLICE_COLUMNS if volumes else COLUMNS, rows))
        if volumes:
            atomic_write_text(staging / "volumes.csv", _csv(VOLUME_COLUMNS, volume_rows))
        _publish(staging, out)
        published = True
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AlsegError("disk full while writing predictions; nothing was written", out) from None
        if isinstance(exc, PermissionError):
            raise AlsegError(f"cannot write the output ({exc.strerror}); nothing was written", out) from None
        raise
    finally:
        if not published:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break
    result = {"images": n_ok, "skipped": skipped, "out": str(out), "mc": mc}
    if volumes:
        result["volumes"] = sum(r["status"] == "ok" for r in volume_rows)
    return result


def _csv(columns: tuple[str, ...], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out`` (absent, or the empty folder checked before)."""
    try:
        os.replace(staging, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise AlsegError("output folder was filled by something else while predicting; nothing was written",
                             out) from None
        raise


@dataclass
class _Volume:
    """One case's predictions being stacked, slice by slice, in its canonical RAS+ array."""

    info: VolumeInfo
    mask: np.ndarray  # (X, Y, Z) uint8 0/1
    variance: np.ndarray | None  # (X, Y, Z) float32, or None without MC passes
    slice_variance: np.ndarray | None  # each slice's variance score (summed in slice order when written)
    seen: int = 0  # slices predicted or skipped so far

    @classmethod
    def empty(cls, info: VolumeInfo, mc: int) -> "_Volume":
        if mc < 2:
            return cls(info, np.zeros(info.shape, np.uint8), None, None)
        return cls(info, np.zeros(info.shape, np.uint8), np.zeros(info.shape, np.float32), np.zeros(info.slices))


def _predict_into(out: Path, samples: list[Sample], volumes: tuple[VolumeInfo, ...], ckpt, dev, size: int,
                  channels: int, mc: int, seed: int,
                  reporter: Reporter) -> tuple[list[dict], list[dict], list[dict]]:
    """Predict ``samples`` into the folder ``out``: ``(scores.csv rows, skipped, volumes.csv rows)``."""
    from alseg.active.uncertainty import mc_dropout
    from alseg.train import predict_probs

    volume_of = {v.case: v for v in volumes}
    stacking: dict[str, _Volume] = {}
    failed: dict[str, str] = {}  # case -> the first problem met reading one of its slices
    rows: list[dict] = []
    skipped: list[dict] = []
    volume_rows: list[dict] = []
    advance = reporter.stage("predict", len(samples))
    done = 0
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            # Pillow and tifffile release the GIL while decoding and encoding, so threads overlap them.
            for start in range(0, len(samples), BATCH):
                chunk = samples[start:start + BATCH]
                loaded = list(pool.map(lambda s: _load(s, size, channels, failed), chunk))
                good = [k for k, (img, _) in enumerate(loaded) if img is not None]
                for s, (img, info) in zip(chunk, loaded):
                    if img is not None:
                        continue
                    if not is_slice(s):
                        skipped.append({"file": str(s.image), "problem": info})
                        reporter.note(f"skipped {s.image}: {info}")
                    elif s.group not in failed:
                        failed[s.group] = info
                        skipped.append({"case": s.group, "file": str(s.image), "problem": info})
                        reporter.note(f"skipped volume {s.group} ({s.image}): {info}")
                batch_rows = {k: _skipped_row(chunk[k], loaded[k][1]) for k in range(len(chunk))
                              if k not in good}
                if good:
                    x = np.stack([loaded[k][0] for k in good])
                    if mc >= 2:
                        res = mc_dropout(ckpt.model, x, np.arange(len(good)), ckpt.normalizer, passes=mc,
                                         batch_size=BATCH, device=dev, seed=seed + start, keep_maps=True)
                        probs, var_maps = res.mean, res.variance_map
                        scores = [(float(res.variance[j]), float(res.entropy[j]), float(res.bald[j]))
                                  for j in range(len(good))]
                    else:
                        probs = predict_probs(ckpt.model, x, ckpt.normalizer, device=dev, batch_size=BATCH)
                        var_maps, scores = None, [None] * len(good)
                    for s in (chunk[k] for k in good if is_slice(chunk[k])):
                        if s.group not in stacking:
                            stacking[s.group] = _Volume.empty(volume_of[s.group], mc)

                    def write(job):
                        sample, wh, prob, variance, score = job
                        if is_slice(sample):
                            return _place_slice(stacking[sample.group], sample, wh, prob, variance, score)
                        return _write_one(out, sample, wh, prob, variance, score)

                    jobs = [(chunk[k], loaded[k][1], probs[j], None if var_maps is None else var_maps[j], scores[j])
                            for j, k in enumerate(good)]
                    for k, row in zip(good, pool.map(write, jobs)):
                        batch_rows[k] = row
                rows.extend(batch_rows[k] for k in range(len(chunk)))
                # A volume is written once its last slice is in: slices come grouped by case, in order.
                for case in dict.fromkeys(s.group for s in chunk if is_slice(s)):
                    seen = sum(1 for s in chunk if is_slice(s) and s.group == case)
                    vol = stacking.get(case)
                    if vol is None:
                        vol = stacking[case] = _Volume(volume_of[case], np.zeros(0, np.uint8), None, None)  # failed
                    vol.seen += seen
                    if vol.seen >= vol.info.slices:
                        volume_rows.append(_write_volume(out, stacking.pop(case), failed.get(case)))
                done += len(chunk)
                advance(done)
    finally:
        reporter.end_stage()
    return rows, skipped, volume_rows


def _file_name(sid: str, suffix: str) -> str:
    """``sid + suffix`` as one file name in an output folder; an id that would be a path is refused."""
    if "/" in sid or "\\" in sid or sid in ("", ".", "..") or "\0" in sid:
        raise AlsegError(f"id {sid!r} cannot be an output file name (it would be a path)")
    return sid + suffix


def _skipped_row(sample: Sample, problem: str) -> dict:
    row = {**{c: "" for c in SLICE_COLUMNS}, "id": sample.id, "file": str(sample.image),
           "status": f"skipped: {problem}"}
    if is_slice(sample):
        row.update(case=sample.group, axis=sample.axis, slice=sample.slice)
        return row
    return {c: row[c] for c in COLUMNS}


def _score_fields(scores: tuple[float, float, float] | None) -> dict:
    if scores is None:
        return {"variance": "", "entropy": "", "bald": ""}
    return {"variance": repr(scores[0]), "entropy": repr(scores[1]), "bald": repr(scores[2])}


def _write_one(out: Path, sample: Sample, wh: tuple[int, int], prob: np.ndarray,
               variance: np.ndarray | None, scores: tuple[float, float, float] | None) -> dict:
    """A 2D image's mask and uncertainty PNGs; its scores.csv row."""
    w, h = wh
    mask = _to_original(prob, w, h) > 0.5
    atomic_write_bytes(out / "masks" / _file_name(sample.id, ".png"), png_bytes(mask.astype(np.uint8) * 255))
    if variance is not None:
        atomic_write_bytes(out / "uncertainty" / _file_name(sample.id, ".png"),
                           png_bytes(uncertainty_rgb(_to_original(variance, w, h))))
    return {"id": sample.id, "file": str(sample.image), "width": w, "height": h,
            "foreground_fraction": f"{float(mask.mean()):.6f}", **_score_fields(scores), "status": "ok"}


def _place_slice(vol: _Volume, sample: Sample, wh: tuple[int, int], prob: np.ndarray,
                 variance: np.ndarray | None, scores: tuple[float, float, float] | None) -> dict:
    """A slice's mask and variance at original size put into its volume's plane; its scores.csv row."""
    w, h = wh
    mask = _to_original(prob, w, h) > 0.5
    # the plane image_slice read: take(k, axis) of the canonical array, rows the lower remaining axis
    np.moveaxis(vol.mask, sample.axis, 0)[sample.slice] = mask
    if variance is not None and vol.variance is not None:
        np.moveaxis(vol.variance, sample.axis, 0)[sample.slice] = _to_original(variance, w, h)
    if scores is not None and vol.slice_variance is not None:
        vol.slice_variance[sample.slice] = scores[0]  # one element per thread: no lost update
    return {"id": sample.id, "case": sample.group, "axis": sample.axis, "slice": sample.slice,
            "file": str(sample.image), "width": w, "height": h,
            "foreground_fraction": f"{float(mask.mean()):.6f}", **_score_fields(scores), "status": "ok"}


def _write_volume(out: Path, vol: _Volume, problem: str | None) -> dict:
    """A finished case's ``masks/`` (and ``uncertainty/``) NIfTI files; its volumes.csv row."""
    info = vol.info
    row = {c: "" for c in VOLUME_COLUMNS}
    row.update(case=info.case, file=str(info.image_files[0]), slices=info.slices, axis=info.axis)
    if problem is not None:
        return {**row, "status": f"skipped: {problem}"}
    name = _file_name(info.case, ".nii.gz")
    mask_img = volume_image(info, vol.mask)
    atomic_write_bytes(out / "masks" / name, nifti_gz_bytes(mask_img))
    row["mask"] = f"masks/{name}"
    if vol.variance is not None:
        atomic_write_bytes(out / "uncertainty" / name, nifti_gz_bytes(volume_image(info, vol.variance)))
        row["uncertainty"] = f"uncertainty/{name}"
    if vol.slice_variance is not None:
        row["variance"] = repr(float(vol.slice_variance.sum()))
    voxels = int(np.count_nonzero(vol.mask))
    row.update(shape="x".join(str(n) for n in mask_img.shape),
               spacing_mm="x".join(f"{float(z):g}" for z in mask_img.header.get_zooms()[:3]),
               lesion_voxels=voxels, lesion_ml=repr(lesion_ml(voxels, info.spacing)), status="ok")
    return row


def lesion_ml(voxels: int, spacing: tuple[float, float, float]) -> float:
    """The volume in mL of ``voxels`` voxels of ``spacing`` mm (1 mL = 1000 mm^3)."""
    return voxels * math.prod(spacing) / 1000.0
