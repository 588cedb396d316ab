"""Applying a trained model to new, unlabelled images: masks, uncertainty maps and scores on disk.

Owns ``alseg predict``: the step from "a checkpoint and a folder of images" to files a person can
open. The folder is either a layout :func:`alseg.data.sources.detect_format` recognises, read by the
same readers as training (its images are used, its masks skipped: a kaggle_3m patient folder gives
one output per slice, none for its ``*_mask.tif``), or a plain folder of image files (id = file stem).

Each image is decoded, brought to the checkpoint's working size and channel count with
:func:`alseg.data.cache.fit_image` (exactly as training saw its pixels), and predicted in batches:

* ``mc >= 2``: T dropout-on passes (:func:`alseg.active.uncertainty.mc_dropout`); the mask is the MC mean
  and the uncertainty map the per-pixel variance of the T probabilities;
* ``mc == 0``: one deterministic pass (dropout off); no uncertainty map, no scores.

Everything is written into a hidden sibling folder ``.OUT.partial-*`` that is renamed to ``OUT`` only
when complete, so a failure (an unreadable folder, a full disk) leaves no half-written ``OUT``.
Written under ``OUT/``:

* ``masks/<id>.png``: mode L, 0/255; the probability map resized back to the image's original
  width x height (bilinear), then thresholded at 0.5;
* ``uncertainty/<id>.png``: the variance map at original size, RGB, 'magma' colormap on the fixed
  scale 0..0.25 (the largest possible variance of a probability), so maps compare across images;
* ``scores.csv``: ``id,file,width,height,foreground_fraction,variance,entropy,bald,status``, one row
  per image found. ``foreground_fraction`` is that of the written mask; ``variance``, ``entropy`` and
  ``bald`` are the per-image sums over the working-size pixels (as in active-learning selection).
  ``status`` is ``ok`` or ``skipped: PROBLEM``.

An unreadable image is reported (``Reporter.note``), listed in the result and in ``scores.csv``, and
skipped; only when no image at all could be read is it an :class:`~alseg.errors.AlsegError`.
Results are deterministic for a seed, batch size and device.
"""
from __future__ import annotations

import csv
import errno
import io
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alseg.data.cache import fit_image, map_to_size as _to_original
from alseg.data.imageio import png_bytes, read_image
from alseg.data.sources import detect_format, images_by_stem, open_dataset
from alseg.errors import AlsegError
from alseg.progress import SILENT, Reporter
from alseg.runtime import resolve_device
from alseg.store import atomic_write_bytes, atomic_write_text

MAX_VARIANCE = 0.25  # p(1 - p) at p = 0.5: the largest variance a probability can have
COLUMNS = ("id", "file", "width", "height", "foreground_fraction", "variance", "entropy", "bald", "status")
BATCH = 16


def list_images(images: str | Path, format: str | None = None) -> list[tuple[str, Path]]:
    """``(id, path)`` of every image to predict: a known layout's images, else the folder's image files."""
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
        return [(s.id, s.image) for s in open_dataset(root, format).samples]
    found = images_by_stem(root.absolute())
    if not found:
        raise AlsegError("no images found: expected image files (png, jpg, tif) or a dataset layout "
                         "(isic2017, lgg, folder)", root)
    return list(found.items())


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


def _load(item: tuple[str, Path], size: int, channels: int):
    """``(fitted image, (width, height))`` or ``(None, problem)`` for a file that will not decode."""
    _, path = item
    try:
        img = read_image(path)
    except AlsegError as exc:
        return None, exc.problem
    h, w = img.shape[:2]
    return fit_image(img, size, channels), (w, h)


def predict_folder(checkpoint: str | Path, images: str | Path, out: str | Path, *, mc: int = 20,
                   format: str | None = None, device: str = "auto", seed: int = 0,
                   reporter: Reporter = SILENT) -> dict:
    """Predict every image under ``images`` with ``checkpoint`` (a file or a run directory) into ``out``.

    Returns ``{"images": n_predicted, "skipped": [{"file", "problem"}], "out", "mc"}``.
    """
    from alseg.evaluate import resolve_checkpoint
    from alseg.train import Checkpoint

    if mc == 1 or mc < 0:
        raise AlsegError(f"--mc must be 0 (deterministic) or at least 2 MC-dropout passes, got {mc}")
    out = Path(out)
    _check_out(out)
    items = list_images(images, format)
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
        rows, skipped = _predict_into(staging, items, ckpt, dev, size, channels, mc, seed, reporter)
        n_ok = len(items) - len(skipped)
        if n_ok == 0:
            raise AlsegError(f"none of the {len(items)} images could be read (first: "
                             f"{Path(skipped[0]['file']).name}: {skipped[0]['problem']})", images)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(staging / "scores.csv", buf.getvalue())
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
    return {"images": n_ok, "skipped": skipped, "out": str(out), "mc": mc}


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out`` (absent, or the empty folder checked before)."""
    try:
        os.replace(staging, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise AlsegError("output folder was filled by something else while predicting; nothing was written",
                             out) from None
        raise


def _predict_into(out: Path, items, ckpt, dev, size: int, channels: int, mc: int, seed: int,
                  reporter: Reporter) -> tuple[list[dict], list[dict]]:
    """Predict ``items`` into the folder ``out``: ``(scores.csv rows, skipped files)``."""
    from alseg.active.uncertainty import mc_dropout
    from alseg.train import predict_probs

    rows: list[dict] = []
    skipped: list[dict] = []
    advance = reporter.stage("predict", len(items))
    done = 0
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            # Pillow and tifffile release the GIL while decoding and encoding, so threads overlap them.
            for start in range(0, len(items), BATCH):
                chunk = items[start:start + BATCH]
                loaded = list(pool.map(lambda it: _load(it, size, channels), chunk))
                good = [k for k, (img, _) in enumerate(loaded) if img is not None]
                for (sid, path), (img, info) in zip(chunk, loaded):
                    if img is None:
                        skipped.append({"file": str(path), "problem": info})
                        reporter.note(f"skipped {path}: {info}")
                batch_rows = {k: _skipped_row(chunk[k], loaded[k][1]) for k in range(len(chunk)) if k not in good}
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
                    jobs = [(chunk[k], loaded[k][1], probs[j], None if var_maps is None else var_maps[j], scores[j])
                            for j, k in enumerate(good)]
                    for k, row in zip(good, pool.map(lambda job: _write_one(out, *job), jobs)):
                        batch_rows[k] = row
                rows.extend(batch_rows[k] for k in range(len(chunk)))
                done += len(chunk)
                advance(done)
    finally:
        reporter.end_stage()
    return rows, skipped


def _skipped_row(item: tuple[str, Path], problem: str) -> dict:
    sid, path = item
    return {**{c: "" for c in COLUMNS}, "id": sid, "file": str(path), "status": f"skipped: {problem}"}


def _write_one(out: Path, item: tuple[str, Path], wh: tuple[int, int], prob: np.ndarray,
               variance: np.ndarray | None, scores: tuple[float, float, float] | None) -> dict:
    sid, path = item
    w, h = wh
    mask = _to_original(prob, w, h) > 0.5
    atomic_write_bytes(out / "masks" / f"{sid}.png", png_bytes(mask.astype(np.uint8) * 255))
    if variance is not None:
        atomic_write_bytes(out / "uncertainty" / f"{sid}.png", png_bytes(uncertainty_rgb(_to_original(variance, w, h))))
    row = {"id": sid, "file": str(path), "width": w, "height": h,
           "foreground_fraction": f"{float(mask.mean()):.6f}", "variance": "", "entropy": "", "bald": "",
           "status": "ok"}
    if scores is not None:
        row.update(variance=repr(scores[0]), entropy=repr(scores[1]), bald=repr(scores[2]))
    return row
