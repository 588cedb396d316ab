"""A lab's project: the expert in the loop, over the user's own images.

The workflow, each step a function here and a command of the CLI:

``init_project`` (``alseg init``) -> ``query`` (trains as needed, scores the pool, selects and
exports ``rounds/RRR/``) -> the expert labels (files or the review page) -> ``ingest`` (or the
page's submit) -> ``query`` ...

Any image the expert labelled can be corrected later (every version is kept) and the latest
version undone (:func:`undo`, :meth:`Project.undo`); several annotators may label, the first to
label an image owning it (:mod:`alseg.annotate.ingest`); :func:`export_effort` writes what the
labelling cost (:mod:`alseg.annotate.effort`).

A project is a run directory whose annotator is a person: it walks the same durable steps as
``alseg run`` (:mod:`alseg.active.loop`) and stops at *awaiting labels*. Every function that
writes holds the directory's writer lock; :class:`Project` holds it for as long as it is open
(the review server). ``status`` never writes.
"""
from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

from alseg.active.loop import AWAITING, ActiveRun, open_active, start_run, status
from alseg.annotate.effort import write_effort_csv
from alseg.annotate.export import BatchItem
from alseg.annotate.ingest import (Batch, batch_of, exported_rounds, find_item, ingest_folder, latest_batch,
                                   submit_mask)
from alseg.config import ExperimentConfig, build_config, choose_preset, config_from_dict
from alseg.data.sources import detect_format
from alseg.errors import AlsegError
from alseg.progress import SILENT, Reporter
from alseg.rundir import RunDir
from alseg.store import DEFAULT_ANNOTATOR, RunStore, atomic_write_text, is_disk_full

PROJECT_ROUNDS = 10_000  # a project has no round limit: the lab stops when it likes


def init_project(project: str | Path, images: str | Path, masks: str | Path | None = None, *,
                 preset: str | None = None, format: str | None = None, config_file: str | Path | None = None,
                 overrides: dict | None = None, pool: str = "unmasked", pretrain: bool = True,
                 reporter: Reporter = SILENT) -> dict:
    """Create a project over ``images`` (any layout the readers know, or a plain folder of images).

    ``masks``: a folder of the masks the lab already has, paired with ``images`` by file name.
    ``pool="unmasked"``: images without a mask are the pool; ``pool="split"`` splits as ``alseg run``
    does and hides the pool's masks (a rehearsal on a labelled dataset). Without ``preset`` the
    images choose one (:func:`alseg.config.preset_for_images`); the result says which and why.
    ``pretrain``: pre-train on the project's images before round 0 (:mod:`alseg.pretrain`), and
    let a project without masks choose its first batch to cover the pool in those features.
    """
    if pool not in ("unmasked", "split"):
        raise AlsegError(f"pool must be 'unmasked' or 'split', not {pool!r}")
    images = Path(images)
    run_dir = RunDir.check_new(project)
    if not images.is_dir():
        raise AlsegError("no such folder", images)
    data_path, fmt = images.absolute(), format
    linked = masks is not None or (format in (None, "folder") and not _has_layout(images))
    if masks is not None and not Path(masks).is_dir():
        raise AlsegError("no such folder", masks)
    if masks is not None and _has_layout(images):
        raise AlsegError("--masks goes with a plain folder of images; this folder has a dataset layout", images)
    created = not run_dir.root.exists()
    try:
        if linked:  # a plain folder: the project sees it in the folder layout, through links
            data_path, fmt = run_dir.root / "data", "folder"
            data_path.mkdir(parents=True)
            (data_path / "images").symlink_to(images.absolute(), target_is_directory=True)
            if masks is not None:
                (data_path / "masks").symlink_to(Path(masks).absolute(), target_is_directory=True)
        fmt = fmt or detect_format(data_path)
        name, sized, why = choose_preset(preset, data_path, fmt)
        # the first batch stays random (active.initial_selection): covering the pool in the pre-trained
        # features scored below random on validation Dice (docs/benchmarks.md, "Learning from the first masks")
        lab = {"pretrain": {"enabled": pretrain}}
        cfg = build_config(name, config_file, overrides, defaults={**lab, **sized})
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data_path), format=fmt),
                                  active=dataclasses.replace(cfg.active, rounds=PROJECT_ROUNDS, budget=None))
        start_run(cfg, run_dir, reporter, annotator="expert", pool=pool,  # checked above, before the links
                  notes=(f"preset {name}: {why}",))
    except BaseException as exc:
        if created:
            shutil.rmtree(run_dir.root, ignore_errors=True)
        else:  # the folder was there, empty: leave it empty
            for child in run_dir.root.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink()
        if is_disk_full(exc):
            raise AlsegError("disk full; the project was not created (nothing half-written was kept); free space "
                             "and run `alseg init` again", run_dir.root) from None
        if isinstance(exc, AlsegError):  # the project is gone: name the user's own files, or the project folder
            raise _in_users_folders(exc, run_dir.root, images if linked else None, masks) from None
        raise
    return {**status(run_dir.root), "preset": name, "preset_reason": why, "working_size": cfg.data.size}


def _in_users_folders(exc: AlsegError, root: Path, images: Path | None, masks: str | Path | None) -> AlsegError:
    """``exc`` of an init whose project folder ``root`` was removed: paths through its ``data/`` links
    (``images`` given) become the user's own paths, any other path inside it the project folder itself."""
    data = root / "data"
    pairs = []
    if images is not None:
        pairs.append((data / "images", images.resolve()))
        if masks is not None:
            pairs.append((data / "masks", Path(masks).resolve()))
        pairs.append((data, images.resolve()))
    swaps = [(str(seen), str(real)) for link, real in pairs for seen in {link, link.absolute()}]
    swaps.sort(key=lambda pair: -len(pair[0]))  # the longest first: data/images before data

    def users(text: str) -> str:
        for seen, real in swaps:
            if text == seen or text.startswith(seen + "/"):
                return real + text[len(seen):]
        for seen, real in swaps:  # a path inside the sentence
            text = text.replace(seen + "/", real + "/").replace(seen, real)
        return text

    path = None if exc.path is None else users(exc.path)
    if path is not None and any(path == str(r) or path.startswith(str(r) + "/") for r in {root, root.absolute()}):
        path = str(root)  # run.db or another file init made and removed: name the folder it tried to make
    return AlsegError(users(exc.problem), path)


def _has_layout(folder: Path) -> bool:
    try:
        detect_format(folder)
        return True
    except AlsegError:
        return False


def _open_project(store: RunStore) -> ExperimentConfig:
    config = open_active(store)
    if store.annotator() != "expert":
        raise AlsegError("not a project (made by `alseg run`, whose annotator is simulated)", store.run_dir)
    return config


def query(project: str | Path, n: int | None = None, strategy: str | None = None, *,
          reporter: Reporter = SILENT) -> dict:
    """Train as needed, score the pool, select and export the next batch; the open batch if there is one."""
    run_dir = RunDir(project).require()
    with run_dir.lock("query"), RunStore(run_dir) as store:
        config = _open_project(store)
        if n is not None or strategy is not None:
            config = _with_batch(config, n, strategy)
            store.set_config(config.to_dict())
            atomic_write_text(run_dir.config_file, config.to_yaml())
        stopped = ActiveRun(store, config, reporter).run()
        batch = latest_batch(store)
        result = {**status(run_dir.root), "stopped": stopped}
        if stopped == AWAITING and batch is not None:
            result["batch"] = {"round": batch.round, "folder": str(batch.folder), "images": len(batch.items),
                               "manifest": str(batch.folder / "manifest.csv"), "masks": str(batch.folder / "masks"),
                               "queued": len(store.queued(batch.round))}
        return result


def _with_batch(config: ExperimentConfig, n: int | None, strategy: str | None) -> ExperimentConfig:
    from alseg.active.strategies import make_strategy

    active = config.active
    if strategy is not None:
        active = dataclasses.replace(active, strategy=strategy)
    if n is not None:
        active = dataclasses.replace(active, batch_size=n)
    make_strategy(active.strategy, active.ceal, active.batch_size)  # one line for a bad name or size
    return dataclasses.replace(config, active=active)


def ingest(project: str | Path, folder: str | Path | None = None, *, allow_empty: bool = False,
           round: int | None = None) -> dict:
    """Validate and store the expert's masks (default folder: the batch's ``masks/``).

    ``folder`` may also be another tool's export (:func:`alseg.annotate.exchange.masks_from_exchange`:
    a CVAT Segmentation mask 1.1 zip, a Label Studio JSON, a COCO JSON, an ``alseg export`` folder):
    its masks, named after their images, pass the same checks as files.
    ``round``: match the files against that round's batch (corrections of a past round); without it,
    the open batch's names first, then any expert-labelled image of an exported round."""
    run_dir = RunDir(project).require()
    with run_dir.lock("ingest"), RunStore(run_dir) as store:
        config = _open_project(store)
        size = store.data_info()["size"]
        if folder is not None and _is_exchange(Path(folder)):
            result = _ingest_exchange(store, size, Path(folder), allow_empty=allow_empty, round=round)
        else:
            result = ingest_folder(store, size, folder, allow_empty=allow_empty, round=round)
        return result | {"working_size": config.data.size}


def _is_exchange(path: Path) -> bool:
    """Another tool's export (a file, or a folder alseg exported); a NIfTI mask volume is not one:
    :func:`ingest_folder` takes a volume project's batch slices from it."""
    from alseg.annotate.exchange import MARKER
    from alseg.data.volumes import is_nifti

    return (path.is_file() and not is_nifti(path)) or (path.is_dir() and (path / MARKER).is_file())


def _ingest_exchange(store: RunStore, size: int, source: Path, **options) -> dict:
    """Another tool's masks, written as PNG files named after their images, through :func:`ingest_folder`."""
    import tempfile

    import numpy as np

    from alseg.annotate.exchange import initial_masks, masks_from_exchange
    from alseg.data.samples import sample_mask
    from alseg.store import mask_png, resize_nearest

    masks = masks_from_exchange(source)
    # an export holds the lab's first masks too; they train from the lab's own files, so the same
    # mask back is unchanged and a different one is refused, naming the file to correct
    initial, same, changed = initial_masks(store), [], []
    for name in [n for n in masks if n in initial]:
        sample = initial[name]
        id, file = sample.id, sample.mask
        mask = masks.pop(name)
        stored = sample_mask(sample)
        (same if np.array_equal(resize_nearest(mask, stored.shape), stored) else changed).append((id, file))
    store.dir.incoming.mkdir(exist_ok=True)
    unusable = [name for name in masks if not name or "/" in name or "\\" in name or name.startswith(".")]
    with tempfile.TemporaryDirectory(prefix="exchange-", dir=store.dir.incoming) as tmp:
        for name, mask in masks.items():
            if name not in unusable:
                (Path(tmp) / f"{name}.png").write_bytes(mask_png(mask))
        result = ingest_folder(store, size, tmp, **options)
        result["invalid"] += [{"file": f"{tmp}/{name}", "problem": "names no image of the batch (see manifest.csv)"}
                              for name in unusable]
        for bad in result["invalid"]:  # name the user's file and the entry in it, not the temporary copy
            bad["file"] = f"{source} [{Path(bad['file']).stem}]"
    result["unchanged"] += [id for id, _ in same]
    result["invalid"] += [{"file": f"{source} [{id}]", "problem": f"differs from one of the lab's first masks, which "
                           f"trains from its own file: correct {file} instead"} for id, file in changed]
    return result


def undo(project: str | Path, id: str, annotator: str = DEFAULT_ANNOTATOR) -> dict:
    """Undo ``annotator``'s latest mask of ``id`` (:meth:`RunStore.undo_mask`), holding the writer lock."""
    with Project(project, command="undo") as p:
        return p.undo(id, annotator=annotator)


def export_effort(project: str | Path, csv_path: str | Path) -> dict:
    """Write the expert's effort, one row per annotation event, to ``csv_path`` (reads only)."""
    with RunStore.open_readonly(project) as store:
        rows = write_effort_csv(store, csv_path)
    return {"path": str(csv_path), "rows": rows}


class Project:
    """An open project holding the writer lock until :meth:`close` (the review server's handle).

    Thread-safe: calls are serialised, so two uploads of the same image at once leave one complete
    mask, the last one.
    """

    def __init__(self, project: str | Path, command: str = "serve"):
        self.dir = RunDir(project).require()
        self._fd = self.dir.acquire(command)
        try:
            self.store = RunStore(self.dir)
            self.config = _open_project(self.store)
        except BaseException:
            import os

            os.close(self._fd)
            raise
        self.size = self.store.data_info()["size"]
        self._lock = threading.Lock()

    def close(self) -> None:
        import os

        with self._lock:
            self.store.close()
            os.close(self._fd)

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def batch(self, round: int | None = None) -> Batch | None:
        """The batch of ``round``, or the latest batch (open or labelled) when None."""
        with self._lock:
            return latest_batch(self.store) if round is None else batch_of(self.store, round)

    def data_info(self) -> dict:
        """The dataset the project was made on (path, format, size, channels, volume axis)."""
        with self._lock:
            return self.store.data_info() or {}

    def sample_ids(self, state: str | None = None) -> list[str]:
        """The project's sample ids, or those in ``state`` (``labelled``, ``unlabelled``, ...)."""
        with self._lock:
            return self.store.sample_ids(state=state)

    def selected_rounds(self, id: str) -> list[int]:
        """The rounds whose batch chose ``id`` (none for a slice no round asked about)."""
        with self._lock:
            return self.store.selected_rounds(id)

    def rounds(self) -> list[dict]:
        """Every exported batch, oldest first: ``{round, total, labelled, open}`` (open: awaiting labels)."""
        with self._lock:
            out = []
            for r in exported_rounds(self.store):
                total = len(self.store.selection(r, "expert"))
                out.append({"round": r, "total": total, "labelled": total - len(self.store.queued(r)),
                            "open": self.store.round_status(r) == "awaiting"})
            return out

    def item(self, id: str, round: int | None = None) -> tuple[Batch, BatchItem]:
        """The batch and item of ``id``: in ``round``'s batch, or the open batch first, then the round that
        selected it. AlsegError when there is none."""
        with self._lock:
            return self._item(id, round)

    def _item(self, id: str, round: int | None) -> tuple[Batch, BatchItem]:
        if round is None:
            return find_item(self.store, id)
        batch = batch_of(self.store, round)
        if batch is None:
            raise AlsegError(f"round {round} has no exported batch", id)
        return batch, batch.item(id)

    def labelled(self, round: int) -> set[str]:
        with self._lock:
            queued = set(self.store.queued(round))
            return {i for i in self.store.selection(round, "expert") if i not in queued}

    def submit(self, id: str, data: bytes, *, round: int | None = None, seconds: float | None = None,
               allow_empty: bool = False, annotator: str = DEFAULT_ANNOTATOR, effort: dict | None = None,
               replace: bool = False) -> dict:
        """Validate and store ``annotator``'s mask of ``id`` (:func:`alseg.annotate.ingest.submit_mask`);
        raises :class:`~alseg.annotate.ingest.NeedsConfirm` when it would replace a different mask and
        ``replace`` is false."""
        with self._lock:
            return submit_mask(self.store, self.size, id, data, seconds=seconds, allow_empty=allow_empty,
                               round=round, annotator=annotator, effort=effort, replace=replace)

    def undo(self, id: str, *, annotator: str = DEFAULT_ANNOTATOR) -> dict:
        """Undo ``annotator``'s latest mask of ``id``, with the open batch's progress."""
        with self._lock:
            result = self.store.undo_mask(id, annotator)
            batch = latest_batch(self.store)
            if batch is None:
                return result
            queued = self.store.queued(batch.round)
            return {**result, "item_round": result["round"], "round": batch.round,
                    "labelled": len(batch.items) - len(queued), "total": len(batch.items), "queued": queued,
                    "complete": not queued}

    def history(self, id: str) -> list[dict]:
        """Every version of ``id``'s mask, oldest first (:meth:`RunStore.history`)."""
        with self._lock:
            return self.store.history(id)

    def record_time(self, id: str, seconds: float, action: str = "skip", *, annotator: str = DEFAULT_ANNOTATOR,
                    active_seconds: float | None = None, round: int | None = None) -> None:
        with self._lock:
            self._item(id, round)
            self.store.record_expert_time(id, seconds, action, annotator=annotator, active_seconds=active_seconds)

    def stored_mask(self, id: str, version: int | None = None):
        """The mask of ``id`` that trains, or its version ``version`` (bool array), or None."""
        with self._lock:
            return self.store.mask(id) if version is None else self.store.mask_version(id, version)

    def status(self) -> dict:
        with self._lock:
            return status(self.dir.root)


def project_config(project: str | Path) -> ExperimentConfig:
    with RunStore.open_readonly(project) as store:
        return config_from_dict(store.config())
