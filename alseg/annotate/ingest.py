"""Ingest of the expert's masks: validation, then an atomic store, one mask at a time.

Every mask, from a folder (``alseg ingest``) or from the review page, passes the same checks:

* it names an id of the batch (by the manifest's mask or image file name, or the id itself, with
  an optional ``_mask`` / ``_segmentation`` suffix); ids are looked up, never joined into paths;
* it decodes and is binary (:func:`alseg.data.imageio.read_mask`: 0/255 or 0/1; a 0/255 mask may
  carry up to 1 % grey edge pixels, binarised at 128);
* it has the image's original size or the working size;
* it is not empty, unless the expert says so (``allow_empty``: a slice without a lesion);
* a file in the folder that is a link leading out of it is refused.

A valid mask is stored with its label move in one transaction (:meth:`RunStore.store_mask`); an
invalid one is listed with its problem and its image stays queued. The same mask twice changes
nothing; a different mask for an expert-labelled id replaces it and the change is recorded.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alseg.annotate.export import BatchItem, read_manifest
from alseg.data.imageio import read_mask
from alseg.data.sources import IMAGE_SUFFIXES
from alseg.errors import AlsegError
from alseg.store import RunStore

MASK_SUFFIXES = ("_mask", "_segmentation")


@dataclass
class Batch:
    """The latest exported batch of a project: its round and items."""

    round: int
    folder: Path
    items: list[BatchItem]

    def item(self, id: str) -> BatchItem:
        for it in self.items:
            if it.id == id:
                return it
        raise AlsegError("not an image of the open batch", id)


def latest_batch(store: RunStore) -> Batch | None:
    """The batch of the latest round that queued images for the expert (open or labelled), if exported."""
    rounds = [r["round"] for r in store.rounds() if store.selection(r["round"], "expert")]
    for round in sorted(rounds, reverse=True):
        folder = store.dir.batch(round)
        if (folder / "manifest.csv").is_file():
            return Batch(round, folder, read_manifest(folder))
        return None
    return None


def validate_mask(path: Path, item: BatchItem, size: int, allow_empty: bool) -> np.ndarray:
    """The mask in ``path`` as a bool array, or AlsegError(problem, path)."""
    mask = read_mask(path)
    h, w = mask.shape
    if (h, w) not in ((item.height, item.width), (size, size)):
        raise AlsegError(f"mask is {w}x{h} but its image is {item.width}x{item.height} "
                         f"(or give it at the working size {size}x{size})", path)
    if not mask.any() and not allow_empty:
        raise AlsegError("mask is empty; if the image holds no lesion, say so (--allow-empty, or the page's "
                         "'nothing here')", path)
    return mask


def _match(stem: str, batch: Batch) -> BatchItem | None:
    names: dict[str, BatchItem] = {}
    for it in batch.items:
        for name in (Path(it.mask).stem, Path(it.image).stem, it.id):
            names.setdefault(name, it)
    if stem in names:
        return names[stem]
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix) and stem[: -len(suffix)] in names:
            return names[stem[: -len(suffix)]]
    return None


def ingest_folder(store: RunStore, size: int, folder: str | Path | None = None, *, allow_empty: bool = False) -> dict:
    """Validate and store every mask file in ``folder`` (default: the batch's ``masks/``)."""
    batch = latest_batch(store)
    if batch is None:
        raise AlsegError("no batch to ingest: run `alseg query` first", store.run_dir)
    folder = Path(folder) if folder is not None else batch.folder / "masks"
    if not folder.is_dir():
        raise AlsegError("no such folder", folder)
    result: dict = {"round": batch.round, "stored": [], "replaced": [], "unchanged": [], "invalid": []}
    real_folder = folder.resolve()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            if path.is_symlink() and not path.resolve().is_relative_to(real_folder):
                raise AlsegError("is a link that leads out of the folder; copy the file instead", path)
            item = _match(path.stem, batch)
            if item is None:
                raise AlsegError("names no image of the batch (see manifest.csv)", path)
            mask = validate_mask(path, item, size, allow_empty)
            outcome = store.store_mask(item.id, mask, source="files")
            result[outcome].append(item.id)
        except AlsegError as exc:
            result["invalid"].append({"file": str(path), "problem": exc.problem})
    return _with_progress(store, batch, result)


def submit_mask(store: RunStore, size: int, id: str, data: bytes, *, seconds: float | None = None,
                allow_empty: bool = False, source: str = "page") -> dict:
    """Validate one uploaded mask (PNG bytes) for batch image ``id`` and store it."""
    batch = latest_batch(store)
    if batch is None:
        raise AlsegError("no batch is open", store.run_dir)
    item = batch.item(id)
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
    outcome = store.store_mask(item.id, mask, source=source, seconds=seconds)
    return _with_progress(store, batch, {"id": id, "outcome": outcome})


def _with_progress(store: RunStore, batch: Batch, result: dict) -> dict:
    queued = store.queued(batch.round)
    labelled = len(batch.items) - len(queued)
    return {**result, "round": batch.round, "labelled": labelled, "total": len(batch.items), "queued": queued,
            "complete": not queued}
