"""A project's masks out to the tools labs use (PNG, COCO, CVAT, Label Studio), and back in.

Owns the two entry points and what every format shares: which masks and images go out, their
file names, the export folder and its atomic write, and telling formats apart on the way in.
Each format's own encoding is in its module: :mod:`~alseg.annotate.coco`,
:mod:`~alseg.annotate.cvat`, :mod:`~alseg.annotate.labelstudio`.

:func:`export_project` opens the project read-only and writes every expert mask: the current
mask of each labelled id, from every round, and the lab's initial masks (read from the
project's data), in every split; pseudo-labels are not masks anyone drew and stay out. Each
image goes with its mask at its original size: a PNG or JPEG is copied as it is when a viewer
shows it as alseg decodes it (no EXIF rotation), anything else (TIFF, rotated JPEG) is written
as PNG. A mask stored at the working size is scaled to its image (nearest neighbour). Each id
has one name and no two ids share one, even ignoring case: an id exported in a batch keeps the
name its batch folder gave it (the latest batch's first), so masks that come back match the
batch as ``alseg ingest`` matches files; any other id gets
:func:`alseg.annotate.export.file_stem`'s name.

The open batch's images still to label go where a person labels: into the CVAT and Label Studio
exports (the task is made from ``images/``). Their predicted masks (the batch's ``predicted/``
files) go in as pre-annotations where the format has them: Label Studio ``predictions``, COCO a
separate ``predictions.json``; CVAT's mask import has no predictions and PNG is a dataset, so
those leave them out and say so in ``notes``.

An export is a folder:

* ``png``: ``images/NAME.ext``, ``masks/NAME.png`` (0/255), ``manifest.csv`` (id, image, mask,
  round, origin, annotator: who made the current mask, by name where the store knows it, else
  how it came, ``page`` or ``files``; empty for the lab's initial masks);
* ``coco``: ``annotations.json`` (file names relative to ``images/``), ``predictions.json``;
* ``cvat``: ``annotations.zip`` (Segmentation mask 1.1) and ``images/``;
* ``labelstudio``: ``tasks.json``, ``labeling_config.xml`` and ``images/``. Label Studio cannot
  read images by a path relative to the JSON, so tasks name them as its local-files server
  does: ``/data/local-files/?d=OUT_NAME/images/NAME.ext``. Serve them by starting Label Studio
  with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set to the export's parent folder, add a "Local
  files" source storage whose path is the export's ``images/`` (no need to sync it), then
  import ``tasks.json``.

Each also holds ``README.txt`` (how to load it) and ``alseg-export.json`` (format and counts).
The folder is written under a temporary name beside ``out`` and renamed into place, so a crash
never leaves half an export. A non-empty ``out`` is refused unless it is an earlier export of the
same format, which is then replaced.

:func:`masks_from_exchange` reads what the tools give back: a CVAT Segmentation mask 1.1 zip,
a Label Studio JSON export, a COCO annotations JSON (or an export folder of alseg's own), and
returns ``{image file stem: bool mask at the image's size}``, the stems being the names the
export wrote. Bad input is one :class:`~alseg.errors.AlsegError` naming the file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alseg.annotate import coco, cvat, labelstudio
from alseg.annotate.export import MANIFEST, file_stem, read_manifest
from alseg.annotate.ingest import latest_batch
from alseg.data.imageio import png_bytes, read_mask
from alseg.data.samples import sample_header, sample_image, sample_mask
from alseg.data.sources import Sample, open_recorded_dataset
from alseg.errors import AlsegError
from alseg.progress import SILENT, Reporter, staged
from alseg.store import RunStore, disk_full_error, resize_nearest

FORMATS = ("png", "coco", "cvat", "labelstudio")
MAX_ENTRIES = 10_000  # images (tasks, masks) one file may bring back
MAX_JSON_BYTES = 1 << 30
MARKER = "alseg-export.json"
MANIFEST_COLUMNS = ("id", "image", "mask", "round", "origin", "annotator")
_COPIED = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
# the file each format's export reads back from
_EXCHANGE_FILE = {"coco": "annotations.json", "cvat": "annotations.zip", "labelstudio": "tasks.json"}


@dataclass
class _Item:
    """One image of an export: a labelled id (origin initial or expert) or one of the open batch to label."""

    id: str
    name: str
    sample: Sample
    origin: str  # initial / expert / to label
    round: int | None = None
    annotator: str = ""
    predicted: Path | None = None
    variance: float | None = None


# --- export -------------------------------------------------------------------------------------
def export_project(project: str | Path, fmt: str, out: str | Path, *, predictions: bool = True,
                   reporter: Reporter | None = None) -> dict:
    """Write every expert mask of ``project`` with its image in format ``fmt`` to the folder ``out``.

    Returns ``{"format", "out", "masks", "images", "predictions", "to_label", "files", "notes"}``:
    counts, the paths of the files a tool reads, and what was left out and why.
    """
    if fmt not in FORMATS:
        raise AlsegError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    reporter = reporter or SILENT
    out = Path(out).absolute()
    _check_out(out, fmt)
    with RunStore.open_readonly(project) as store:
        labelled, to_label, batch_round = _items(store, predictions)
        tmp = out.parent / f".{out.name}.exporting-{os.getpid()}"
        _remove_stale(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            writer = {"png": _write_png, "coco": _write_coco, "cvat": _write_cvat,
                      "labelstudio": _write_labelstudio}[fmt]
            with staged(reporter, f"export {fmt}", len(labelled) + len(to_label)) as advance:
                result = writer(store, tmp, out, labelled, to_label, predictions, batch_round, advance)
            result = {"format": fmt, "masks": len(labelled), **result}
            (tmp / "README.txt").write_text(_readme(fmt, out), encoding="utf-8")
            (tmp / MARKER).write_text(json.dumps({**result, "project": str(Path(project).absolute())}, indent=1)
                                      + "\n", encoding="utf-8")
            _swap(tmp, out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full_error(exc, out.parent, "nothing was exported") or exc from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    result["out"] = str(out)
    result["files"] = {k: str(out / v) for k, v in result["files"].items()}
    return result


def _check_out(out: Path, fmt: str) -> None:
    if out.is_symlink():
        raise AlsegError("is a link; give a folder", out)
    if not out.exists():
        return
    if not out.is_dir():
        raise AlsegError("exists and is not a folder", out)
    if not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / MARKER).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous != fmt:
        what = f"a {previous} export" if previous in FORMATS else "not an alseg export"
        raise AlsegError(f"folder is not empty and is {what}; give an empty folder or an earlier {fmt} export "
                         "(which is replaced)", out)


def _remove_stale(out: Path) -> None:
    """Temporaries of exports to ``out`` whose process died (a crash leaves them; nobody else will).

    A ``.replaced-`` copy is the earlier export a crash in :func:`_swap` may leave; it goes only
    once ``out`` is there again, so a crash between the two renames loses nothing."""
    if not out.parent.is_dir():
        return
    prefix, replaced = f".{out.name}.exporting-", f".{out.name}.replaced-"
    for child in out.parent.iterdir():
        if child.name.startswith(replaced) and out.is_dir():  # the swap finished; only the old copy was left
            shutil.rmtree(child, ignore_errors=True)
        if not child.name.startswith(prefix) or not child.name[len(prefix):].isdigit():
            continue
        pid = int(child.name[len(prefix):])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(child, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``; an earlier export there is replaced, never mixed in."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _items(store: RunStore, predictions: bool) -> tuple[list[_Item], list[_Item], int | None]:
    """The labelled ids to export and the open batch's ids still to label, named."""
    info = store.data_info()
    samples = {s.id: s for s in open_recorded_dataset(info).samples}
    labelled_ids = store.sample_ids(state="labelled")
    origins: dict[str, str] = {}
    for k in range(0, len(labelled_ids), 500):  # SQLite caps the variables of one query
        origins.update(store.origins(labelled_ids[k:k + 500]))
    stored = set(store.mask_ids())
    rounds_of = {i: r["round"] for r in store.rounds() for i in store.selection(r["round"], "expert")}
    annotator: dict[str, str] = {}
    for a in store.annotations():  # who made the current mask: the latest version that trains
        if a["action"] in ("stored", "replaced", "undo") and a.get("sha256") and a.get("role") != "second":
            annotator[a["id"]] = a.get("annotator") or a["source"] or ""
    batch = latest_batch(store)
    names: dict[str, str] = {}
    taken: set[str] = set()
    for r in sorted((r["round"] for r in store.rounds()), reverse=True):  # an id keeps its batch's name
        folder = store.dir.batch(r)
        if (folder / MANIFEST).is_file():
            for it in read_manifest(folder):
                stem = Path(it.image).stem
                if it.id not in names and stem.lower() not in taken:
                    names[it.id] = stem
                    taken.add(stem.lower())

    def named(id: str) -> str:
        if id not in names:
            names[id] = file_stem(id, taken)
        return names[id]

    def sample(id: str) -> Sample:
        if id not in samples:
            raise AlsegError(f"the project's data no longer holds {id!r}; restore it to export", info["path"])
        return samples[id]

    labelled = []
    for id in labelled_ids:
        if id in stored:
            labelled.append(_Item(id, named(id), sample(id), "expert", rounds_of.get(id), annotator.get(id, "")))
        elif origins.get(id) == "initial" and sample(id).mask is not None:
            labelled.append(_Item(id, named(id), sample(id), "initial"))
    to_label = []
    if batch is not None:
        queued = set(store.queued(batch.round))
        scores = store.scores(batch.round)
        folder = batch.folder.resolve()
        for it in batch.items:
            if it.id not in queued:
                continue
            item = _Item(it.id, named(it.id), sample(it.id), "to label", batch.round,
                         variance=scores.get(it.id, {}).get("variance"))
            if predictions and it.predicted:
                path = (batch.folder / it.predicted).resolve()
                if path.is_relative_to(folder) and path.is_file():
                    item.predicted = path
            to_label.append(item)
    return labelled, to_label, batch.round if batch is not None else None


def initial_masks(store: RunStore) -> dict[str, Sample]:
    """``{exported name: sample}`` of the lab's initial masks, which train from their own files."""
    labelled, _, _ = _items(store, predictions=False)
    return {it.name: it.sample for it in labelled if it.origin == "initial"}


def _at_size(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    return resize_nearest(mask, (height, width))


def _mask(store: RunStore, item: _Item, width: int, height: int) -> np.ndarray:
    if item.origin == "expert":
        mask = store.mask(item.id)
        if mask is None:
            raise AlsegError("labelled, but its mask is missing from run.db", item.id)
    else:
        mask = sample_mask(item.sample)
    return _at_size(mask, width, height)


def _prediction(item: _Item, width: int, height: int) -> np.ndarray | None:
    return None if item.predicted is None else _at_size(read_mask(item.predicted), width, height)


def _copy_image(item: _Item, folder: Path) -> tuple[str, int, int]:
    """Put ``item``'s image in ``folder`` as ``NAME.ext``; return (file name, width, height)."""
    from PIL import Image

    source = Path(item.sample.image)
    width, height, _ = sample_header(item.sample)
    suffix = source.suffix.lower()
    as_shown = False
    if suffix in _COPIED and item.sample.slice is None:
        try:
            with Image.open(source) as im:
                as_shown = im.format == _COPIED[suffix] and im.getexif().get(0x0112, 1) == 1
        except OSError:
            as_shown = False
    folder.mkdir(exist_ok=True)
    if as_shown:
        file = f"{item.name}{suffix}"
        shutil.copyfile(source, folder / file)
    else:  # a TIFF, a volume's slice, or a photo a viewer would turn: the pixels as alseg reads them
        image = sample_image(item.sample)
        file = f"{item.name}.png"
        (folder / file).write_bytes(png_bytes(image if image.shape[2] == 3 else image[:, :, 0]))
    return file, width, height


def _write_png(store, tmp, out, labelled, to_label, predictions, batch_round, advance) -> dict:
    (tmp / "masks").mkdir()
    rows = []
    for k, item in enumerate(labelled, 1):
        file, w, h = _copy_image(item, tmp / "images")
        (tmp / "masks" / f"{item.name}.png").write_bytes(png_bytes(_mask(store, item, w, h).astype(np.uint8) * 255))
        rows.append({"id": item.id, "image": f"images/{file}", "mask": f"masks/{item.name}.png",
                     "round": "" if item.round is None else item.round, "origin": item.origin,
                     "annotator": item.annotator})
        advance(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (tmp / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
    notes = [f"png has no pre-annotations: the open batch's {len(to_label)} images to label and their "
             "predictions are left out"] if to_label else []
    return {"images": len(labelled), "predictions": 0, "to_label": 0, "notes": notes,
            "files": {"manifest": "manifest.csv", "masks": "masks", "images": "images"}}


def _write_coco(store, tmp, out, labelled, to_label, predictions, batch_round, advance) -> dict:
    images, masks = [], []
    done = 0
    for item in labelled:
        file, w, h = _copy_image(item, tmp / "images")
        images.append({"file_name": file, "width": w, "height": h, "alseg_id": item.id})
        masks.append(_mask(store, item, w, h))
        done += 1
        advance(done)
    _dump_json(tmp / "annotations.json", coco.dataset(images, masks))
    files = {"annotations": "annotations.json", "images": "images"}
    images, masks, extras = [], [], []
    for item in to_label:
        if item.predicted is not None:
            file, w, h = _copy_image(item, tmp / "images")
            images.append({"file_name": file, "width": w, "height": h, "alseg_id": item.id})
            masks.append(_prediction(item, w, h))
            extras.append({"alseg_variance": item.variance})
        done += 1
        advance(done)
    notes = []
    if images:
        _dump_json(tmp / "predictions.json", coco.dataset(
            images, masks, predictions=True, extras=extras,
            description=f"alseg predictions of round {batch_round}'s batch (the model of round {batch_round - 1})"))
        files["predictions"] = "predictions.json"
    elif predictions and to_label:
        notes.append("the open batch has no predicted masks (the model offered no head start): no predictions.json")
    (tmp / "images").mkdir(exist_ok=True)
    return {"images": len(labelled) + len(images), "predictions": len(images), "to_label": 0, "notes": notes,
            "files": files}


def _write_cvat(store, tmp, out, labelled, to_label, predictions, batch_round, advance) -> dict:
    entries = []
    done = 0
    for item in labelled:
        _, w, h = _copy_image(item, tmp / "images")
        entries.append((item.name, _mask(store, item, w, h)))
        done += 1
        advance(done)
    for item in to_label:
        _copy_image(item, tmp / "images")
        done += 1
        advance(done)
    cvat.write_zip(tmp / "annotations.zip", entries)
    notes = ["CVAT's Segmentation mask import has no predictions: the open batch's predicted masks are left out"] \
        if predictions and any(i.predicted for i in to_label) else []
    (tmp / "images").mkdir(exist_ok=True)
    return {"images": len(labelled) + len(to_label), "predictions": 0, "to_label": len(to_label), "notes": notes,
            "files": {"annotations": "annotations.zip", "images": "images"}}


def _write_labelstudio(store, tmp, out, labelled, to_label, predictions, batch_round, advance) -> dict:
    done = n_predictions = 0
    with (tmp / "tasks.json").open("w", encoding="utf-8") as fh:
        fh.write("[")
        for k, item in enumerate(labelled + to_label):
            file, w, h = _copy_image(item, tmp / "images")
            url = labelstudio.local_files_url(f"{out.name}/images/{file}")
            if k < len(labelled):
                task = labelstudio.task(item.id, url, mask=_mask(store, item, w, h), name=item.name)
            else:
                prediction = _prediction(item, w, h)
                n_predictions += prediction is not None
                task = labelstudio.task(item.id, url, prediction=prediction, name=item.name,
                                        model_version=f"alseg round {(batch_round or 1) - 1}",
                                        score=coco.PREDICTION_SCORE)
                task["data"]["alseg_variance"] = item.variance
            fh.write(("\n" if done == 0 else ",\n") + json.dumps(task, separators=(",", ":")))
            done += 1
            advance(done)
        fh.write("\n]\n")
    (tmp / "labeling_config.xml").write_text(labelstudio.LABEL_CONFIG, encoding="utf-8")
    (tmp / "images").mkdir(exist_ok=True)
    return {"images": len(labelled) + len(to_label), "predictions": n_predictions, "to_label": len(to_label),
            "notes": [], "files": {"tasks": "tasks.json", "labeling_config": "labeling_config.xml",
                                   "images": "images"}}


def _dump_json(path: Path, doc) -> None:
    with path.open("w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))
        fh.write("\n")


def _readme(fmt: str, out: Path) -> str:
    head = (f"alseg export ({fmt}). Masks come back into the project with\n"
            f"  alseg ingest PROJECT {out / _EXCHANGE_FILE[fmt] if fmt in _EXCHANGE_FILE else out / 'masks'}\n"
            "(file names are matched to the open batch's images).\n\n")
    body = {
        "png": "images/NAME.ext and masks/NAME.png (0 background, 255 lesion); manifest.csv maps names to ids.\n",
        "coco": ("annotations.json: COCO instances, one category 'lesion', one annotation per connected component,\n"
                 "segmentation as compressed RLE (iscrowd 0); file_name is relative to images/.\n"
                 "predictions.json: the model's masks of the open batch, same structure, with a score.\n"),
        "cvat": ("Create a CVAT task with one label named 'lesion' from the files in images/, then\n"
                 "Actions > Upload annotations > 'Segmentation mask 1.1' > annotations.zip.\n"
                 "To bring masks back: Export task dataset > 'Segmentation mask 1.1'.\n"),
        "labelstudio": (
            f"Start Label Studio with\n"
            f"  LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true\n"
            f"  LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={out.parent}\n"
            f"create a project with labeling_config.xml, add a 'Local files' source storage with the\n"
            f"absolute path {out / 'images'} (no need to sync), then import tasks.json.\n"
            f"To bring masks back: Export > 'JSON' (not JSON-MIN).\n"),
    }[fmt]
    return head + body


# --- import -------------------------------------------------------------------------------------
def masks_from_exchange(path: str | Path) -> dict[str, np.ndarray]:
    """``{image file stem: bool mask}`` from a CVAT Segmentation mask 1.1 zip, a Label Studio JSON
    export, a COCO annotations JSON, or an alseg export folder."""
    path = Path(path)
    if not path.exists():
        raise AlsegError("no such file", path)
    if path.is_dir():
        return _from_folder(path)
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK":
        return cvat.masks_from_zip(path, max_entries=MAX_ENTRIES)
    if path.suffix.lower() == ".zip":
        raise AlsegError("not a zip file", path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise AlsegError(f"is {size} bytes, more than the {MAX_JSON_BYTES} a JSON export may have", path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AlsegError("not JSON (nor a zip): expected a CVAT zip, a Label Studio or a COCO JSON file",
                         path) from None
    where = str(path)
    if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
        return coco.masks_from_coco(doc, where, max_entries=MAX_ENTRIES)
    if isinstance(doc, list):
        return labelstudio.masks_from_tasks(doc, where, max_entries=MAX_ENTRIES)
    raise AlsegError("unknown format: neither COCO (images, annotations) nor Label Studio (a list of tasks)", path)


def _from_folder(folder: Path) -> dict[str, np.ndarray]:
    try:
        fmt = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt in _EXCHANGE_FILE:
        return masks_from_exchange(folder / _EXCHANGE_FILE[fmt])
    if fmt != "png":
        raise AlsegError("a folder, not an alseg export: give the CVAT zip or the JSON file", folder)
    files = sorted(p for p in (folder / "masks").iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
    if len(files) > MAX_ENTRIES:
        raise AlsegError(f"holds {len(files)} masks, more than the {MAX_ENTRIES} one export may bring", folder)
    real = (folder / "masks").resolve()
    out = {}
    for p in files:
        if not p.resolve().is_relative_to(real):
            raise AlsegError("is a link that leads out of the folder", p)
        out[p.stem] = read_mask(p)
    return out
