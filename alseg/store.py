"""A run's durable state: its SQLite database and its atomically written files.

Owns ``RUN_DIR/run.db`` (stdlib sqlite3, WAL journal) and the rules for writing files so
that a crash never leaves a half-written checkpoint or config: write to a temporary file in
the same folder, fsync, then rename over the target.

Tables: ``meta`` (JSON values by key: config, split, data description, pointers such as the
latest checkpoint), ``samples`` (every split sample, its split and label state), ``epochs``
(per-epoch training history by phase and round), ``evaluations`` (Dice summaries),
``rounds`` (one row per active-learning round: ``selected`` once its labels moved, ``done``
once its model is trained and evaluated), ``scores`` (each pool image's uncertainty scores
per round) and ``selections`` (who was chosen in each round, as expert or pseudo, and why).

Label moves and the round's selection are written in one transaction, so a crash can never
lose or duplicate a label. Only this module writes the database.
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from alseg.errors import AlsegError

DB_NAME = "run.db"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY, split TEXT NOT NULL, state TEXT NOT NULL,
    origin TEXT NOT NULL, round INTEGER);
CREATE TABLE IF NOT EXISTS epochs (
    phase TEXT NOT NULL, round INTEGER NOT NULL, epoch INTEGER NOT NULL,
    train_loss REAL, train_dice REAL, val_dice REAL, lr REAL, seconds REAL,
    PRIMARY KEY (phase, round, epoch));
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, status TEXT NOT NULL, expert_labelled INTEGER, pseudo_labelled INTEGER,
    pool INTEGER, test_dice REAL, val_dice REAL, seconds REAL, timings TEXT, shortfalls TEXT);
CREATE TABLE IF NOT EXISTS scores (
    round INTEGER NOT NULL, id TEXT NOT NULL, variance REAL, entropy REAL, bald REAL, dice REAL,
    PRIMARY KEY (round, id));
CREATE TABLE IF NOT EXISTS selections (
    round INTEGER NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT,
    PRIMARY KEY (round, id));
CREATE TABLE IF NOT EXISTS evaluations (
    round INTEGER NOT NULL, split TEXT NOT NULL, images INTEGER, mean_dice REAL, median_dice REAL,
    pooled_dice REAL, volume_dice_mean REAL, created REAL, PRIMARY KEY (round, split));
"""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
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


class RunStore:
    """The SQLite database of one run directory."""

    def __init__(self, run_dir: str | Path, create: bool = False):
        self.run_dir = Path(run_dir)
        db = self.run_dir / DB_NAME
        if not create and not db.is_file():
            raise AlsegError("not a run directory (no run.db)", self.run_dir)
        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:  # exclusive: two processes can never share one new run directory
                db.open("x").close()
            except FileExistsError:
                raise AlsegError("run directory is already in use (it has a run.db)", self.run_dir) from None
        self.conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        if create and self.get("schema_version") is None:
            self.set("schema_version", SCHEMA_VERSION)

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
        return self.run_dir / "checkpoints"

    # --- meta -------------------------------------------------------------------------------
    def set(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # --- samples ------------------------------------------------------------------------------
    def add_samples(self, rows: Iterable[tuple[str, str, str, str, int | None]]) -> None:
        """Rows of (id, split, state, origin, round)."""
        with self.transaction() as c:
            c.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?)", list(rows))

    def sample_ids(self, split: str | None = None, state: str | None = None) -> list[str]:
        q, args = "SELECT id FROM samples WHERE 1=1", []
        if split:
            q, args = q + " AND split = ?", args + [split]
        if state:
            q, args = q + " AND state = ?", args + [state]
        return [r[0] for r in self.conn.execute(q + " ORDER BY rowid", args)]

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

    # --- active-learning rounds ----------------------------------------------------------------
    def record_selection(self, round: int, pool_ids, scores: dict, expert: list[str], pseudo: list[str],
                         reasons: dict[str, str], shortfalls: list[str], keep_pseudo: bool) -> None:
        """Atomically: the pool's scores, the selection, the label moves and a ``selected`` round row."""
        with self.transaction() as c:
            dice = scores.get("dice")
            c.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                          [(round, i, float(scores["variance"][k]), float(scores["entropy"][k]), float(scores["bald"][k]),
                            None if dice is None else float(dice[k])) for k, i in enumerate(pool_ids)])
            c.executemany("INSERT OR REPLACE INTO selections VALUES (?, ?, ?, ?)",
                          [(round, i, "expert", reasons.get(i)) for i in expert]
                          + [(round, i, "pseudo", reasons.get(i)) for i in pseudo])
            c.executemany("UPDATE samples SET state = 'labelled', origin = 'expert', round = ? WHERE id = ? AND state = 'pool'",
                          [(round, i) for i in expert])
            if keep_pseudo:
                c.executemany("UPDATE samples SET state = 'labelled', origin = 'pseudo', round = ? "
                              "WHERE id = ? AND state = 'pool'", [(round, i) for i in pseudo])
            c.execute("INSERT OR REPLACE INTO rounds (round, status, shortfalls) VALUES (?, 'selected', ?)",
                      (round, json.dumps(shortfalls)))

    def finish_round(self, round: int, *, expert_labelled: int, pseudo_labelled: int, pool: int,
                     test_dice: float | None, val_dice: float | None, seconds: float, timings: dict) -> None:
        shortfalls = self.conn.execute("SELECT shortfalls FROM rounds WHERE round = ?", (round,)).fetchone()
        self.conn.execute(
            "INSERT OR REPLACE INTO rounds VALUES (?, 'done', ?, ?, ?, ?, ?, ?, ?, ?)",
            (round, expert_labelled, pseudo_labelled, pool, test_dice, val_dice, seconds, json.dumps(timings),
             shortfalls[0] if shortfalls else "[]"))

    def round_status(self, round: int) -> str | None:
        row = self.conn.execute("SELECT status FROM rounds WHERE round = ?", (round,)).fetchone()
        return row[0] if row else None

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

    def scores(self, round: int) -> dict[str, dict[str, float]]:
        """Per pool id: variance, entropy, bald and (simulated oracle only) the Dice of the MC-mean mask."""
        rows = self.conn.execute("SELECT id, variance, entropy, bald, dice FROM scores WHERE round = ? ORDER BY rowid",
                                 (round,))
        return {r[0]: {"variance": r[1], "entropy": r[2], "bald": r[3], "dice": r[4]} for r in rows}

    def labelled_ids(self, origins: tuple[str, ...] | None = None) -> list[str]:
        """Labelled training ids, optionally only those of the given origins (initial/expert/pseudo)."""
        q, args = "SELECT id FROM samples WHERE split = 'train' AND state = 'labelled'", []
        if origins:
            q += f" AND origin IN ({', '.join('?' * len(origins))})"
            args += list(origins)
        return [r[0] for r in self.conn.execute(q + " ORDER BY rowid", args)]
