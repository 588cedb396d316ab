"""Ingest of the expert's masks: validation, then an atomic store, one mask at a time.

Every mask, from a folder (``alseg ingest``) or from the review page, passes the same checks:

* it names an id of an exported batch (by the manifest's mask or image file name, or the id itself,
  with an optional ``_mask`` / ``_segmentation`` suffix); ids are looked up, never joined into paths.
  The manifest's mask file name always means its image; any other name must mean one image only
  (a name that could be two images' is refused: "could be X or Y; name it as manifest.csv does");
* it is the only file for its image in the folder (``x.png`` and ``x_mask.png`` together: both refused,
  the image stays as it was);
* it is a regular file (a FIFO or a device would block the reader while it holds the writer lock);
* it decodes and is binary (:func:`alseg.data.imageio.read_mask`: 0/255 or 0/1; a 0/255 mask may
  carry up to 1 % grey edge pixels, binarised at 128);
* it has the image's original size or the working size;
* it is not empty, unless the expert says so (``allow_empty``: a slice without a lesion);
* a file in the folder that is a link leading out of it is refused.

A project over volumes also takes a mask volume (NIfTI, ``CASE.nii.gz``, ``CASE_mask.nii.gz`` or
``CASE_segmentation.nii.gz``, in the folder or given as the file itself): the case's slices in the
batch are taken from it (the open batch's, else the latest exported round asking about the case) and
each passes the checks above as that slice's mask (at the slice's own size); its other slices are
ignored, and the result's ``volumes`` says per file how many batch slices it gave (``slices``,
``taken``) and ignored. The volume is refused whole, in one line naming it, unless it lies on the
case's voxel grid (the image's shape and affine, after both are made RAS+) and is binary (0/1 or
0/255) (:func:`alseg.data.volumes.read_mask_volume`). A slice given both as a PNG and in a volume is
refused both ways, as two files for one image are.

Sizes and ids come from the store (:func:`alseg.annotate.export.batch_items`), never from the
``manifest.csv`` the user can edit; a damaged manifest is one line saying to run ``alseg query``,
which exports the batch again. A full disk stops the ingest in one line (:class:`~alseg.store.DiskFull`);
masks stored before it are kept, nothing half-written is.

Any image the expert labelled, in any exported round, can be corrected, not only the open batch's:
the open batch is searched first, then the batch of the round that selected the id
(:func:`find_item`). The lab's initial masks (no batch) are not corrected here: they train from the
dataset's files, so a correction is made there.

A valid mask is stored with its label move in one transaction (:meth:`RunStore.store_version`);
an invalid one is listed with its problem and its image stays queued. Every version is kept, so
:meth:`RunStore.undo_mask` can go back. The same mask twice changes nothing. The page asks first:
a different mask for an image whose current mask (of the same annotator's role) exists raises
:class:`NeedsConfirm` unless ``replace``; a file in the folder replaces without a question (the
expert put it there) and is reported as ``replaced``.

Several annotators (the store's rule): the first annotator whose mask is stored owns the image and
their versions train; another annotator's mask is stored beside as a second reading (outcome
``second``, no question asked), for :meth:`RunStore.agreement`. Files act for the owner unless an
annotator is named.

Effort: the page may send what it measured (``active_seconds``, ``strokes``, ``clicks``); the
store adds the pixels changed from the previous version and from the batch's predicted mask.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from alseg.annotate.export import BatchItem, batch_cases, batch_items
from alseg.data.imageio import read_mask
from alseg.data.sources import IMAGE_SUFFIXES, open_recorded_dataset
from alseg.data.volumes import is_nifti, nifti_stem, read_mask_volume, take_slice
from alseg.errors import AlsegError
from alseg.store import DEFAULT_ANNOTATOR, DiskFull, RunStore, mask_png

MASK_SUFFIXES = ("_mask", "_segmentation")
EFFORT_TYPES = {"active_seconds": float, "strokes": int, "clicks": int}
MAX_EFFORT_SECONDS = 86400.0


class NeedsConfirm(AlsegError):
    """A mask that would replace a different current mask, sent without ``replace``: the page asks first.

    ``current``: the version it would replace (``version``, ``annotator``, ``at``, ``sha256``, ``role``)."""

    def __init__(self, problem: str, id: str, current: dict):
        super().__init__(problem, id)
        self.current = current


@dataclass
class Batch:
    """An exported batch of a project: its round and items."""

    round: int
    folder: Path
    items: list[BatchItem]

    def item(self, id: str) -> BatchItem:
        for it in self.items:
            if it.id == id:
                return it
        raise AlsegError(f"not an image of round {self.round}'s batch", id)


def batch_of(store: RunStore, round: int) -> Batch | None:
    """The batch exported for ``round`` (``rounds/RRR/manifest.csv``), or None; AlsegError when its
    manifest is damaged (:func:`alseg.annotate.export.batch_items`: items as the store recorded them)."""
    folder = store.dir.batch(round)
    items = batch_items(store, round, folder)
    return None if items is None else Batch(round, folder, items)


def exported_rounds(store: RunStore) -> list[int]:
    """The rounds that queued images for the expert and whose batch is exported, oldest first."""
    return [r["round"] for r in store.rounds()
            if store.selection(r["round"], "expert") and (store.dir.batch(r["round"]) / "manifest.csv").is_file()]


def latest_batch(store: RunStore) -> Batch | None:
    """The batch of the latest round that queued images for the expert (open or labelled), if exported;
    AlsegError when its manifest is damaged (the server shows it; ``alseg query`` exports it again)."""
    rounds = [r["round"] for r in store.rounds() if store.selection(r["round"], "expert")]
    return batch_of(store, max(rounds)) if rounds else None


def find_item(store: RunStore, id: str) -> tuple[Batch, BatchItem]:
    """The batch item of ``id``: in the open (latest) batch, else in the batch of the round that selected it."""
    latest = latest_batch(store)
    if latest is not None and any(it.id == id for it in latest.items):
        return latest, latest.item(id)
    for round in sorted(store.selected_rounds(id), reverse=True):
        batch = batch_of(store, round)
        if batch is not None and any(it.id == id for it in batch.items):
            return batch, batch.item(id)
    raise AlsegError("not an image of any exported batch", id)


def validate_mask(path: Path, item: BatchItem, size: int, allow_empty: bool) -> np.ndarray:
    """The mask in ``path`` as a bool array, or AlsegError(problem, path)."""
    return check_mask(read_mask(path), item, size, allow_empty, path)


def check_mask(mask: np.ndarray, item: BatchItem, size: int, allow_empty: bool, path) -> np.ndarray:
    """``mask`` (bool) if it fits ``item``: its image's size or the working size, and not empty unless
    ``allow_empty``; else AlsegError(problem, path)."""
    h, w = mask.shape
    if (h, w) not in ((item.height, item.width), (size, size)):
        raise AlsegError(f"mask is {w}x{h} but its image is {item.width}x{item.height} "
                         f"(or give it at the working size {size}x{size})", path)
    if not mask.any() and not allow_empty:
        raise AlsegError("mask is empty; if the image holds no lesion, say so (--allow-empty, or the page's "
                         "'nothing here')", path)
    return mask


def predicted_mask(batch: Batch, item: BatchItem) -> np.ndarray | None:
    """The batch's predicted mask of ``item`` (the head start the expert corrected), or None.

    A missing or unreadable file, or one outside the batch folder, gives None: it only feeds the effort
    figures, never decides whether a mask is stored."""
    if not item.predicted:
        return None
    folder = batch.folder.resolve()
    try:
        path = (folder / item.predicted).resolve(strict=True)
        if not path.is_relative_to(folder):
            return None
        return read_mask(path)
    except (AlsegError, OSError, RuntimeError):
        return None


def check_effort(effort: dict | None, id: str) -> dict:
    """The page's effort figures, checked: ``active_seconds`` (0-86400), ``strokes``, ``clicks`` (counts)."""
    out = {}
    for key, value in (effort or {}).items():
        if key not in EFFORT_TYPES:
            raise AlsegError(f"unknown effort figure {key!r} (known: {', '.join(EFFORT_TYPES)})", id)
        if value is None:
            continue
        kind = EFFORT_TYPES[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        if ok and kind is int:
            ok = float(value).is_integer()
        if not ok or (key == "active_seconds" and value > MAX_EFFORT_SECONDS):
            limit = f"a number from 0 to {MAX_EFFORT_SECONDS:.0f}" if kind is float else "a whole number >= 0"
            raise AlsegError(f"effort {key} must be {limit}, not {value!r}", id)
        out[key] = kind(value)
    return out


def _tier(batch: Batch, only: set[str] | None = None) -> tuple[Batch, dict[str, BatchItem], dict[str, list[BatchItem]]]:
    """A batch's names: its manifest's mask file stems (each one image's), and every name an image
    answers to (mask and image file stems, the id), which may be several images'."""
    exact: dict[str, BatchItem] = {}
    names: dict[str, list[BatchItem]] = {}
    for it in batch.items:
        if only is not None and it.id not in only:
            continue
        exact.setdefault(Path(it.mask).stem, it)
        for name in {Path(it.mask).stem, Path(it.image).stem, it.id}:
            names.setdefault(name, []).append(it)
    return batch, exact, names


def _match(stem: str, tiers: list) -> tuple[Batch, BatchItem] | None:
    """The image ``stem`` names, in the first tier (the open batch, then older rounds) that knows it.

    The manifest's mask file name wins; else the stem, or the stem less a mask suffix, must name one
    image: AlsegError when it could be two."""
    for batch, exact, names in tiers:
        if stem in exact:
            return batch, exact[stem]
        for key in [stem] + [stem[: -len(s)] for s in MASK_SUFFIXES if stem.endswith(s) and len(stem) > len(s)]:
            found = {it.id: it for it in names.get(key, [])}
            if len(found) == 1:
                return batch, next(iter(found.values()))
            if len(found) > 1:
                a, b = sorted(found.values(), key=lambda it: it.id)[:2]
                raise AlsegError(f"could be {a.id!r} or {b.id!r}; name it as manifest.csv does "
                                 f"({Path(a.mask).name} or {Path(b.mask).name})")
    return None


def ingest_folder(store: RunStore, size: int, folder: str | Path | None = None, *, allow_empty: bool = False,
                  round: int | None = None, annotator: str | None = None) -> dict:
    """Validate and store every mask file in ``folder`` (default: the batch's ``masks/``).

    ``round``: names are matched against that round's batch only (default folder: its ``masks/``).
    Without it, against the open (latest) batch, then against the images the expert labelled in every
    other exported round (a correction; the open batch's names win a clash). ``annotator`` None: each
    file stands for the image's owner. A file that differs from the current mask replaces it (the
    earlier version is kept). The result's progress (``round``, ``queued``, ...) is the open batch's;
    ``rounds`` says which round each stored id belongs to.

    ``folder`` may also be one NIfTI mask volume, and the folder may hold some (a volume project): each
    gives its case's batch slices; ``volumes`` lists ``{file, case, round, slices, taken, ignored}`` per
    volume read (``slices``: the batch's slices of the case, ``taken``: those stored or unchanged,
    ``ignored``: the volume's other slices).
    """
    latest = latest_batch(store)
    if round is not None:
        batch = batch_of(store, round)
        if batch is None:
            raise AlsegError(f"round {round} has no exported batch", store.dir.batch(round))
    else:
        batch = latest
    if batch is None:
        raise AlsegError("no batch to ingest: run `alseg query` first", store.run_dir)
    folder = Path(folder) if folder is not None else batch.folder / "masks"
    one_volume = folder.is_file() and is_nifti(folder)
    if not folder.is_dir() and not one_volume:
        raise AlsegError("no such folder", folder)
    tiers = [_tier(batch)]
    if round is None:
        expert = set(store.expert_ids())
        for r in sorted(exported_rounds(store), reverse=True):
            if r != batch.round:
                try:
                    other = batch_of(store, r)
                except AlsegError:  # a past round's damaged manifest: its images cannot be named now
                    continue
                if other is not None:
                    tiers.append(_tier(other, only=expert))
    result: dict = {"stored": [], "replaced": [], "unchanged": [], "second": [], "invalid": [], "rounds": {},
                    "volumes": []}
    real_folder = folder.resolve() if not one_volume else folder.parent.resolve()
    matched: list[_Entry] = []
    volumes: list[Path] = [folder] if one_volume else []
    for path in [] if one_volume else sorted(folder.iterdir()):
        volume = is_nifti(path)
        if path.name.startswith(".") or (path.suffix.lower() not in IMAGE_SUFFIXES and not volume):
            continue
        try:
            if path.is_symlink() and not path.resolve().is_relative_to(real_folder):
                raise AlsegError("is a link that leads out of the folder; copy the file instead", path)
            try:
                mode = path.stat().st_mode
            except OSError as exc:
                raise AlsegError(f"cannot be read ({exc.strerror})", path) from None
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):  # a FIFO would block the reader forever, holding the writer lock
                raise AlsegError("not a regular file", path)
            if volume:
                volumes.append(path)
                continue
            try:
                found = _match(path.stem, tiers)
            except AlsegError as exc:
                raise AlsegError(exc.problem, path) from None
            if found is None:
                raise AlsegError("names no image of the batch (see manifest.csv)", path)
            found_batch, item = found
            matched.append(_Entry(path, str(path), path.name, found_batch, item,
                                  lambda path=path, item=item: validate_mask(path, item, size, allow_empty)))
        except AlsegError as exc:
            result["invalid"].append({"file": str(path), "problem": exc.problem})
    if volumes:
        matched += _volume_entries(store, volumes, tiers, size, allow_empty, result)
    files_of: dict[str, list[_Entry]] = {}
    for entry in matched:
        files_of.setdefault(entry.item.id, []).append(entry)
    for entry in matched:
        item = entry.item
        try:
            if len(files_of[item.id]) > 1:  # which one the expert meant is not ours to guess
                others = ", ".join(e.name for e in files_of[item.id] if e is not entry)
                raise AlsegError(f"{item.id!r} has another file here too ({others}); keep one (nothing of "
                                 "either was stored)", entry.path)
            mask = entry.load()
            stored = store.store_version(item.id, mask, source="files", annotator=annotator,
                                         predicted=predicted_mask(entry.batch, item))
            result[stored["outcome"]].append(item.id)
            result["rounds"][item.id] = entry.batch.round
        except DiskFull as exc:
            done = sum(len(result[k]) for k in ("stored", "replaced", "second"))
            raise DiskFull(f"disk full while storing {entry.name}; nothing half-written was kept ({done} mask(s) "
                           "stored before it are kept); free space and run `alseg ingest` again",
                           exc.path) from None
        except AlsegError as exc:
            result["invalid"].append({"file": entry.label, "problem": exc.problem})
    taken = set(result["stored"] + result["replaced"] + result["unchanged"] + result["second"])
    for vol in result["volumes"]:
        vol["taken"] = sum(id in taken for id in vol.pop("ids"))
    result["invalid"].sort(key=lambda bad: bad["file"])
    return _with_progress(store, latest if latest is not None else batch, result)


@dataclass
class _Entry:
    """One mask to store: a file's, or one batch slice of a mask volume (``label``: ``FILE [id]``)."""

    path: Path
    label: str  # the result's name for it
    name: str  # the short name other entries of the same image cite
    batch: Batch
    item: BatchItem
    load: Callable[[], np.ndarray]  # the checked mask, or AlsegError


def _volume_entries(store: RunStore, files: list[Path], tiers: list, size: int, allow_empty: bool,
                    result: dict) -> list[_Entry]:
    """The batch slices each mask volume in ``files`` gives, one entry per slice; refusals (a name that
    is no case of a batch, another grid, values not binary) go to ``result["invalid"]`` in one line naming
    the file, and each volume's case, round and slice counts to ``result["volumes"]``.

    A file names its case as export's ``volumes/`` does (``CASE``, ``CASE_mask`` or ``CASE_segmentation``,
    ``.nii.gz`` or ``.nii``); its slices are those of the first batch (the open one, then older rounds)
    that asks about that case. Only those slices are read from it; its other slices are ignored."""
    dataset = open_recorded_dataset(store.data_info())
    if not dataset.volumes:
        for path in files:
            result["invalid"].append({"file": str(path), "problem": "a NIfTI mask volume, but this project's "
                                      "images are not volumes: give a mask file per image (see manifest.csv)"})
        return []
    samples = {s.id: s for s in dataset.samples}
    infos = {v.case: v for v in dataset.volumes}
    entries: list[_Entry] = []
    for path in files:
        try:
            found = _match_volume(nifti_stem(path), tiers, samples)
            if found is None:
                raise AlsegError("names no case with slices in a batch (see the batch's volumes/*_slices.txt)", path)
            batch, case, items = found
            info = infos[case]
            volume = read_mask_volume(info, path)
        except AlsegError as exc:
            result["invalid"].append({"file": str(path), "problem": exc.problem})
            continue
        result["volumes"].append({"file": str(path), "case": case, "round": batch.round, "slices": len(items),
                                  "ignored": info.slices - len(items), "ids": [it.id for it in items]})
        for item in items:
            sample = samples[item.id]
            plane = take_slice(volume, sample.axis, sample.slice)
            entries.append(_Entry(path, f"{path} [{item.id}]", f"{path.name} [{item.id}]", batch, item,
                                  lambda plane=plane, item=item: check_mask(plane, item, size, allow_empty, path)))
    return entries


def _match_volume(stem: str, tiers: list, samples: dict) -> tuple[Batch, str, list[BatchItem]] | None:
    """``(batch, case, its items)`` of the case ``stem`` names in the first tier asking about it."""
    keys = [stem] + [stem[: -len(s)] for s in MASK_SUFFIXES if stem.endswith(s) and len(stem) > len(s)]
    for batch, _, names in tiers:
        allowed = {it.id for its in names.values() for it in its}
        by_case: dict[str, list[BatchItem]] = {}
        for it in batch.items:
            sample = samples.get(it.id)
            if sample is not None and sample.slice is not None and it.id in allowed:
                by_case.setdefault(sample.group, []).append(it)
        stems = batch_cases([samples[it.id] for it in batch.items if it.id in samples])
        case_of = {**{stem_: case for case, stem_ in stems.items()}, **{case: case for case in stems}}
        for key in keys:
            case = case_of.get(key)
            if case is not None and case in by_case:
                return batch, case, by_case[case]
    return None


def submit_mask(store: RunStore, size: int, id: str, data: bytes, *, seconds: float | None = None,
                allow_empty: bool = False, source: str = "page", round: int | None = None,
                annotator: str = DEFAULT_ANNOTATOR, effort: dict | None = None, replace: bool = False) -> dict:
    """Validate one uploaded mask (PNG bytes) for image ``id`` and store it as ``annotator``'s.

    ``round``: the batch to look ``id`` up in (default: the open batch, then the round that selected it).
    Raises :class:`NeedsConfirm` when it would replace a different current mask and ``replace`` is false.
    Returns ``{id, outcome: stored|replaced|unchanged|second, version, changed_previous, changed_prediction,
    accepted, item_round}`` with the open batch's progress (``round``, ``labelled``, ``total``, ``queued``,
    ``complete``).
    """
    if round is not None:
        batch = batch_of(store, round)
        if batch is None:
            raise AlsegError(f"round {round} has no exported batch", id)
        item = batch.item(id)
    elif latest_batch(store) is None:
        raise AlsegError("no batch is open", store.run_dir)
    else:
        batch, item = find_item(store, id)
    effort = check_effort(effort, id)
    store.dir.incoming.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".png", dir=store.dir.incoming)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            mask = validate_mask(Path(tmp), item, size, allow_empty)
        except AlsegError as exc:
            raise AlsegError(exc.problem, id) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    if not replace:
        current = store.current_version(item.id, annotator)
        if current is not None and current["sha256"] != sha256_of(mask):
            raise NeedsConfirm(f"already labelled ({describe_version(current)}); replace it?", item.id, current)
    stored = store.store_version(item.id, mask, source=source, seconds=seconds, annotator=annotator, effort=effort,
                                 predicted=predicted_mask(batch, item))
    result = {"id": item.id, "outcome": stored["outcome"], "version": stored["version"],
              "changed_previous": stored["changed_previous"], "changed_prediction": stored["changed_prediction"],
              "accepted": stored["accepted"], "item_round": batch.round}
    return _with_progress(store, latest_batch(store), result)


def sha256_of(mask: np.ndarray) -> str:
    """The sha256 the store gives ``mask`` (of its 0/255 PNG)."""
    return hashlib.sha256(mask_png(mask)).hexdigest()


def describe_version(current: dict, now: float | None = None) -> str:
    """``version 2, by alice, 3 min ago`` (what the question shows)."""
    ago = max(0.0, (time.time() if now is None else now) - current["at"])
    if ago < 60:
        when = "just now" if ago < 5 else f"{ago:.0f} s ago"
    elif ago < 3600:
        when = f"{ago / 60:.0f} min ago"
    elif ago < 2 * 86400:
        when = f"{ago / 3600:.0f} h ago"
    else:
        when = f"{ago / 86400:.0f} days ago"
    version = f"version {current['version']}, " if current.get("version") else ""
    return f"{version}by {current['annotator']}, {when}"


def _with_progress(store: RunStore, batch: Batch, result: dict) -> dict:
    queued = store.queued(batch.round)
    labelled = len(batch.items) - len(queued)
    return {**result, "round": batch.round, "labelled": labelled, "total": len(batch.items), "queued": queued,
            "complete": not queued}
