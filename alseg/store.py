"""A run's durable state: its SQLite database, and atomic file writes.

Owns ``RUN_DIR/run.db`` (stdlib sqlite3, WAL journal) and the rule for writing files so that a
crash never leaves a half-written checkpoint or config: write to a temporary file in the same
folder, fsync, then rename over the target (with the umask's normal file mode).

Tables:

* ``meta``: a few JSON values, read and written only through the typed methods below (config,
  split, data description, normaliser, kind, annotator, latest checkpoint, stop reason);
* ``samples``: every split sample, its split, label state (``pool`` / ``queued`` for the
  expert / ``labelled``), origin (``initial`` / ``expert`` / ``pseudo``) and round;
* ``masks``: the current mask of each expert-labelled id (PNG bytes, at the size it arrived, and
  the annotator who owns it), the source of truth for training once it is stored;
* ``mask_blobs``: every mask that ever arrived, by the sha256 of its PNG (content-addressed, so a
  mask restored or sent twice is kept once);
* ``annotations``: every event of the expert's: a mask stored, replaced, unchanged, a second
  reading, an undo, a skip or time spent viewing, with who (``annotator``), in which ``role``,
  the wall ``seconds`` and the effort the page measured (``active_seconds``, ``strokes``,
  ``clicks``) or the store computed (``changed_previous``, ``changed_prediction`` pixels,
  ``accepted``: the prediction taken as it was). A **version** of a mask is an annotations row
  with a sha256 whose action is ``stored``, ``replaced`` or ``undo``; versions are numbered
  1, 2, ... per id in arrival order;
* ``rounds``: one row per round: ``awaiting`` labels once selected, ``labelled`` once every
  queued mask arrived, ``done`` once its model is trained and evaluated;
* ``scores``: (round, id, name, value) rows, so a new score needs no schema change;
* ``selections``: who was chosen in each round, as expert or pseudo, and why;
* ``epochs`` and ``evaluations``: training history and Dice summaries;
* ``round_facts``: (round, name, JSON value) rows of what a round decided or found, for example
  ``model`` (its validation Dice beside the constant masks', :mod:`alseg.active.gate`),
  ``gate`` (the pseudo-labels it was allowed and why) and ``batch`` (each exported item's id, file
  names and original width and height: :meth:`RunStore.record_batch`, so sizes and ids come from
  here, never from the ``manifest.csv`` a user can edit), so a new fact needs no schema change.

Several annotators: the first annotator whose mask is stored for an image **owns** it; the
owner's versions are the ones that train (``masks``). Another annotator's mask for an image
someone owns is a **second reading** (role ``second``): kept beside, never trained on, and
compared with the owner's (:meth:`RunStore.agreement`, Dice). An undo that sends an image back
to the queue leaves it without an owner.

Schema 3 added ``round_facts``; schema 4 keeps every version (``mask_blobs``, the owner in
``masks.annotator`` and the effort and role columns of ``annotations``). An older database is
brought to schema 4 when opened for writing (the current masks become the first blobs; an
earlier mask replaced before schema 4 is not recoverable and its version has no blob); opened
read-only it reads as having no facts, no owners and no effort figures. A database of another
version is refused in one line, read or written: a newer schema (upgrade alseg), an older one
than 2 or none at all (not a run database this alseg can read).

A full disk inside a transaction rolls it back and raises :class:`DiskFull` (an AlsegError: one
line, saying nothing half-written was kept).

Selection, queueing and the round row are one transaction; so is a mask's arrival with its
label move, and an undo with its label move: a crash can never lose or duplicate a label. An id
counts as labelled when its mask is stored, never at selection. Only this module writes the
database. Reading commands open it read-only (:meth:`RunStore.open_readonly`), so they work on
a read-only copy and never write into a damaged file.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from alseg.errors import AlsegError
from alseg.rundir import DB_NAME, LOCK_NAME, RunDir

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE samples (
    id TEXT PRIMARY KEY, split TEXT NOT NULL, state TEXT NOT NULL,
    origin TEXT NOT NULL, round INTEGER);
CREATE TABLE masks (
    id TEXT PRIMARY KEY, round INTEGER NOT NULL, png BLOB NOT NULL, width INTEGER NOT NULL,
    height INTEGER NOT NULL, sha256 TEXT NOT NULL, source TEXT NOT NULL, received REAL NOT NULL);
CREATE TABLE annotations (
    id TEXT NOT NULL, round INTEGER, action TEXT NOT NULL, sha256 TEXT, previous_sha256 TEXT,
    source TEXT, seconds REAL, at REAL NOT NULL);
CREATE TABLE epochs (
    phase TEXT NOT NULL, round INTEGER NOT NULL, epoch INTEGER NOT NULL,
    train_loss REAL, train_dice REAL, val_dice REAL, lr REAL, seconds REAL,
    PRIMARY KEY (phase, round, epoch));
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, status TEXT NOT NULL, expert_labelled INTEGER, pseudo_labelled INTEGER,
    pool INTEGER, test_dice REAL, val_dice REAL, seconds REAL, timings TEXT, shortfalls TEXT);
CREATE TABLE scores (
    round INTEGER NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (round, id, name));
CREATE TABLE selections (
    round INTEGER NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT,
    PRIMARY KEY (round, id));
CREATE TABLE evaluations (
    round INTEGER NOT NULL, split TEXT NOT NULL, images INTEGER, mean_dice REAL, median_dice REAL,
    pooled_dice REAL, volume_dice_mean REAL, created REAL, PRIMARY KEY (round, split));
"""
# Schema 3's addition, which is also the whole migration from schema 2.
_FACTS_TABLE = """CREATE TABLE IF NOT EXISTS round_facts (
    round INTEGER NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (round, name))"""
# Schema 4's additions (every version of every mask, who made it and the effort), which are also the
# migration from schema 3: new columns are added, so a schema-3 table and a new one end up alike.
_BLOBS_TABLE = """CREATE TABLE IF NOT EXISTS mask_blobs (
    sha256 TEXT PRIMARY KEY, png BLOB NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL)"""
_NEW_COLUMNS = {"annotations": (("annotator", "TEXT"), ("active_seconds", "REAL"), ("strokes", "INTEGER"),
                                ("clicks", "INTEGER"), ("changed_previous", "INTEGER"),
                                ("changed_prediction", "INTEGER"), ("accepted", "INTEGER"), ("role", "TEXT")),
                "masks": (("annotator", "TEXT"),)}
_SCHEMA += _FACTS_TABLE + ";\n" + _BLOBS_TABLE + ";\n"
_TABLES = {"meta", "samples", "masks", "annotations", "epochs", "rounds", "scores", "selections", "evaluations",
           "round_facts", "mask_blobs"}
_OLD_TABLES = _TABLES - {"round_facts", "mask_blobs"}  # what a schema-2 database holds
ANNOTATION_KEYS = ("id", "round", "action", "sha256", "previous_sha256", "source", "seconds", "at", "annotator",
                   "active_seconds", "strokes", "clicks", "changed_previous", "changed_prediction", "accepted", "role")
VERSION_ACTIONS = ("stored", "replaced", "undo")  # with a sha256: a version of the id's mask
EFFORT_KEYS = ("active_seconds", "strokes", "clicks")  # what the page measures
DEFAULT_ANNOTATOR = "local"


def _migration_statements(tables: set[str], columns: dict[str, set[str]]) -> list[str]:
    """The statements that bring a schema-2 or -3 database to this schema (nothing for a current one)."""
    out = []
    if "round_facts" not in tables:
        out.append(_FACTS_TABLE)
    if "mask_blobs" not in tables:
        out.append(_BLOBS_TABLE)
    for table, new in _NEW_COLUMNS.items():
        out += [f"ALTER TABLE {table} ADD COLUMN {name} {kind}" for name, kind in new
                if name not in columns.get(table, set())]
    # the current masks are the first versions kept; earlier replaced masks were never kept
    out.append("INSERT OR IGNORE INTO mask_blobs (sha256, png, width, height) SELECT sha256, png, width, height FROM masks")
    return out


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask at ``shape`` (height, width), nearest neighbour (Pillow's, as the working-size cache)."""
    from PIL import Image

    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) >= 128


def pixels_changed(mask: np.ndarray, other: np.ndarray | None) -> int | None:
    """How many pixels of ``mask`` differ from ``other`` (brought to ``mask``'s size); None without ``other``."""
    if other is None:
        return None
    return int(np.count_nonzero(np.asarray(mask, bool) != resize_nearest(other, mask.shape)))


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (1.0 when both are empty, as :mod:`alseg.metrics`); when their sizes differ the
    smaller (a mask given at the working size) is brought to the larger's size, nearest neighbour."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.size < b.size:
        a, b = b, a
    b = resize_nearest(b, a.shape)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


class DiskFull(AlsegError):
    """The disk filled up inside a write; the transaction was rolled back (nothing half-written kept)."""


def is_disk_full(exc: BaseException) -> bool:
    """Is ``exc`` SQLite's or the OS's "disk full" (SQLITE_FULL, ENOSPC, EDQUOT), or :class:`DiskFull`?"""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_io_error(exc: BaseException) -> bool:
    """SQLite's SQLITE_IOERR family ("disk I/O error")."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and (
        (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR) or "disk I/O error" in str(exc))


def disk_full_error(exc: OSError, path: str | Path, state: str) -> AlsegError | None:
    """The one-line error for a full disk (``state`` says what is left), or None for other errors."""
    if exc.errno == errno.ENOSPC:
        return AlsegError(f"disk full; {state}", path)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return AlsegError(f"cannot write here (read-only or no permission); {state}", path)
    return None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)  # the name RunDir cleans up
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; files here are ordinary outputs
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def mask_png(mask: np.ndarray) -> bytes:
    """A binary mask as 0/255 PNG bytes (what the store keeps and the page shows)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def mask_from_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) >= 128


def summarise_effort(events: Sequence[Mapping[str, Any]]) -> dict:
    """What a set of annotation events (:meth:`RunStore.effort_events`) cost and changed.

    ``images``: images with a version among them; ``versions``: masks stored (second readings and undos
    included); ``seconds`` (wall), ``active_seconds``, ``strokes``, ``clicks``: sums (None where none was
    measured); ``pixels_changed_from_prediction`` (sum and median) and ``accepted_as_is`` (count) are
    taken from each image's latest owner version that could be compared with a predicted mask, so a
    mask corrected twice counts once, as it ended.
    """
    def total(key):
        values = [e[key] for e in events if e.get(key) is not None]
        return sum(values) if values else None

    versions = [e for e in events if e["version"] is not None]
    final: dict[str, Mapping[str, Any]] = {}
    for e in versions:
        if e["role"] != "second" and e["changed_prediction"] is not None:
            final[e["id"]] = e
    changed = [e["changed_prediction"] for e in final.values()]
    return {"images": len({e["id"] for e in versions}), "versions": len(versions), "seconds": total("seconds"),
            "active_seconds": total("active_seconds"), "strokes": total("strokes"), "clicks": total("clicks"),
            "pixels_changed_from_prediction": sum(changed) if changed else None,
            "median_pixels_changed_from_prediction": float(np.median(changed)) if changed else None,
            "compared_with_prediction": len(changed),
            "accepted_as_is": sum(1 for e in final.values() if e["accepted"])}


class RunStore:
    """The SQLite database of one run directory."""

    def __init__(self, run_dir: str | Path | RunDir, create: bool = False, readonly: bool = False):
        self.dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.run_dir = self.dir.root
        self.readonly = readonly
        db = self.dir.db
        if create:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                db.open("x").close()  # exclusive: two processes can never share one new run directory
            except FileExistsError:
                raise AlsegError("run directory is already in use (it has a run.db)", self.run_dir) from None
            except OSError as exc:
                raise disk_full_error(exc, self.run_dir, "nothing was written") or exc from None
        else:
            self.dir.require()
            if db.stat().st_size == 0:
                raise AlsegError("run.db is empty (damaged); nothing was changed", db)
        try:
            if readonly:
                self.conn = self._connect_readonly(db)
            else:
                self.conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
            if create:
                with self.transaction() as c:
                    for statement in _SCHEMA.strip().split(";"):
                        if statement.strip():
                            c.execute(statement)
                    for table, columns in _NEW_COLUMNS.items():  # as a migrated database has them
                        for name, kind in columns:
                            c.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                    c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
            else:
                self._check()
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc):
                raise DiskFull("disk full; nothing half-written was kept (the change was rolled back); free "
                               "space and run the command again", db) from None
            if create:  # a file made a moment ago cannot be damaged: writing it failed
                raise AlsegError(f"cannot write run.db ({exc}; is the disk full?); nothing was kept", db) from None
            raise AlsegError(f"run.db is damaged ({exc}); nothing was changed", db) from None

    @staticmethod
    def _connect_readonly(db: Path) -> sqlite3.Connection:
        # mode=ro reads a live WAL database; a read-only folder (no -shm can be made) needs immutable=1
        uri = f"file:{db.absolute()}?mode=ro"
        if not os.access(db.parent, os.W_OK):
            uri = f"file:{db.absolute()}?immutable=1"
        conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn

    def _check(self) -> None:
        """Refuse a file that is not a whole run database before anything reads or writes it; bring an
        older schema up to date when opened for writing."""
        check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(check)
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        try:
            version = self._get("schema_version") if "meta" in tables else None
        except ValueError:  # not JSON
            version = "unreadable"
        if "meta" in tables and version is None:
            raise AlsegError("run.db has no schema version (not a run database, or damaged); nothing was changed",
                             self.dir.db)
        if type(version) is not int and "meta" in tables:
            raise AlsegError(f"run.db has schema {version!r}, which no alseg writes (damaged?); nothing was "
                             "changed", self.dir.db)
        if type(version) is int and version > SCHEMA_VERSION:
            raise AlsegError(f"run.db has schema {version}, made by a newer alseg (this one reads up to "
                             f"{SCHEMA_VERSION}); upgrade alseg", self.dir.db)
        if type(version) is int and version < 2:  # whatever its tables, this alseg cannot read it
            raise AlsegError(f"run.db has schema {version}, made by an older alseg (this one reads 2 to "
                             f"{SCHEMA_VERSION}); start a new run", self.dir.db)
        if not _OLD_TABLES <= tables or (version not in (2, 3) and not _TABLES <= tables):
            raise AlsegError("run.db is not a run database (tables missing); nothing was changed", self.dir.db)
        if version in (2, 3) and not self.readonly:  # schema 2 or 3 -> 4: tables and columns added
            with self.transaction() as c:
                for statement in _migration_statements(tables, self._columns()):
                    c.execute(statement)
                c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
            tables |= {"round_facts", "mask_blobs"}
        self._has_facts = "round_facts" in tables
        self._has_blobs = "mask_blobs" in tables
        self._annotation_columns = self._columns()["annotations"]
        self._mask_columns = self._columns()["masks"]

    def _columns(self) -> dict[str, set[str]]:
        return {t: {r[1] for r in self.conn.execute(f"PRAGMA table_info({t})")} for t in ("annotations", "masks")}

    def _annotation_select(self) -> str:
        """The annotations columns of :data:`ANNOTATION_KEYS`, NULL where an old database (read-only) lacks one."""
        cols = getattr(self, "_annotation_columns", set(ANNOTATION_KEYS))
        return ", ".join(k if k in cols else f"NULL AS {k}" for k in ANNOTATION_KEYS)

    @staticmethod
    def never_started(run_dir: RunDir) -> bool:
        """Is ``run_dir`` what a run killed while it was being created leaves, safe to empty and reuse?

        Yes for: only the lock file (killed before run.db was made), an empty run.db, a database
        without tables (killed before the schema committed) or one whose start never committed.
        A database that cannot be read is damaged, not unstarted: it is never emptied."""
        root = run_dir.root
        if not root.is_dir():
            return False
        names = {p.name for p in root.iterdir()}
        if DB_NAME not in names:
            return names == {LOCK_NAME}
        db = run_dir.db
        if not db.is_file() or db.is_symlink():
            return False
        if db.stat().st_size == 0:
            return True
        try:
            conn = RunStore._connect_readonly(db)
            try:
                if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    return False
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not tables:
                    return True
                if "meta" not in tables:
                    return False
                row = conn.execute("SELECT value FROM meta WHERE key = 'started'").fetchone()
                return not (row and json.loads(row[0]))
            finally:
                conn.close()
        except (sqlite3.Error, ValueError):
            return False

    @classmethod
    def open_readonly(cls, run_dir: str | Path | RunDir) -> "RunStore":
        return cls(run_dir, readonly=True)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self):
        """One write transaction; a full disk rolls it back and raises :class:`DiskFull`."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # SQLite may have rolled back already (a full disk can)
                    self.conn.execute("ROLLBACK")
                raise
        except (sqlite3.OperationalError, OSError) as exc:
            if is_disk_full(exc):
                raise DiskFull("disk full; nothing half-written was kept (the change was rolled back); free space "
                               "and run the command again", self.dir.db) from None
            if _is_io_error(exc):  # what a full disk can also look like to SQLite (a WAL or -shm write failing)
                raise AlsegError(f"cannot write run.db ({exc}; is the disk full?); nothing half-written was kept "
                                 "(the change was rolled back)", self.dir.db) from None
            raise

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir.checkpoint_dir()

    # --- meta: typed accessors ------------------------------------------------------------------
    def _set(self, key: str, value: Any, conn=None) -> None:
        (conn or self.conn).execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def _get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def start(self, *, kind: str, annotator: str, config: dict, data: dict, normalizer: dict | None,
              split: dict, samples: Iterable[tuple[str, str, str, str, int | None]]) -> None:
        """Everything a new run records before its first step, in one transaction."""
        with self.transaction() as c:
            for key, value in (("kind", kind), ("annotator", annotator), ("config", config), ("data", data),
                               ("normalizer", normalizer), ("split", split)):
                self._set(key, value, c)
            c.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?)", list(samples))
            self._set("started", True, c)  # last: a run without it never finished starting

    def started(self) -> bool:
        return bool(self._get("started", False))

    def kind(self) -> str:
        return self._get("kind")

    def annotator(self) -> str:
        return self._get("annotator", "simulated")

    def config(self) -> dict:
        return self._get("config")

    def set_config(self, config: dict) -> None:
        self._set("config", config)

    def data_info(self) -> dict:
        return self._get("data")

    def normalizer(self) -> dict | None:
        return self._get("normalizer")

    def set_normalizer(self, value: dict) -> None:
        self._set("normalizer", value)

    def split(self) -> dict:
        return self._get("split")

    def latest_checkpoint(self) -> str | None:
        return self._get("latest_checkpoint")

    def set_latest_checkpoint(self, relative: str) -> None:
        self._set("latest_checkpoint", relative)

    def stopped(self) -> str | None:
        return self._get("stopped")

    def set_stopped(self, reason: str | None) -> None:
        self._set("stopped", reason)

    def supervised_seconds(self) -> float | None:
        return self._get("seconds")

    def set_supervised_seconds(self, seconds: float) -> None:
        self._set("seconds", seconds)

    # --- samples ------------------------------------------------------------------------------
    def sample_ids(self, split: str | None = None, state: str | None = None) -> list[str]:
        q, args = "SELECT id FROM samples WHERE 1=1", []
        if split:
            q, args = q + " AND split = ?", args + [split]
        if state:
            q, args = q + " AND state = ?", args + [state]
        return [r[0] for r in self.conn.execute(q + " ORDER BY rowid", args)]

    def labelled_ids(self, origins: tuple[str, ...] | None = None) -> list[str]:
        """Labelled training ids, optionally only those of the given origins (initial/expert/pseudo)."""
        q, args = "SELECT id FROM samples WHERE split = 'train' AND state = 'labelled'", []
        if origins:
            q += f" AND origin IN ({', '.join('?' * len(origins))})"
            args += list(origins)
        return [r[0] for r in self.conn.execute(q + " ORDER BY rowid", args)]

    def expert_ids(self) -> list[str]:
        """Every id labelled by the expert, in any split (a first batch may have given the validation set)."""
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM samples WHERE state = 'labelled' AND origin = 'expert' ORDER BY rowid")]

    def origins(self, ids: Sequence[str]) -> dict[str, str]:
        rows = self.conn.execute(f"SELECT id, origin FROM samples WHERE id IN ({', '.join('?' * len(ids))})", list(ids))
        return dict(rows.fetchall())

    def move_to_validation(self, ids: Sequence[str], split: dict) -> None:
        """Carve a validation set out of labelled training ids (a project that started without one)."""
        with self.transaction() as c:
            c.executemany("UPDATE samples SET split = 'val' WHERE id = ? AND split = 'train' AND state = 'labelled'",
                          [(i,) for i in ids])
            self._set("split", split, c)

    def counts(self) -> dict[str, int]:
        """Training images by label state and origin: expert_labelled, pseudo_labelled, queued, pool."""
        rows = dict(((s, o), n) for s, o, n in self.conn.execute(
            "SELECT state, origin, COUNT(*) FROM samples WHERE split = 'train' GROUP BY state, origin"))
        return {"expert_labelled": rows.get(("labelled", "initial"), 0) + rows.get(("labelled", "expert"), 0),
                "pseudo_labelled": rows.get(("labelled", "pseudo"), 0),
                "queued": sum(n for (s, _), n in rows.items() if s == "queued"),
                "pool": sum(n for (s, _), n in rows.items() if s == "pool")}

    # --- history ------------------------------------------------------------------------------
    def add_epoch(self, phase: str, round: int, record: dict) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (phase, round, record["epoch"], record.get("train_loss"), record.get("train_dice"),
             record.get("val_dice"), record.get("lr"), record.get("seconds")))

    def epochs(self, phase: str | None = None) -> list[dict]:
        q = "SELECT phase, round, epoch, train_loss, train_dice, val_dice, lr, seconds FROM epochs"
        rows = self.conn.execute(q + (" WHERE phase = ?" if phase else "") + " ORDER BY round, epoch",
                                 (phase,) if phase else ())
        keys = ("phase", "round", "epoch", "train_loss", "train_dice", "val_dice", "lr", "seconds")
        return [dict(zip(keys, r)) for r in rows]

    def add_evaluation(self, round: int, split: str, summary: dict) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (round, split, summary["images"], summary["mean_dice"], summary["median_dice"],
             summary["pooled_dice"], summary["volume_dice_mean"], time.time()))

    def evaluations(self) -> list[dict]:
        keys = ("round", "split", "images", "mean_dice", "median_dice", "pooled_dice", "volume_dice_mean")
        rows = self.conn.execute(f"SELECT {', '.join(keys)} FROM evaluations ORDER BY round, split")
        return [dict(zip(keys, r)) for r in rows]

    def set_round_fact(self, round: int, name: str, value: Any, conn=None) -> None:
        (conn or self.conn).execute("INSERT OR REPLACE INTO round_facts VALUES (?, ?, ?)",
                                    (round, name, json.dumps(value)))

    def record_batch(self, round: int, items: Sequence[Mapping[str, Any]]) -> None:
        """What was exported for ``round``'s expert, one mapping per image (``id``, file names, ``width`` and
        ``height`` of the original image, ...): the batch's truth, whatever its ``manifest.csv`` says later."""
        with self.transaction() as c:
            self.set_round_fact(round, "batch", [dict(it) for it in items], c)

    def batch_record(self, round: int) -> list[dict] | None:
        """The items :meth:`record_batch` recorded for ``round``; None for a batch exported before alseg
        recorded them (or a schema-2 database read-only)."""
        if not getattr(self, "_has_facts", True):
            return None
        row = self.conn.execute("SELECT value FROM round_facts WHERE round = ? AND name = 'batch'",
                                (round,)).fetchone()
        return None if row is None else json.loads(row[0])

    def round_facts(self) -> dict[int, dict[str, Any]]:
        """Every round's recorded facts: ``{round: {name: value}}`` (empty for a schema-2 database read-only)."""
        if not getattr(self, "_has_facts", True):
            return {}
        out: dict[int, dict[str, Any]] = {}
        for r, name, value in self.conn.execute("SELECT round, name, value FROM round_facts ORDER BY round, name"):
            out.setdefault(r, {})[name] = json.loads(value)
        return out

    # --- active-learning rounds ----------------------------------------------------------------
    def record_selection(self, round: int, pool_ids: Sequence[str], scores: Mapping[str, Any] | None,
                         expert: list[str], pseudo: list[str], reasons: dict[str, str], shortfalls: list[str],
                         keep_pseudo: bool, timings: dict | None = None, facts: Mapping[str, Any] | None = None) -> None:
        """Atomically: the pool's scores, the selection, the expert ids queued, an ``awaiting`` round row
        and the round's ``facts`` (the pseudo-label gate)."""
        with self.transaction() as c:
            for name, value in (facts or {}).items():
                self.set_round_fact(round, name, value, c)
            rows = []
            for name, values in (scores or {}).items():
                if values is None:
                    continue
                rows += [(round, i, name, float(values[k])) for k, i in enumerate(pool_ids)]
            c.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)
            c.executemany("INSERT OR REPLACE INTO selections VALUES (?, ?, ?, ?)",
                          [(round, i, "expert", reasons.get(i)) for i in expert]
                          + [(round, i, "pseudo", reasons.get(i)) for i in pseudo])
            c.executemany("UPDATE samples SET state = 'queued', round = ? WHERE id = ? AND state = 'pool'",
                          [(round, i) for i in expert])
            if keep_pseudo:
                c.executemany("UPDATE samples SET state = 'labelled', origin = 'pseudo', round = ? "
                              "WHERE id = ? AND state = 'pool'", [(round, i) for i in pseudo])
            status = "awaiting" if expert else "labelled"
            c.execute("INSERT OR REPLACE INTO rounds (round, status, timings, shortfalls) VALUES (?, ?, ?, ?)",
                      (round, status, json.dumps(timings or {}), json.dumps(shortfalls)))

    def queued(self, round: int | None = None) -> list[str]:
        q, args = "SELECT id FROM samples WHERE state = 'queued'", []
        if round is not None:
            q, args = q + " AND round = ?", [round]
        return [r[0] for r in self.conn.execute(q + " ORDER BY rowid", args)]

    def store_mask(self, id: str, mask: np.ndarray, *, source: str, seconds: float | None = None,
                   annotator: str | None = None, effort: Mapping[str, Any] | None = None,
                   predicted: np.ndarray | None = None) -> str:
        """Store a mask of ``id``; returns the outcome of :meth:`store_version` (``stored``, ``replaced``,
        ``unchanged`` or ``second``)."""
        return self.store_version(id, mask, source=source, seconds=seconds, annotator=annotator, effort=effort,
                                  predicted=predicted)["outcome"]

    def store_version(self, id: str, mask: np.ndarray, *, source: str, seconds: float | None = None,
                      annotator: str | None = None, effort: Mapping[str, Any] | None = None,
                      predicted: np.ndarray | None = None) -> dict:
        """Store ``annotator``'s mask of ``id`` (queued, or expert-labelled and being corrected) as a new version.

        ``annotator`` None: the image's owner (``local`` when nobody owns it yet). The first annotator owns
        the image and their masks train; another annotator's is kept as a second reading (outcome
        ``second``). One transaction: the blob, the annotations row, and for the owner the current mask, the
        label move and, when it was the batch's last, the round's move to ``labelled``. ``effort``: what the
        page measured (``active_seconds``, ``strokes``, ``clicks``); ``predicted``: the batch's predicted
        mask, to count the pixels changed from it. The same mask again changes nothing but the time
        (outcome ``unchanged``). Returns ``{outcome, version, role, annotator, round, changed_previous,
        changed_prediction, accepted}``.
        """
        png = mask_png(mask)
        sha = hashlib.sha256(png).hexdigest()
        effort = effort or {}
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT state, origin, round FROM samples WHERE id = ?", (id,)).fetchone()
            if row is None or not (row[0] == "queued" or (row[0] == "labelled" and row[1] == "expert")):
                raise AlsegError("not in an open batch nor labelled by the expert (nothing was stored)", id)
            state, _, round = row
            owner = self._owner(c, id)
            who = annotator or owner or DEFAULT_ANNOTATOR
            role = "second" if owner is not None and who != owner else "owner"
            if role == "owner":
                current = c.execute("SELECT sha256 FROM masks WHERE id = ?", (id,)).fetchone()
                previous = current[0] if current else None
            else:
                stack = self._stack(c, id, "second", who)
                previous = stack[-1] if stack else None
            previous_mask = None
            if previous is not None and previous != sha:
                blob = self._blob(c, previous)
                previous_mask = mask_from_png(blob) if blob is not None else None
            changed_prediction = pixels_changed(mask, predicted)
            figures = {"changed_previous": 0 if previous == sha else pixels_changed(mask, previous_mask),
                       "changed_prediction": changed_prediction,
                       "accepted": None if changed_prediction is None else changed_prediction == 0}
            if previous == sha:
                action = outcome = "unchanged"
            else:
                action = "replaced" if previous else "stored"
                outcome = "second" if role == "second" else action
                h, w = mask.shape
                c.execute("INSERT OR IGNORE INTO mask_blobs (sha256, png, width, height) VALUES (?, ?, ?, ?)",
                          (sha, png, w, h))
            self._annotate(c, id=id, round=round, action=action, sha256=sha, previous_sha256=previous,
                           source=source, seconds=seconds, at=now, annotator=who, role=role,
                           active_seconds=effort.get("active_seconds"), strokes=effort.get("strokes"),
                           clicks=effort.get("clicks"), **figures)
            if role == "owner" and action != "unchanged":
                self._set_current(c, id, round, png, mask.shape, sha, source, now, who)
                c.execute("UPDATE samples SET state = 'labelled', origin = 'expert' WHERE id = ?", (id,))
                left = c.execute("SELECT COUNT(*) FROM samples WHERE state = 'queued' AND round = ?",
                                 (round,)).fetchone()[0]
                if state == "queued" and left == 0:
                    c.execute("UPDATE rounds SET status = 'labelled' WHERE round = ? AND status = 'awaiting'", (round,))
            version = self._current_of(c, id, role, who)
            return {"outcome": outcome, "version": version["version"] if version else None, "role": role,
                    "annotator": who, "round": round, **figures}

    def undo_mask(self, id: str, annotator: str | None = None) -> dict:
        """Undo the latest version of ``id`` of ``annotator`` (None: the owner's, the mask that trains).

        The previous version becomes current again, recorded as a new version (action and source
        ``undo``). When the current version is the only one: an image of a round still awaiting labels (or
        labelled but not trained) goes back to the queue without a mask and without an owner; a second
        reading is withdrawn. Anything else is AlsegError("nothing earlier to restore"). One transaction.
        Returns ``{id, outcome: restored|requeued|withdrawn, version, restored_version, round, state}``.
        """
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT state, origin, round FROM samples WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise AlsegError("unknown id", id)
            state, origin, round = row
            owner = self._owner(c, id)
            if owner is None or annotator is None or annotator == owner:
                role, who = "owner", owner
                if owner is None or state != "labelled" or origin != "expert":
                    raise AlsegError("nothing earlier to restore (no expert mask is stored)", id)
                current = c.execute("SELECT sha256 FROM masks WHERE id = ?", (id,)).fetchone()[0]
                stack = self._stack(c, id, "owner") or [current]
            else:
                role, who = "second", annotator
                stack = self._stack(c, id, "second", who)
                if not stack:
                    raise AlsegError(f"nothing earlier to restore ({who} has no reading of this image; "
                                     f"its masks are {owner}'s)", id)
                current = stack[-1]
            base = dict(id=id, round=round, action="undo", previous_sha256=current, source="undo", at=now,
                        annotator=who, role=role)
            if len(stack) >= 2:
                target = stack[-2]
                blob = self._blob(c, target)
                if blob is None:
                    raise AlsegError("nothing earlier to restore (the earlier mask was replaced before alseg "
                                     "kept every version)", id)
                restored_version = self._last_version_with(c, id, role, who, target)
                restored = mask_from_png(blob)
                current_blob = self._blob(c, current)
                changed = pixels_changed(restored, mask_from_png(current_blob)) if current_blob is not None else None
                self._annotate(c, sha256=target, changed_previous=changed, **base)
                if role == "owner":
                    self._set_current(c, id, round, blob, restored.shape, target, "undo", now, owner)
                version = self._current_of(c, id, role, who)["version"]
                return {"id": id, "outcome": "restored", "version": version, "restored_version": restored_version,
                        "round": round, "state": "labelled"}
            if role == "second":
                self._annotate(c, sha256=None, **base)
                return {"id": id, "outcome": "withdrawn", "version": None, "restored_version": None,
                        "round": round, "state": state}
            status = c.execute("SELECT status FROM rounds WHERE round = ?", (round,)).fetchone()
            if status is None or status[0] not in ("awaiting", "labelled"):
                raise AlsegError("nothing earlier to restore (this is the only version, and its round is closed)", id)
            # an accidental accept on an image of the open batch: back to the queue, owned by nobody
            self._annotate(c, sha256=None, **base)
            c.execute("DELETE FROM masks WHERE id = ?", (id,))
            c.execute("UPDATE samples SET state = 'queued', origin = 'none' WHERE id = ?", (id,))
            c.execute("UPDATE rounds SET status = 'awaiting' WHERE round = ? AND status = 'labelled'", (round,))
            return {"id": id, "outcome": "requeued", "version": None, "restored_version": None, "round": round,
                    "state": "queued"}

    # --- versions: helpers inside a transaction ---------------------------------------------------
    def _annotate(self, c, **fields) -> None:
        keys = [k for k in ANNOTATION_KEYS if k in fields]
        c.execute(f"INSERT INTO annotations ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                  [fields[k] for k in keys])

    def _set_current(self, c, id, round, png, shape, sha, source, now, owner) -> None:
        h, w = shape
        c.execute("INSERT OR REPLACE INTO masks (id, round, png, width, height, sha256, source, received, annotator) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (id, round, png, w, h, sha, source, now, owner))

    def _owner(self, c, id: str) -> str | None:
        """Who owns ``id``'s mask: the annotator of its current mask (``local`` for one stored before owners)."""
        if "annotator" in getattr(self, "_mask_columns", {"annotator"}):
            row = c.execute("SELECT annotator FROM masks WHERE id = ?", (id,)).fetchone()
        else:
            row = c.execute("SELECT NULL FROM masks WHERE id = ?", (id,)).fetchone()
        return None if row is None else (row[0] or DEFAULT_ANNOTATOR)

    def _chain(self, c, id: str, role: str, annotator: str | None = None) -> list[tuple]:
        """The (rowid, action, sha256, at, annotator) events of one chain: the owner's versions of ``id``
        (whoever made them), or ``annotator``'s second readings."""
        q = "SELECT rowid, action, sha256, at, annotator FROM annotations WHERE id = ? AND action IN ('stored', " \
            "'replaced', 'undo') AND "
        if "role" not in getattr(self, "_annotation_columns", {"role"}):  # an old database, read-only
            q = q.replace(", annotator FROM", ", NULL FROM")
            return [] if role == "second" else c.execute(q + "1 ORDER BY rowid", (id,)).fetchall()
        if role == "second":
            return c.execute(q + "role = 'second' AND annotator = ? ORDER BY rowid", (id, annotator)).fetchall()
        return c.execute(q + "COALESCE(role, 'owner') = 'owner' ORDER BY rowid", (id,)).fetchall()

    def _stack(self, c, id: str, role: str, annotator: str | None = None) -> list[str]:
        """The chain's versions an undo can go back through, current last (an undo pops one)."""
        stack: list[str] = []
        for _, action, sha, _, _ in self._chain(c, id, role, annotator):
            if action != "undo":
                stack.append(sha)
                continue
            if stack:
                stack.pop()
            if sha is None:
                stack.clear()
            elif not stack or stack[-1] != sha:
                stack.append(sha)
        return stack

    def _version_numbers(self, c, id: str) -> dict[int, int]:
        """rowid -> version number (1, 2, ... over all of ``id``'s versions, whoever made them)."""
        rows = c.execute("SELECT rowid FROM annotations WHERE id = ? AND sha256 IS NOT NULL AND action IN "
                         "('stored', 'replaced', 'undo') ORDER BY rowid", (id,)).fetchall()
        return {r[0]: k + 1 for k, r in enumerate(rows)}

    def _current_of(self, c, id: str, role: str, annotator: str | None = None) -> dict | None:
        """The chain's current version: ``{version, sha256, at, annotator}``, or None (none, or undone)."""
        chain = self._chain(c, id, role, annotator)
        if not chain or chain[-1][2] is None:
            return None
        rowid, _, sha, at, who = chain[-1]
        return {"version": self._version_numbers(c, id)[rowid], "sha256": sha, "at": at,
                "annotator": who or DEFAULT_ANNOTATOR}

    def _last_version_with(self, c, id: str, role: str, annotator: str | None, sha: str) -> int | None:
        numbers = self._version_numbers(c, id)
        chain = self._chain(c, id, role, annotator)[:-1]
        return next((numbers[r[0]] for r in reversed(chain) if r[2] == sha), None)

    def _blob(self, c, sha: str) -> bytes | None:
        if getattr(self, "_has_blobs", True):
            row = c.execute("SELECT png FROM mask_blobs WHERE sha256 = ?", (sha,)).fetchone()
            if row is not None:
                return row[0]
        row = c.execute("SELECT png FROM masks WHERE sha256 = ? LIMIT 1", (sha,)).fetchone()
        return None if row is None else row[0]

    # --- versions: reading ------------------------------------------------------------------------
    def owner(self, id: str) -> str | None:
        """The annotator whose masks of ``id`` train (None: no expert mask is stored)."""
        return self._owner(self.conn, id)

    def current_version(self, id: str, annotator: str | None = None) -> dict | None:
        """The current version that ``annotator``'s next mask of ``id`` would follow: the owner's when
        ``annotator`` owns the image (or is None, or nobody owns it), else their own latest second reading.
        ``{version, sha256, at, annotator, role}`` or None."""
        owner = self._owner(self.conn, id)
        if owner is None:
            return None
        role = "owner" if annotator is None or annotator == owner else "second"
        current = self._current_of(self.conn, id, role, annotator)
        if current is None and role == "owner":  # a mask stored before schema 4 kept versions
            row = self.conn.execute("SELECT sha256, received FROM masks WHERE id = ?", (id,)).fetchone()
            current = {"version": None, "sha256": row[0], "at": row[1], "annotator": owner}
        return None if current is None else {**current, "role": role}

    def history(self, id: str) -> list[dict]:
        """Every version of ``id``'s mask, oldest first: version, round, annotator, role, action, source, at,
        seconds, the effort figures, sha256, and ``current`` (the owner's version that trains, or a second
        annotator's latest reading)."""
        numbers = self._version_numbers(self.conn, id)
        current = set()
        chains = [("owner", None)] + [("second", a) for a in self._second_annotators(id)]
        has_mask = self.conn.execute("SELECT 1 FROM masks WHERE id = ?", (id,)).fetchone() is not None
        for role, who in chains:
            chain = self._chain(self.conn, id, role, who)
            if chain and chain[-1][2] is not None and (role == "second" or has_mask):
                current.add(chain[-1][0])
        out = []
        q = f"SELECT rowid, {self._annotation_select()} FROM annotations WHERE id = ? ORDER BY rowid"
        for rowid, *values in self.conn.execute(q, (id,)):
            if rowid not in numbers:
                continue
            row = dict(zip(ANNOTATION_KEYS, values))
            row.pop("id")
            row.update(version=numbers[rowid], current=rowid in current, role=row["role"] or "owner",
                       annotator=row["annotator"] or DEFAULT_ANNOTATOR)
            out.append(row)
        return out

    def _second_annotators(self, id: str) -> list[str]:
        if "role" not in getattr(self, "_annotation_columns", {"role"}):
            return []
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT annotator FROM annotations WHERE id = ? AND role = 'second' ORDER BY rowid", (id,))]

    def mask_version(self, id: str, version: int) -> np.ndarray | None:
        """Version ``version`` of ``id``'s mask, or None (no such version, or made before versions were kept)."""
        rowid = next((r for r, n in self._version_numbers(self.conn, id).items() if n == version), None)
        if rowid is None:
            return None
        sha = self.conn.execute("SELECT sha256 FROM annotations WHERE rowid = ?", (rowid,)).fetchone()[0]
        blob = self._blob(self.conn, sha)
        return None if blob is None else mask_from_png(blob)

    def agreement(self) -> dict:
        """How far second readings agree with the owners' masks: per image (with an owner's mask and a
        second reading) the Dice between the owner's current mask and the latest second reading, and the
        mean. ``{"images": [{id, round, owner, owner_version, second_annotator, second_version, dice}],
        "mean_dice", "count"}``."""
        rows = []
        for (id,) in self.conn.execute("SELECT DISTINCT id FROM annotations WHERE role = 'second' ORDER BY id") \
                if "role" in getattr(self, "_annotation_columns", {"role"}) else []:
            owner = self._current_of(self.conn, id, "owner")
            mask_row = self.conn.execute("SELECT png, round FROM masks WHERE id = ?", (id,)).fetchone()
            readings = [r for r in (self._current_of(self.conn, id, "second", a) for a in self._second_annotators(id))
                        if r is not None]
            if mask_row is None or not readings:
                continue
            latest = max(readings, key=lambda r: r["version"])
            blob = self._blob(self.conn, latest["sha256"])
            if blob is None:
                continue
            rows.append({"id": id, "round": mask_row[1], "owner": self._owner(self.conn, id),
                         "owner_version": owner["version"] if owner else None,
                         "second_annotator": latest["annotator"], "second_version": latest["version"],
                         "dice": mask_dice(mask_from_png(mask_row[0]), mask_from_png(blob))})
        dice = [r["dice"] for r in rows]
        return {"images": rows, "mean_dice": float(np.mean(dice)) if dice else None, "count": len(rows)}

    def store_masks(self, masks: Mapping[str, np.ndarray], *, source: str) -> None:
        """Many masks at once (the simulated annotator's answer), each in its own transaction."""
        from alseg.faults import point

        for id, mask in masks.items():
            self.store_mask(id, mask, source=source)
            point("mask-stored")

    def record_expert_time(self, id: str, seconds: float, action: str = "skip", *,
                           annotator: str = DEFAULT_ANNOTATOR, active_seconds: float | None = None) -> None:
        """Time the expert spent on ``id`` without storing a mask (a skip, or viewing)."""
        row = self.conn.execute("SELECT round FROM samples WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise AlsegError("unknown id", id)
        self._annotate(self.conn, id=id, round=row[0], action=action, source="page", seconds=seconds, at=time.time(),
                       annotator=annotator, active_seconds=active_seconds)

    def mask(self, id: str) -> np.ndarray | None:
        """The current mask of ``id`` (the one that trains), or None."""
        row = self.conn.execute("SELECT png FROM masks WHERE id = ?", (id,)).fetchone()
        return None if row is None else mask_from_png(row[0])

    def mask_ids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT id FROM masks ORDER BY rowid")]

    def annotations(self, id: str | None = None) -> list[dict]:
        q = f"SELECT {self._annotation_select()} FROM annotations" + (" WHERE id = ?" if id else "") + " ORDER BY rowid"
        return [dict(zip(ANNOTATION_KEYS, r)) for r in self.conn.execute(q, (id,) if id else ())]

    def expert_seconds(self) -> dict[int, float]:
        """The expert's recorded seconds per round (page time; files ingested carry none)."""
        return {r: s for r, s in self.conn.execute(
            "SELECT round, SUM(seconds) FROM annotations WHERE seconds IS NOT NULL GROUP BY round") if r is not None}

    def expert_active_seconds(self) -> dict[int, float]:
        """The seconds the page measured the expert actively working, per round (none for an old database)."""
        if "active_seconds" not in getattr(self, "_annotation_columns", {"active_seconds"}):
            return {}
        return {r: s for r, s in self.conn.execute(
            "SELECT round, SUM(active_seconds) FROM annotations WHERE active_seconds IS NOT NULL GROUP BY round")
            if r is not None}

    # --- the expert's effort ----------------------------------------------------------------------
    def effort_events(self) -> list[dict]:
        """One row per annotation event, oldest first: round, id, reason (why the image was selected;
        ``initial`` for the lab's own masks), annotator, role, action, source, version (None for a skip,
        a view, an unchanged mask or an undo back to the queue), seconds, the effort figures, at."""
        reasons = {(r, i): reason for r, i, reason in self.conn.execute(
            "SELECT round, id, reason FROM selections WHERE kind = 'expert'")}
        counters: dict[str, int] = {}
        out = []
        for values in self.conn.execute(f"SELECT {self._annotation_select()} FROM annotations ORDER BY rowid"):
            row = dict(zip(ANNOTATION_KEYS, values))
            version = None
            if row["sha256"] is not None and row["action"] in VERSION_ACTIONS:
                version = counters[row["id"]] = counters.get(row["id"], 0) + 1
            out.append({"round": row["round"], "id": row["id"], "reason": reasons.get((row["round"], row["id"]), "initial"),
                        "annotator": row["annotator"] or DEFAULT_ANNOTATOR, "role": row["role"] or (
                            "owner" if version else None),
                        "action": row["action"], "source": row["source"], "version": version,
                        "seconds": row["seconds"], **{k: row[k] for k in EFFORT_KEYS},
                        "changed_previous": row["changed_previous"], "changed_prediction": row["changed_prediction"],
                        "accepted": None if row["accepted"] is None else bool(row["accepted"]), "at": row["at"]})
        return out

    def effort_by_round(self) -> list[dict]:
        """The expert's effort per round and selection reason (:func:`summarise_effort` of the events)."""
        events = self.effort_events()
        groups: dict[tuple, list[dict]] = {}
        for e in events:
            groups.setdefault((e["round"] if e["round"] is not None else -1, e["reason"] or ""), []).append(e)
        return [{"round": None if r == -1 else r, "reason": reason, **summarise_effort(rows)}
                for (r, reason), rows in sorted(groups.items())]

    def effort_totals(self) -> dict:
        return summarise_effort(self.effort_events())

    def finish_round(self, round: int, *, expert_labelled: int, pseudo_labelled: int, pool: int,
                     test_dice: float | None, val_dice: float | None, seconds: float, timings: dict,
                     latest_checkpoint: str, facts: Mapping[str, Any] | None = None) -> None:
        """Mark a round done, with the pointer to its model and its ``facts``, in one transaction."""
        with self.transaction() as c:
            for name, value in (facts or {}).items():
                self.set_round_fact(round, name, value, c)
            shortfalls = c.execute("SELECT shortfalls FROM rounds WHERE round = ?", (round,)).fetchone()
            c.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, 'done', ?, ?, ?, ?, ?, ?, ?, ?)",
                (round, expert_labelled, pseudo_labelled, pool, test_dice, val_dice, seconds, json.dumps(timings),
                 shortfalls[0] if shortfalls and shortfalls[0] else "[]"))
            self._set("latest_checkpoint", latest_checkpoint, c)

    def adopt_round(self, donor: "RunStore", round: int, latest_checkpoint: str) -> None:
        """Record ``donor``'s finished ``round`` (its epochs, evaluations and round row) as this run's, in one
        transaction. The caller has copied the round's checkpoints and checked that the round cannot differ."""
        row = donor.conn.execute("SELECT * FROM rounds WHERE round = ? AND status = 'done'", (round,)).fetchone()
        if row is None:
            raise AlsegError(f"round {round} is not finished there", donor.run_dir)
        epochs = donor.conn.execute("SELECT * FROM epochs WHERE round = ?", (round,)).fetchall()
        evaluations = donor.conn.execute("SELECT * FROM evaluations WHERE round = ?", (round,)).fetchall()
        facts = donor.round_facts().get(round, {})
        with self.transaction() as c:
            for name, value in facts.items():
                self.set_round_fact(round, name, value, c)
            c.execute("DELETE FROM epochs WHERE round = ?", (round,))  # an interrupted attempt of its own
            c.executemany("INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", epochs)
            c.executemany("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?)", evaluations)
            c.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            self._set("latest_checkpoint", latest_checkpoint, c)
            self._set(f"round_{round}_from", str(donor.run_dir), c)

    def adopted_from(self, round: int) -> str | None:
        """The run whose ``round`` this run adopted (:meth:`adopt_round`), or None if it trained it itself."""
        return self._get(f"round_{round}_from")

    def open_initial_round(self, expert: list[str], reasons: dict[str, str]) -> None:
        """Round 0 of a project that starts without masks: a random initial batch for the expert."""
        self.record_selection(0, [], None, expert, [], reasons, [], False)

    def round_status(self, round: int) -> str | None:
        row = self.conn.execute("SELECT status FROM rounds WHERE round = ?", (round,)).fetchone()
        return row[0] if row else None

    def round_timings(self, round: int) -> dict:
        row = self.conn.execute("SELECT timings FROM rounds WHERE round = ?", (round,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def rounds(self) -> list[dict]:
        keys = ("round", "status", "expert_labelled", "pseudo_labelled", "pool", "test_dice", "val_dice", "seconds",
                "timings", "shortfalls")
        rows = [dict(zip(keys, r)) for r in self.conn.execute(f"SELECT {', '.join(keys)} FROM rounds ORDER BY round")]
        for r in rows:
            r["timings"] = json.loads(r["timings"]) if r["timings"] else {}
            r["shortfalls"] = json.loads(r["shortfalls"]) if r["shortfalls"] else []
        return rows

    def selection_reasons(self, round: int) -> dict[str, str | None]:
        """Why each id was chosen in ``round`` (missed / low / uncertain / pseudo / random / top score)."""
        return dict(self.conn.execute("SELECT id, reason FROM selections WHERE round = ?", (round,)).fetchall())

    def selected_rounds(self, id: str) -> list[int]:
        """The rounds that chose ``id`` for the expert, oldest first."""
        return [r[0] for r in self.conn.execute(
            "SELECT round FROM selections WHERE id = ? AND kind = 'expert' ORDER BY round", (id,))]

    def selection(self, round: int, kind: str) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT id FROM selections WHERE round = ? AND kind = ? ORDER BY rowid", (round, kind))]

    def scores(self, round: int) -> dict[str, dict[str, float | None]]:
        """Per pool id: its scores by name (variance, entropy, bald; dice with the simulated annotator)."""
        out: dict[str, dict[str, float | None]] = {}
        for i, name, value in self.conn.execute(
                "SELECT id, name, value FROM scores WHERE round = ? ORDER BY rowid", (round,)):
            out.setdefault(i, {"variance": None, "entropy": None, "bald": None, "dice": None})[name] = value
        return out
