"""The expert's effort and the annotators' agreement, as tables a lab can read.

What each annotation cost (wall seconds, the seconds the page saw the expert actively drawing,
strokes, clicks) and what it changed (pixels against the previous version and against the
model's predicted mask; ``accepted`` when the prediction was taken as it was), per event, per
round and per selection reason, so a lab can see whether the head start saves time and which
kind of image costs most. The figures are recorded and summarised by the store
(:meth:`alseg.store.RunStore.store_version`, ``effort_by_round``, ``effort_totals``, ``agreement``);
this module writes the per-event CSV.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from alseg.store import RunStore, atomic_write_text

EVENT_COLUMNS = ("round", "id", "reason", "annotator", "role", "action", "source", "version", "seconds",
                 "active_seconds", "strokes", "clicks", "changed_previous", "changed_prediction", "accepted", "at")


def effort_rows(store: RunStore) -> list[dict]:
    """One row per annotation event, oldest first (the columns of :data:`EVENT_COLUMNS`)."""
    return [{k: e[k] for k in EVENT_COLUMNS} for e in store.effort_events()]


def write_effort_csv(store: RunStore, path: str | Path) -> int:
    """Write :func:`effort_rows` to ``path`` as CSV (atomically); returns the number of rows."""
    rows = effort_rows(store)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EVENT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else (int(v) if isinstance(v, bool) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
    return len(rows)
