"""A run or project directory: where everything of one run lives, and who may write it.

Owns the layout of ``RUN_DIR`` (every path below is built here and nowhere else), creating a
fresh one, and the writer lock:

* ``run.db``: the store (:mod:`alseg.store`); ``config.yaml``: the effective config;
* ``checkpoints/round-RRR/{best,last}.pt`` (active runs) or ``checkpoints/{best,last}.pt``
  (supervised runs); ``pseudo/round-RRR.npz``: the pseudo-labels a round trained on;
  ``pretrain/``: the pre-trained weights and, while it runs, the pre-training's state;
* ``rounds/RRR/``: the batch exported for the expert (images, predicted masks, uncertainty
  overlays, ``manifest.csv``) and ``rounds/RRR/masks/``, where the expert's masks are expected;
* ``report/``, ``tensorboard/``; ``.incoming/``: uploads being validated; ``lock``.

One writer at a time: every command that writes takes :meth:`RunDir.lock`, an OS file lock
(``flock``) that the kernel releases when the process dies, so a crash never leaves a stale lock.
A second writer gets one line naming the process that holds it. Readers take no lock. A caller
that chains writers (``alseg compare``: start, adopt round 0, run) shares its hold with them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

from alseg.errors import AlsegError

DB_NAME = "run.db"
LOCK_NAME = "lock"
# Temporaries a writer killed mid-write leaves: `.NAME.tmp-XXXX` of an atomic write (alseg.store),
# `.RRR.exporting-PID` of a batch export (alseg.annotate.export).
_TEMPORARY = re.compile(r"^\..+\.(tmp-[^/]+|exporting-\d+)$")
# Per thread: the directories whose lock this thread holds with ``shared_with_callees``.
_shared_holds = threading.local()


class RunDir:
    """Paths of one run or project directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # --- creation -------------------------------------------------------------------------------
    @staticmethod
    def check_new(root: str | Path) -> "RunDir":
        """Check that ``root`` can become a fresh run directory (created later, once inputs are valid)."""
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise AlsegError("output folder exists and is not empty; choose another --out", root)
        parent = root.parent if not root.exists() else root
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise AlsegError("cannot create the run directory here (read-only folder)", parent)
        return RunDir(root)

    def require(self) -> "RunDir":
        """Check that this is an existing run directory."""
        if not self.root.is_dir():
            raise AlsegError("no such run directory", self.root)
        if not self.db.is_file():
            raise AlsegError("not a run directory (no run.db)", self.root)
        return self

    # --- files ----------------------------------------------------------------------------------
    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    def checkpoint_dir(self, round: int | None = None) -> Path:
        """``checkpoints/round-RRR`` for an active round; ``checkpoints`` for a supervised run."""
        base = self.root / "checkpoints"
        return base if round is None else base / f"round-{round:03d}"

    def checkpoint(self, round: int | None = None, which: str = "best") -> Path:
        return self.checkpoint_dir(round) / f"{which}.pt"

    @property
    def pretrain_dir(self) -> Path:
        """``pretrain/``: the self-supervised weights (``pretrained.pt``) and a running pre-training's state."""
        return self.root / "pretrain"

    def pseudo(self, round: int) -> Path:
        return self.root / "pseudo" / f"round-{round:03d}.npz"

    def batch(self, round: int) -> Path:
        return self.root / "rounds" / f"{round:03d}"

    def batch_masks(self, round: int) -> Path:
        return self.batch(round) / "masks"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def incoming(self) -> Path:
        return self.root / ".incoming"

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        """A path the store recorded relative to the directory; never one outside it."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise AlsegError(f"recorded path {relative!r} leaves the run directory", self.root)
        return path

    def empty(self, command: str) -> None:
        """Remove everything in the directory but its lock file, holding the lock (refused, naming
        the holder, while another process holds it)."""
        with self.lock(command):
            for child in self.root.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    # --- the writer lock ------------------------------------------------------------------------
    @contextmanager
    def lock(self, command: str, *, shared_with_callees: bool = False):
        """Hold the directory's writer lock for the ``with`` block (released when the process dies).

        A second take is refused, even by the same thread, unless the hold was taken with
        ``shared_with_callees``: then functions called inside the block that take this lock in the
        same thread join the hold, so one caller can chain writers without a gap between them for
        another process (``alseg compare`` starts a run, adopts round 0 into it and drives it).
        """
        held = _shared_holds.__dict__.setdefault("roots", set())
        key = self.root.resolve()
        if key in held:
            yield self
            return
        fd = self.acquire(command)
        if shared_with_callees:
            held.add(key)
        try:
            yield self
        finally:
            held.discard(key)
            os.close(fd)  # closing the descriptor releases the flock

    def acquire(self, command: str) -> int:
        """Take the writer lock and return its file descriptor (close it to release)."""
        path = self.root / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise AlsegError("run directory is read-only; commands that write need write access", self.root) from None
            if exc.errno == errno.ENOENT:
                raise AlsegError("no such run directory", self.root) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            pid, _, what = holder.partition(" ")
            who = f"process {pid} ({what})" if pid.isdigit() else holder
            raise AlsegError(f"run directory is in use by {who}; one writer at a time", self.root) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} alseg {command}\n".encode(), 0)
        self._remove_temporaries()
        return fd

    def _remove_temporaries(self) -> None:
        """Delete what a writer killed in mid-write left (the lock is ours: no writer is alive).

        Only the writers' own temporaries, in the folders writers write (never in a project's
        ``data/``, the user's images, nor in a report that a reader may be building)."""
        def walk(folder: Path, deep: bool) -> None:
            for child in folder.iterdir():
                if _TEMPORARY.match(child.name):
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                elif deep and child.is_dir() and not child.is_symlink():
                    walk(child, deep)

        walk(self.root, deep=False)
        for folder in (self.root / "checkpoints", self.root / "pseudo", self.root / "rounds", self.pretrain_dir):
            if folder.is_dir() and not folder.is_symlink():
                walk(folder, deep=True)
        if self.incoming.is_dir():  # uploads that were being validated when the server died
            for child in self.incoming.iterdir():
                child.unlink() if not child.is_dir() else shutil.rmtree(child)
