"""Export of a batch for the expert: ``RUN_DIR/rounds/RRR/``.

For each queued image: the image at its original size (a JPEG source stays JPEG, its bytes
copied when the browser would show them as decoded; anything else becomes PNG, so any browser
shows it), the model's predicted mask as a head start (0/255 PNG at the original size, the thresholded MC mean
of the model that chose the batch), an uncertainty overlay a person can read (the image under a
magma colour map of the per-pixel MC variance, each image scaled to its own 99.5th percentile so
its structure shows; the scale is in the manifest; a JPEG at quality 90, as a photograph-like
picture it is several times smaller than a PNG) and ``manifest.csv`` (id, file names, score,
why it was chosen). ``masks/`` is where the expert's masks are expected.

The folder is written under a temporary name and renamed when complete, so a crash never leaves
a half-exported batch; exporting again returns the batch already there (the same batch until it
is labelled).
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alseg.active.strategies import reason_label
from alseg.data.cache import map_to_size
from alseg.data.imageio import png_bytes, read_image
from alseg.errors import AlsegError
from alseg.runtime import step_seed

MANIFEST = "manifest.csv"
JPEG_SUFFIXES = (".jpg", ".jpeg")
OVERLAY_QUALITY = 90
COLUMNS = ("id", "image", "predicted", "uncertainty", "mask", "score", "reason", "width", "height",
           "uncertainty_scale")
@dataclass(frozen=True)
class BatchItem:
    """One image of an exported batch; file names are relative to the batch folder."""

    id: str
    image: str
    predicted: str | None
    uncertainty: str | None
    mask: str
    score: float | None
    reason: str
    width: int
    height: int
    uncertainty_scale: float | None


def file_stem(id: str, taken: set[str]) -> str:
    """A file name for ``id`` that is safe on every file system and unique in the batch."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", id).lstrip(".") or "image"
    base, k = stem, 1
    while stem.lower() in taken:
        k += 1
        stem = f"{base}-{k}"
    taken.add(stem.lower())
    return stem


def uncertainty_overlay(image: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, float]:
    """The image under a magma colour map of ``variance`` (same H x W); returns (RGB uint8, scale)."""
    from matplotlib import colormaps

    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    scale = float(np.percentile(variance, 99.5))
    if scale <= 0:
        scale = float(variance.max()) or 1.0
    level = np.clip(variance / scale, 0, 1)
    colour = colormaps["magma"](level)[:, :, :3] * 255
    alpha = (0.25 + 0.65 * level)[:, :, None]  # the image shows through where the model is sure
    return (rgb * (1 - alpha) + colour * alpha).round().astype(np.uint8), scale


def image_file(source: Path, image: np.ndarray) -> tuple[str, bytes]:
    """The batch's copy of an image: ``(suffix, bytes)``.

    A JPEG source stays JPEG: its own bytes when a browser shows it as :func:`read_image` decodes
    it (8-bit grey or RGB, no EXIF rotation), else the decoded pixels re-encoded at quality 95.
    Other sources become PNG (lossless, shown by every browser).
    """
    pixels = image if image.shape[2] == 3 else image[:, :, 0]
    if source.suffix.lower() not in JPEG_SUFFIXES:
        return ".png", png_bytes(pixels)
    from PIL import Image

    with Image.open(source) as im:
        as_shown = im.format == "JPEG" and im.mode in ("L", "RGB") and im.getexif().get(0x0112, 1) == 1
    if as_shown:
        return ".jpg", source.read_bytes()
    return ".jpg", jpeg_bytes(pixels, 95)


def jpeg_bytes(arr: np.ndarray, quality: int) -> bytes:
    """``arr`` (H x W or H x W x 3 uint8) encoded as JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read_manifest(folder: Path) -> list[BatchItem]:
    path = folder / MANIFEST
    if not path.is_file():
        raise AlsegError("the batch has no manifest.csv (not exported yet?)", folder)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    num = lambda v: float(v) if v not in (None, "") else None
    return [BatchItem(r["id"], r["image"], r["predicted"] or None, r["uncertainty"] or None, r["mask"],
                      num(r["score"]), r["reason"], int(r["width"]), int(r["height"]), num(r["uncertainty_scale"]))
            for r in rows]


def export_batch(run, round: int) -> Path:
    """Write the queued batch of ``round`` of an :class:`~alseg.active.loop.ActiveRun`; return its folder."""
    from alseg.active.uncertainty import mc_dropout

    folder = run.dir.batch(round)
    if (folder / MANIFEST).is_file():
        return folder
    store, data, a = run.store, run.data, run.config.active
    ids = store.selection(round, "expert")
    reasons = store.selection_reasons(round)
    scores = store.scores(round)
    samples = {s.id: s for s in run.dataset.samples}
    mc = None
    # A model no better than a constant mask offers no head start: its masks would cost the expert
    # more to correct than to draw (alseg.active.gate); the uncertainty overlays still show where it is lost.
    health = run.health(round - 1) if round > 0 else None
    head_start = health is not None and health.useful
    if round > 0:
        model = run._load_model(round - 1).model
        mc = mc_dropout(model, data.images, data.indices(ids), run.normalizer, passes=a.mc_passes,
                        batch_size=a.mc_batch_size, device=run.device, precision=a.mc_precision,
                        seed=step_seed(run.config.seed, round, 6), keep_maps=True)
    tmp = folder.parent / f".{folder.name}.exporting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "predicted", "uncertainty", "masks"):
        (tmp / sub).mkdir(parents=True)
    taken: set[str] = set()
    rows = []
    try:
        for k, id in enumerate(ids):
            image = read_image(samples[id].image)
            height, width = image.shape[:2]
            stem = file_stem(id, taken)
            suffix, image_data = image_file(Path(samples[id].image), image)
            row = {"id": id, "image": f"images/{stem}{suffix}", "predicted": "", "uncertainty": "",
                   "mask": f"masks/{stem}.png", "score": "", "reason": reason_label(reasons.get(id)),
                   "width": width, "height": height, "uncertainty_scale": ""}
            (tmp / row["image"]).write_bytes(image_data)
            if mc is not None and head_start:
                mean = map_to_size(mc.mean[k], width, height)
                row["predicted"] = f"predicted/{stem}.png"
                (tmp / row["predicted"]).write_bytes(png_bytes(((mean > 0.5) * 255).astype(np.uint8)))
            if mc is not None:
                overlay, scale = uncertainty_overlay(image, np.clip(map_to_size(mc.variance_map[k], width, height), 0, None))
                row["uncertainty"] = f"uncertainty/{stem}.jpg"
                row["uncertainty_scale"] = f"{scale:.6g}"
                (tmp / row["uncertainty"]).write_bytes(jpeg_bytes(overlay, OVERLAY_QUALITY))
            if scores.get(id, {}).get("variance") is not None:
                row["score"] = f"{scores[id]['variance']:.6g}"
            rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (tmp / MANIFEST).write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
