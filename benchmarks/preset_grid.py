"""Choosing a preset's dropout and learning rate on validation Dice only (never the test split).

For every (dropout, lr) pair of the grid and every seed of `--seeds` (seeds other than those the
preset was designed on), trains the preset's round-0 model (`alseg train` without `--full`: the
initial labelled set, the preset's epochs, its validation split) and reads every epoch's
validation Dice from the run's store. Per pair it reports, as means over seeds:

* ``best_val_dice``: the best validation Dice within the preset's epochs (what a run keeps, since
  the best checkpoint by validation Dice is kept);
* ``last5_mean`` and ``last5_std``: mean and spread of the last five epochs' validation Dice (a
  large spread is the oscillation that made dropout 0.5 with lr 1e-3 unusable at width 16).

The suggested pair has the highest mean best validation Dice. Children run `--jobs` at a time,
each with `OMP_NUM_THREADS=1` (one process per core is faster on small CPUs:
`benchmarks/process_split.py`); finished runs in `--out` are reused. Usage:

    .venv/bin/python benchmarks/preset_grid.py --preset quick-isic --data ../shared/data/isic \
        --dropouts 0.1 0.3 --lrs 1e-4 3e-4 1e-3 --seeds 3 --jobs 2 --out /tmp/alseg-grid \
        [--json benchmarks/results/cpu-quick-isic-grid.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def read_val(run: Path) -> list[float]:
    with sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True) as db:
        return [-1.0 if v is None else v for (v,) in db.execute("SELECT val_dice FROM epochs ORDER BY epoch")]


def finished(run: Path) -> bool:
    if not (run / "run.db").is_file():
        return False
    with sqlite3.connect(f"file:{run / 'run.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM evaluations").fetchone()[0] > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3])
    ap.add_argument("--epochs", type=int, default=None, help="Override the preset's epochs (smoke tests).")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-grid"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args()
    jobs = []
    for seed, dropout, lr in itertools.product(args.seeds, args.dropouts, args.lrs):  # a seed's grid at a time
        run = args.out / f"{args.preset}-d{dropout:g}-lr{lr:g}-s{seed}"
        if finished(run):
            continue
        if run.exists():
            sys.exit(f"{run}: an unfinished run is in the way; remove it and run again")
        jobs.append((run, [sys.executable, "-m", "alseg", "train", "--preset", args.preset, "--data", str(args.data),
                           "--dropout", str(dropout), "--lr", str(lr), "--seed", str(seed), "--out", str(run),
                           "--json"] + (["--epochs", str(args.epochs)] if args.epochs else [])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[Path, subprocess.Popen, float]] = []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            run, cmd = jobs.pop(0)
            print(f"[preset_grid {time.strftime('%H:%M:%S')}] {run.name}", file=sys.stderr, flush=True)
            running.append((run, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                  text=True), time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            run, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                sys.exit(f"{run.name} failed: {proc.stderr.read().strip()}")
            print(f"[preset_grid {time.strftime('%H:%M:%S')}] {run.name}: {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    pairs = []
    for dropout, lr in itertools.product(args.dropouts, args.lrs):
        curves = {s: read_val(args.out / f"{args.preset}-d{dropout:g}-lr{lr:g}-s{s}") for s in args.seeds}
        best = [max(v) for v in curves.values()]
        last5 = [v[-5:] for v in curves.values()]
        pairs.append({"dropout": dropout, "lr": lr, "best_val_dice": round(float(np.mean(best)), 4),
                      "best_val_dice_per_seed": [round(b, 4) for b in best],
                      "last5_mean": round(float(np.mean([np.mean(v) for v in last5])), 4),
                      "last5_std": round(float(np.mean([np.std(v) for v in last5])), 4),
                      "val_dice_per_epoch": curves})
    top = max(pairs, key=lambda p: p["best_val_dice"])
    result = {"preset": args.preset, "data": str(args.data), "seeds": args.seeds,
              "suggested": {"dropout": top["dropout"], "lr": top["lr"]}, "pairs": pairs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("| dropout | lr | best validation Dice | last 5 epochs: mean | last 5 epochs: std |")
    print("| --- | --- | --- | --- | --- |")
    for p in pairs:
        mark = " (suggested)" if p is top else ""
        print(f"| {p['dropout']:g} | {p['lr']:g} | {p['best_val_dice']:.3f}{mark} | {p['last5_mean']:.3f} | "
              f"{p['last5_std']:.3f} |")


if __name__ == "__main__":
    main()
