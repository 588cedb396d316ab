"""Export of a batch for the expert: ``RUN_DIR/rounds/RRR/``.

For each queued image: the image at its original size (a JPEG source stays JPEG, its bytes
copied when the browser would show them as decoded; anything else becomes PNG, so any browser
shows it), the model's predicted mask as a head start (0/255 PNG at the original size, the thresholded MC mean
of the model that chose the batch), an uncertainty overlay a person can read (the image under a
magma colour map of the per-pixel MC variance, each image scaled to its own 99.5th percentile so
its structure shows; the scale is in the manifest; a JPEG at quality 90, as a photograph-like
picture it is several times smaller than a PNG) and ``manifest.csv`` (id, file names, score,
why it was chosen). ``masks/`` is where the expert's masks are expected.

A project over volumes (NIfTI files, DICOM series) also gets ``volumes/``, per case with slices in
the batch, for a viewer (3D Slicer, ITK-SNAP, MONAI Label): ``CASE_predicted.nii.gz`` (the head start
over every slice of the case, on the source's grid and header), ``CASE_uncertainty.nii.gz`` (the MC
variance on the batch's slices) and ``CASE_slices.txt`` (which slices are asked for, as voxel indices
in those files' order); see :func:`write_volumes`. The corrected volume comes back through
:mod:`alseg.annotate.ingest`, which takes only the batch's slices from it. The PNGs stay as for 2D
images (the review page shows them).

The folder is written under a temporary name and renamed when complete, so a crash never leaves
a half-exported batch; exporting again returns the batch already there (the same batch until it
is labelled). Each image's file stem is its id when the id is already a safe file name, so no file
name of the batch equals another image's id (:func:`batch_stems`).

The manifest is for people; the batch's truth is in the store: each item's id, file names and
original width and height are recorded there at export (:meth:`RunStore.record_batch`) and
:func:`batch_items` takes them from there, so an edited ``manifest.csv`` can never make a 640x480
mask fit a 64x64 image. (Checking the manifest against the image headers alone would trust the
batch's image files, which the user can edit too.) A batch exported before the store kept this is
read from its manifest, its ids checked against the store's selection and its sizes taken from
its image files' headers.

A manifest that cannot be read, or that lists other images than the store's batch, is one line
("manifest.csv is damaged (...); run `alseg query` to export the batch again"), and exporting
again is possible: a batch folder whose manifest is damaged or missing (a half-copied or hand-made
``rounds/RRR/``) is moved aside to ``rounds/RRR.aside-K/`` when it holds expert masks, else removed,
with a note, and the batch is exported afresh.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alseg.active.strategies import reason_label
from alseg.data.cache import map_to_size
from alseg.data.imageio import png_bytes, read_header  # read_header: the batch folder's own files
from alseg.data.samples import is_slice, sample_header, sample_image
from alseg.data.volumes import is_nifti, nifti_gz_bytes, volume_image, written_slice
from alseg.errors import AlsegError
from alseg.runtime import step_seed

MANIFEST = "manifest.csv"
VOLUMES = "volumes"  # a volume project's batch as NIfTI, one set of files per case (write_volumes)
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


def damaged(folder: Path, why: str) -> AlsegError:
    """The one-line error for a batch folder whose manifest cannot be used."""
    return AlsegError(f"manifest.csv is damaged ({why}); run `alseg query` to export the batch again",
                      Path(folder) / MANIFEST)


def _safe_stem(id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", id).lstrip(".") or "image"


def batch_stems(ids: list[str]) -> dict[str, str]:
    """One file stem per id of a batch, unique (case-insensitively) and never another id of the batch.

    An id that is a safe file name keeps it; the others get :func:`file_stem`'s name, which then can
    only differ from every id (``a b`` and ``a_b``: ``a_b-2`` and ``a_b``, so ``a_b_mask.png`` means
    ``a_b``)."""
    taken: set[str] = set()
    stems: dict[str, str] = {}
    for id in ids:
        if _safe_stem(id) == id and id.lower() not in taken:
            stems[id] = id
            taken.add(id.lower())
    for id in ids:
        if id not in stems:
            stems[id] = file_stem(id, taken)
    return stems


def file_stem(id: str, taken: set[str]) -> str:
    """A file name for ``id`` that is safe on every file system and unique in the batch."""
    stem = _safe_stem(id)
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


def display_pixels(image: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` uint8 as a browser shows it: RGB as is, otherwise the first channel as grey."""
    return image if image.shape[2] == 3 else image[:, :, 0]


def image_file(source: Path, image: np.ndarray) -> tuple[str, bytes]:
    """The batch's copy of an image: ``(suffix, bytes)``.

    A JPEG source stays JPEG: its own bytes when a browser shows it as :func:`read_image` decodes
    it (8-bit grey or RGB, no EXIF rotation), else the decoded pixels re-encoded at quality 95.
    Other sources become PNG (lossless, shown by every browser).
    """
    pixels = display_pixels(image)
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
    """The items ``folder``'s manifest.csv lists; AlsegError (damaged) for anything alseg did not write."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise AlsegError("the batch has no manifest.csv (not exported yet?)", folder)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("id", "image", "mask", "width", "height") if c not in (reader.fieldnames or ())]
            if missing:
                raise damaged(folder, f"no column {', '.join(missing)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise damaged(folder, str(exc)) from None
    items, seen = [], set()
    for line, r in enumerate(rows, start=2):
        try:
            items.append(_item(r))
        except (ValueError, TypeError, AttributeError) as exc:
            raise damaged(folder, f"line {line}: {exc}") from None
        if items[-1].id in seen:
            raise damaged(folder, f"line {line}: {items[-1].id!r} listed twice")
        seen.add(items[-1].id)
    return items


def _item(r: dict) -> BatchItem:
    def text(key: str, required: bool = True) -> str | None:
        value = r.get(key) or ""
        if not value:
            if required:
                raise ValueError(f"no {key}")
            return None
        if key != "reason" and key != "id" and (value.startswith(("/", "\\")) or ".." in Path(value).parts):
            raise ValueError(f"{key} {value!r} is not a file of the batch folder")
        return value

    def number(key: str) -> float | None:
        value = r.get(key) or ""
        return float(value) if value else None

    width, height = int(r.get("width") or ""), int(r.get("height") or "")
    if width <= 0 or height <= 0:
        raise ValueError(f"size {width}x{height}")
    return BatchItem(text("id"), text("image"), text("predicted", False), text("uncertainty", False), text("mask"),
                     number("score"), r.get("reason") or "", width, height, number("uncertainty_scale"))


def batch_items(store, round: int, folder: Path | None = None) -> list[BatchItem] | None:
    """The exported batch of ``round`` (None when none is exported), as the store recorded it.

    The manifest must still be readable and list the same images (else AlsegError, damaged). A batch
    exported before the store kept its items (:meth:`~alseg.store.RunStore.batch_record` None) is read
    from the manifest, checked against the store's selection, with each size from its image's header."""
    folder = Path(folder) if folder is not None else store.dir.batch(round)
    if not (folder / MANIFEST).is_file():
        return None
    listed = read_manifest(folder)
    recorded = store.batch_record(round)
    if recorded is not None:
        want = [r["id"] for r in recorded]
        _same_ids(folder, [it.id for it in listed], want)
        return [BatchItem(**{k: r.get(k) for k in COLUMNS}) for r in recorded]
    _same_ids(folder, [it.id for it in listed], store.selection(round, "expert"))
    out = []
    real = folder.resolve()
    for it in listed:
        try:
            image = (folder / it.image).resolve(strict=True)
            if not image.is_relative_to(real):
                raise damaged(folder, f"{it.image} is not inside the batch folder")
            width, height, _ = read_header(image)
        except (OSError, RuntimeError, AlsegError) as exc:
            why = exc.problem if isinstance(exc, AlsegError) else (exc.strerror or str(exc))
            raise damaged(folder, f"{it.image}: {why}") from None
        out.append(dataclasses.replace(it, width=width, height=height))  # the size is the image's, not the file's say
    return out


def _same_ids(folder: Path, listed: list[str], want: list[str]) -> None:
    extra, lacking = sorted(set(listed) - set(want)), sorted(set(want) - set(listed))
    if extra or lacking:
        parts = ([f"lists {', '.join(map(repr, extra[:3]))}, not of this batch"] if extra else []) + (
            [f"lacks {', '.join(map(repr, lacking[:3]))}"] if lacking else [])
        raise damaged(folder, "; ".join(parts))


def _usable(store, round: int, folder: Path) -> bool:
    try:
        return batch_items(store, round, folder) is not None
    except AlsegError:
        return False


def _clear_leftover(folder: Path, project: Path, reporter) -> None:
    """Move a batch folder without a usable manifest aside (it holds expert masks) or remove it."""
    why = "a damaged manifest.csv" if (folder / MANIFEST).exists() else "no manifest.csv"
    masks = [p for p in (folder / "masks").glob("*") if not p.name.startswith(".")] if (folder / "masks").is_dir() else []
    if not masks:
        shutil.rmtree(folder) if folder.is_dir() and not folder.is_symlink() else folder.unlink()
        reporter.note(f"{folder} had {why} and no masks: removed, the batch is exported again")
        return
    k = 1
    while (aside := folder.with_name(f"{folder.name}.aside-{k}")).exists():
        k += 1
    os.replace(folder, aside)
    reporter.note(f"{folder} had {why}: moved to {aside} with its {len(masks)} mask file(s), the batch is "
                  f"exported again; ingest them with `alseg ingest {project} {aside / 'masks'}`")


def export_batch(run, round: int) -> Path:
    """Write the queued batch of ``round`` of an :class:`~alseg.active.loop.ActiveRun`; return its folder."""
    from alseg.active.uncertainty import mc_dropout

    folder = run.dir.batch(round)
    store, data, a = run.store, run.data, run.config.active
    samples = {s.id: s for s in run.dataset.samples}
    if _usable(store, round, folder):
        if store.batch_record(round) is None:  # exported before the store kept it: record it now
            listed = {it.id: it for it in read_manifest(folder)}
            try:  # the sizes of the images it was exported from, as export measures them
                record = [_record(listed[id], *sample_header(samples[id])[:2])
                          for id in store.selection(round, "expert")]
            except (KeyError, AlsegError, OSError):  # a source gone: the image headers in the folder serve
                record = None
            if record is not None:
                store.record_batch(round, record)
        return folder
    if folder.exists() or folder.is_symlink():
        _clear_leftover(folder, run.dir.root, run.reporter)
    ids = store.selection(round, "expert")
    reasons = store.selection_reasons(round)
    scores = store.scores(round)
    mc = model = None
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
    stems = batch_stems(ids)
    rows = []
    try:
        for k, id in enumerate(ids):
            image = sample_image(samples[id])  # a 2D file, or a volume's slice
            height, width = image.shape[:2]
            stem = stems[id]
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
        if run.dataset.volumes:
            write_volumes(tmp / VOLUMES, run, round, ids, mc, model if head_start else None)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (tmp / MANIFEST).write_text(buf.getvalue(), encoding="utf-8")
        # recorded before the rename: a manifest in place always has its record (a kill between the two
        # leaves no manifest, so the batch is exported again and recorded again, identically)
        store.record_batch(round, [_record(_item({k: str(v) for k, v in row.items()}), row["width"], row["height"])
                                   for row in rows])
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _record(item: BatchItem, width: int, height: int) -> dict:
    return {**dataclasses.asdict(item), "width": int(width), "height": int(height)}


def batch_cases(samples: list) -> dict[str, str]:
    """``{case: file stem}`` of the volumes a batch's ``samples`` (in batch order) are slices of, in the
    order their first slice comes; each stem unique and safe as a file name (:func:`batch_stems`)."""
    cases = list(dict.fromkeys(s.group for s in samples if is_slice(s)))
    return batch_stems(cases)


def write_volumes(folder: Path, run, round: int, ids: list[str], mc, model) -> None:
    """A volume project's batch as NIfTI files in ``folder``, per case with slices in the batch.

    * ``CASE_predicted.nii.gz`` (only with ``model``, the model that chose the batch when it offers a
      head start, as for the PNGs): uint8 0/1 over EVERY slice of the case, on the source's own grid and
      header (:func:`alseg.data.volumes.volume_image`, as ``alseg predict`` writes). The batch's slices
      hold the thresholded MC mean, exactly the batch's ``predicted/`` PNGs; the other slices one
      deterministic pass (dropout off) on their working-size pixels from the cache, resized back to the
      slice's size (bilinear) and thresholded at 0.5.
    * ``CASE_uncertainty.nii.gz`` (with MC scores, from round 1): float32 per-voxel MC variance on the
      batch's slices, 0 on the others.
    * ``CASE_slices.txt``: which slices are asked for, as voxel axis and index (from 0) in those files'
      own voxel order, which for a NIfTI source is the source file's (:func:`written_slice`).
    """
    from alseg.train import predict_probs

    dataset, data, a = run.dataset, run.data, run.config.active
    samples = {s.id: s for s in dataset.samples}
    position = {id: k for k, id in enumerate(ids)}
    stems = batch_cases([samples[id] for id in ids])
    if not stems:
        return
    folder.mkdir()
    infos = {v.case: v for v in dataset.volumes}
    slices_of: dict[str, list] = {}
    for s in dataset.samples:
        if is_slice(s) and s.group in stems:
            slices_of.setdefault(s.group, []).append(s)
    for case, stem in stems.items():
        info, slices = infos[case], slices_of[case]
        asked = [s for s in slices if s.id in position]
        width, height = info.slice_size()
        if model is not None:
            probs = predict_probs(model, data.images[data.indices([s.id for s in slices])], run.normalizer,
                                  device=run.device, precision=a.mc_precision, batch_size=a.mc_batch_size)
            mask = np.zeros(info.shape, np.uint8)
            for s, prob in zip(slices, probs):
                if s.id in position:  # the batch's own slices: the MC mean, as in predicted/
                    prob = mc.mean[position[s.id]]
                np.moveaxis(mask, s.axis, 0)[s.slice] = map_to_size(prob, width, height) > 0.5
            (folder / f"{stem}_predicted.nii.gz").write_bytes(nifti_gz_bytes(volume_image(info, mask)))
        if mc is not None:
            variance = np.zeros(info.shape, np.float32)
            for s in asked:
                plane = map_to_size(mc.variance_map[position[s.id]], width, height)
                np.moveaxis(variance, s.axis, 0)[s.slice] = np.clip(plane, 0, None)
            (folder / f"{stem}_uncertainty.nii.gz").write_bytes(nifti_gz_bytes(volume_image(info, variance)))
        (folder / f"{stem}_slices.txt").write_text(_slices_text(run, round, info, stem, asked, mc, model),
                                                   encoding="utf-8")


def _slices_text(run, round: int, info, stem: str, asked: list, mc, model) -> str:
    source = info.image_files[0]
    order = ("the image file's own voxel order" if is_nifti(source)
             else "canonical RAS+ voxel order (a DICOM series has no file order to keep)")
    written = [f"{stem}_predicted.nii.gz"] if model is not None else []
    written += [f"{stem}_uncertainty.nii.gz"] if mc is not None else []
    lines = [f"# case {info.case} (image {source}): the {len(asked)} slice(s) round {round}'s batch asks you to label.",
             f"# axis and index: voxel axis (0 = i, 1 = j, 2 = k) and index along it, from 0, in {order}"
             + (f", as in {' and '.join(written)}" if written else "") + ".",
             "# Label them in your viewer on the image's grid and save the whole volume, 0/1 (or 0/255), as "
             f"../masks/{stem}.nii.gz (or {stem}_mask.nii.gz), then run `alseg ingest {run.dir.root}`;",
             "# only these slices are taken from it, the others are ignored.",
             "id\taxis\tindex"]
    for s in asked:
        file_axis, file_index = written_slice(info, s.axis, s.slice)
        lines.append(f"{s.id}\t{file_axis}\t{file_index}")
    return "\n".join(lines) + "\n"
