"""Launching `alseg train` children for the preset benchmarks and reading their validation curves.

Owns what `preset_grid.py` and `preset_epochs.py` share: running a list of `alseg train` runs
`jobs` at a time, each child with `OMP_NUM_THREADS=1` (one process per core is faster on small CPUs:
`benchmarks/process_split.py`), reusing runs that finished before, and reading a run's per-epoch
validation Dice and training seconds from its store.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def val_dice(run: Path) -> list[float | None]:
    """Every epoch's validation Dice of a finished run, in epoch order (None where not measured)."""
    with sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True) as db:
        return [v for (v,) in db.execute("SELECT val_dice FROM epochs ORDER BY epoch")]


def train_seconds(run: Path) -> float:
    """A finished run's training time: the sum of its epochs' seconds (validation included, evaluation not)."""
    with sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True) as db:
        return float(db.execute("SELECT coalesce(sum(seconds), 0) FROM epochs").fetchone()[0])


def finished(run: Path) -> bool:
    """A run is finished once its model was evaluated (the last thing `alseg train` records)."""
    if not (run / "run.db").is_file():
        return False
    with sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM evaluations").fetchone()[0] > 0


def train_all(runs: list[tuple[Path, list[str]]], jobs: int, tag: str) -> None:
    """Train each (run folder, `alseg train` options without `--out`) not finished yet, `jobs` at a time.

    A finished run is reused only if it was made with the same options (recorded beside it as
    ``<run>.options.json``; runs made before that record existed are reused unchecked). An
    unfinished run left by an interrupted call is in the way (its checkpoints would mix with a new
    run's): the script stops and names it. A failed child stops the script with its stderr.
    """
    todo = []
    for run, options in runs:
        made_with = run.with_name(run.name + ".options.json")  # beside the run: `alseg train` wants a new folder
        if finished(run):
            # Folder names carry only the varied settings; a reused run made with other options
            # (another --epochs or --lr into the same --out) would be read as this one.
            earlier = json.loads(made_with.read_text()) if made_with.is_file() else options
            if earlier != options:
                sys.exit(f"{run}: made with other options ({' '.join(earlier)}); remove it or give another --out")
            continue
        if run.exists():
            sys.exit(f"{run}: an unfinished run is in the way; remove it and run again")
        run.parent.mkdir(parents=True, exist_ok=True)
        made_with.write_text(json.dumps(options) + "\n")
        todo.append((run, [sys.executable, "-m", "alseg", "train", *options, "--out", str(run), "--json"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[Path, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < jobs:
            run, cmd = todo.pop(0)
            print(f"[{tag} {time.strftime('%H:%M:%S')}] {run.name}", file=sys.stderr, flush=True)
            running.append((run, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                  text=True), time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            run, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                for _, other, _ in running:
                    other.kill()
                sys.exit(f"{run.name} failed: {proc.stderr.read().strip()}")
            print(f"[{tag} {time.strftime('%H:%M:%S')}] {run.name}: {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
