"""A run's durable state: its SQLite database, and atomic file writes.

Owns ``RUN_DIR/run.db`` (stdlib sqlite3, WAL journal) and the rule for writing files so that a
crash never leaves a half-written checkpoint or config: write to a temporary file in the same
folder, fsync, then rename over the target (with the umask's normal file mode).

Tables:

* ``meta``: a few JSON values, read and written only through the typed methods below (config,
  split, data description, normaliser, kind, annotator, latest checkpoint, stop reason);
* ``samples``: every split sample, its split, label state (``pool`` / ``queued`` for the
  expert / ``labelled``), origin (``initial`` / ``expert`` / ``pseudo``) and round;
* ``masks``: the expert's current mask of each id (PNG bytes, at the size it arrived), the
  source of truth for training once it is stored; ``annotations``: every mask that arrived,
  replaced or was skipped, with the expert's seconds;
* ``rounds``: one row per round: ``awaiting`` labels once selected, ``labelled`` once every
  queued mask arrived, ``done`` once its model is trained and evaluated;
* ``scores``: (round, id, name, value) rows, so a new score needs no schema change;
* ``selections``: who was chosen in each round, as expert or pseudo, and why;
* ``epochs`` and ``evaluations``: training history and Dice summaries;
* ``round_facts``: (round, name, JSON value) rows of what a round decided or found, for example
  ``model`` (its validation Dice beside the constant masks', :mod:`alseg.active.gate`) and
  ``gate`` (the pseudo-labels it was allowed and why), so a new fact needs no schema change.

Schema 3 added ``round_facts``; a schema-2 database gets it (and version 3) when opened for
writing, and reads as having no facts when opened read-only.

Selection, queueing and the round row are one transaction; so is a mask's arrival with its
label move: a crash can never lose or duplicate a label. An id counts as labelled when its
mask is stored, never at selection. Only this module writes the database. Reading commands
open it read-only (:meth:`RunStore.open_readonly`), so they work on a read-only copy and never
write into a damaged file.
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

SCHEMA_VERSION = 3

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
_FACTS_TABLE = """CREATE TABLE round_facts (
    round INTEGER NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (round, name))"""
_SCHEMA += _FACTS_TABLE + ";\n"
_TABLES = {"meta", "samples", "masks", "annotations", "epochs", "rounds", "scores", "selections", "evaluations",
           "round_facts"}


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
                    c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
            else:
                self._check()
        except sqlite3.DatabaseError as exc:
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
        """Refuse a file that is not a whole run database before anything reads or writes it."""
        check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(check)
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self._has_facts = "round_facts" in tables
        version = self._get("schema_version") if "meta" in tables else None
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise AlsegError(f"run.db has schema {version}, made by a newer alseg (this one reads up to "
                             f"{SCHEMA_VERSION}); upgrade alseg", self.dir.db)
        if _TABLES - tables == {"round_facts"} and version == 2:
            if not self.readonly:  # schema 2 -> 3: one new table, nothing else changed
                with self.transaction() as c:
                    c.execute(_FACTS_TABLE)
                    c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
                self._has_facts = True
            return
        if not _TABLES <= tables:
            if version is not None and version < SCHEMA_VERSION:
                raise AlsegError(f"run.db has schema {version}, made by an older alseg; start a new run",
                                 self.dir.db)
            raise AlsegError("run.db is not a run database (tables missing); nothing was changed", self.dir.db)

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
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

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

    def store_mask(self, id: str, mask: np.ndarray, *, source: str, seconds: float | None = None) -> str:
        """Store the expert's mask of ``id`` (queued, or expert-labelled and being corrected).

        One transaction: the mask, its record in ``annotations``, the label move and, when it was
        the batch's last, the round's move to ``labelled``. Returns ``stored``, ``replaced`` or
        ``unchanged`` (the same mask again changes nothing but the expert's time).
        """
        png = mask_png(mask)
        sha = hashlib.sha256(png).hexdigest()
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT state, origin, round FROM samples WHERE id = ?", (id,)).fetchone()
            if row is None or not (row[0] == "queued" or (row[0] == "labelled" and row[1] == "expert")):
                raise AlsegError("not in an open batch (nothing was stored)", id)
            state, _, round = row
            previous = c.execute("SELECT sha256 FROM masks WHERE id = ?", (id,)).fetchone()
            previous = previous[0] if previous else None
            if previous == sha:
                c.execute("INSERT INTO annotations VALUES (?, ?, 'unchanged', ?, ?, ?, ?, ?)",
                          (id, round, sha, previous, source, seconds, now))
                return "unchanged"
            h, w = mask.shape
            c.execute("INSERT OR REPLACE INTO masks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (id, round, png, w, h, sha, source, now))
            action = "replaced" if previous else "stored"
            c.execute("INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (id, round, action, sha, previous, source, seconds, now))
            c.execute("UPDATE samples SET state = 'labelled', origin = 'expert' WHERE id = ?", (id,))
            left = c.execute("SELECT COUNT(*) FROM samples WHERE state = 'queued' AND round = ?", (round,)).fetchone()[0]
            if state == "queued" and left == 0:
                c.execute("UPDATE rounds SET status = 'labelled' WHERE round = ? AND status = 'awaiting'", (round,))
            return action

    def store_masks(self, masks: Mapping[str, np.ndarray], *, source: str) -> None:
        """Many masks at once (the simulated annotator's answer), each in its own transaction."""
        from alseg.faults import point

        for id, mask in masks.items():
            self.store_mask(id, mask, source=source)
            point("mask-stored")

    def record_expert_time(self, id: str, seconds: float, action: str = "skip") -> None:
        row = self.conn.execute("SELECT round FROM samples WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise AlsegError("unknown id", id)
        self.conn.execute("INSERT INTO annotations VALUES (?, ?, ?, NULL, NULL, 'page', ?, ?)",
                          (id, row[0], action, seconds, time.time()))

    def mask(self, id: str) -> np.ndarray | None:
        row = self.conn.execute("SELECT png FROM masks WHERE id = ?", (id,)).fetchone()
        return None if row is None else mask_from_png(row[0])

    def mask_ids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT id FROM masks ORDER BY rowid")]

    def annotations(self, id: str | None = None) -> list[dict]:
        keys = ("id", "round", "action", "sha256", "previous_sha256", "source", "seconds", "at")
        q = f"SELECT {', '.join(keys)} FROM annotations" + (" WHERE id = ?" if id else "") + " ORDER BY rowid"
        return [dict(zip(keys, r)) for r in self.conn.execute(q, (id,) if id else ())]

    def expert_seconds(self) -> dict[int, float]:
        """The expert's recorded seconds per round (page time; files ingested carry none)."""
        return {r: s for r, s in self.conn.execute(
            "SELECT round, SUM(seconds) FROM annotations WHERE seconds IS NOT NULL GROUP BY round") if r is not None}

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
