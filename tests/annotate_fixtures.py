"""Shared set-up of the review-server tests (test_server.py, test_browser.py).

One small project with an open batch is built once per test session (about 20 s on CPU) and
copied for each test that writes. Its tiny model (200 steps) beats a constant mask, so the batch
offers predicted masks; the fixture replaces them with known ones (the true mask shifted by 3
px, at the image's size) and leaves one item's prediction empty: then an edit, an accept and an
undo can be told apart pixel by pixel.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

NON_SQUARE = (80, 56)  # width, height of half of the pool images (the rest stay 64 x 64)
BATCH = 8
_BUILT: dict[str, tuple[Path, dict]] = {}
_LOCK = threading.Lock()


def build_project(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """The session's template project (never written by tests) and the true masks of its batch."""
    with _LOCK:
        key = str(tmp_path_factory.getbasetemp())
        if key not in _BUILT:
            _BUILT[key] = _build(tmp_path_factory.mktemp("review-project"))
        return _BUILT[key]


def _build(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    from alseg.data.synthetic import make_synthetic
    from alseg.project import Project, init_project, query

    src = make_synthetic(root / "synthetic", n=60, size=64)
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    truth_files = {}
    for k, path in enumerate(sorted((src / "images").iterdir())):
        mask_path = src / "masks" / path.name
        if k < 12:  # the lab's first masks
            shutil.copy(path, images / path.name)
            shutil.copy(mask_path, masks / path.name)
        elif k % 2 == 0:  # a non-square pool image
            Image.open(path).resize(NON_SQUARE, Image.BILINEAR).save(images / path.name)
            truth_files[path.stem] = (mask_path, NON_SQUARE)
        else:
            shutil.copy(path, images / path.name)
            truth_files[path.stem] = (mask_path, (64, 64))
    project = root / "project"
    overrides = {"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 1, "min_epoch_steps": 200},
                 "active": {"round_epochs": 1, "mc_passes": 3}, "pretrain": {"min_steps": 30, "max_steps": 30}}
    init_project(project, images, masks, preset="demo", overrides=overrides)
    query(project, n=BATCH)
    truth: dict[str, np.ndarray] = {}
    with Project(project, command="test") as p:
        batch = p.batch()
        assert batch is not None and len(batch.items) == BATCH
        assert all(it.predicted for it in batch.items), "the fixture's model earned no head start"
        for k, it in enumerate(batch.items):
            mask_path, size = truth_files[it.id]
            true = np.asarray(Image.open(mask_path).convert("L").resize(size, Image.NEAREST)) >= 128
            assert true.shape == (it.height, it.width)
            truth[it.id] = true
            predicted = np.zeros_like(true) if k == BATCH - 1 else np.roll(true, 3, axis=1)
            (batch.folder / it.predicted).write_bytes(png(predicted))
    return project, truth


def copy_project(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    (dest / "lock").unlink(missing_ok=True)
    return dest


def png(mask: np.ndarray) -> bytes:
    """A bool mask (or uint8 array) as PNG bytes; bool becomes 0/255."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def predicted(batch, item) -> np.ndarray:
    """The batch item's predicted mask file as a bool array."""
    return np.asarray(Image.open(batch.folder / item.predicted).convert("L")) >= 128


class ThreadServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread of this process.

    The socket is bound (port 0) and listening before uvicorn starts: no free port is picked and
    bound later by someone else, and a request sent at once is queued, not refused."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.server.install_signal_handlers = lambda: None  # older uvicorn
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:  # waits on uvicorn's own flag; the bound is only a hang guard
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class ServeProcess:
    """``alseg.annotate.server.serve`` on ``project`` in a child process (port 0), as ``alseg serve`` runs it.

    ``setup``: Python run first in the child (``s`` is the server module), e.g. ``s.IDLE_SECONDS = 1``;
    ``options``: serve's keyword arguments as Python source, e.g. ``host='0.0.0.0'``. ``first`` is the
    line the server logs with its address; on leaving, Ctrl-C stops it and ``rest`` holds what it said
    after."""

    def __init__(self, project: Path, setup: str = "", options: str = ""):
        import subprocess
        import sys

        code = (f"import sys; import alseg.annotate.server as s; {setup or 'pass'}; "
                f"s.serve(sys.argv[1], port=0, log=lambda t: print(t, flush=True){', ' + options if options else ''})")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(project)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.first, self.rest = "", ""

    def __enter__(self) -> "ServeProcess":
        self.first = self.proc.stdout.readline()
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        self.rest = self.proc.stdout.read()

    def port(self, pattern: str = r"http://[^/\s]+:(\d+)/") -> int:
        found = re.search(pattern, self.first)
        assert found, self.first + (self.proc.stdout.read() if self.proc.poll() is not None else "")
        return int(found.group(1))


def project_state(root: Path) -> dict:
    """What a refused or killed write must leave as it was: every file but the database (content
    hashes), the store's masks and annotations, the queue and the expert's seconds."""
    import hashlib

    from alseg.store import RunStore

    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and not path.name.startswith("run.db"):
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    with RunStore.open_readonly(root) as store:
        return {"files": files, "masks": store.mask_ids(), "annotations": len(store.annotations()),
                "queued": store.queued(), "seconds": store.expert_seconds()}


def artifacts_dir(tmp_path: Path) -> Path:
    """Where screenshots go: $ALSEG_TEST_ARTIFACTS, else the test's tmp_path."""
    folder = Path(os.environ.get("ALSEG_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
