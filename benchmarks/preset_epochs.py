"""Choosing a preset's initial epochs on validation Dice only (never the test split).

Trains the preset's round-0 model (its initial labelled set, `alseg train` without `--full`) for
`--epochs` epochs on each of `--seeds` (seeds other than those the preset was designed on), reads
every epoch's validation Dice from the run's store, and reports per epoch count E the mean over
seeds of the best validation Dice within the first E epochs (what a run of E epochs keeps, since
the best checkpoint by validation Dice is kept). The suggested E is the smallest whose mean is
within `--tolerance` of the best mean over all epochs. Usage:

    .venv/bin/python benchmarks/preset_epochs.py --preset quick-lgg --data ../shared/data/lgg \
        --epochs 50 --seeds 3 4 5 --out /tmp/alseg-epochs [--json benchmarks/results/cpu-quick-lgg-epochs.json]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def best_so_far(val: list[float | None]) -> np.ndarray:
    """Best validation Dice within the first E epochs, for E = 1..len(val)."""
    return np.maximum.accumulate(np.array([-1.0 if v is None else v for v in val]))


def suggest(curves: np.ndarray, tolerance: float) -> int:
    """Smallest epoch count whose seed-mean best-so-far Dice is within ``tolerance`` of the final best."""
    mean = curves.mean(0)
    return int(np.flatnonzero(mean >= mean.max() - tolerance)[0]) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-epochs"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args()
    curves, per_seed = [], {}
    for seed in args.seeds:
        out = args.out / f"{args.preset}-s{seed}"
        if not (out / "run.db").is_file():
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "alseg", "train", "--preset", args.preset, "--data", str(args.data),
                   "--epochs", str(args.epochs), "--seed", str(seed), "--out", str(out), "--json"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr)
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        with sqlite3.connect(f"file:{out / 'run.db'}?mode=ro", uri=True) as db:
            val = [v for (v,) in db.execute("SELECT val_dice FROM epochs ORDER BY epoch")]
        per_seed[seed] = val
        curves.append(best_so_far(val))
    curves = np.array(curves)
    result = {"preset": args.preset, "data": str(args.data), "epochs": args.epochs, "seeds": args.seeds,
              "tolerance": args.tolerance, "suggested_epochs": suggest(curves, args.tolerance),
              "mean_best_val_dice_by_epochs": {e: round(float(curves[:, e - 1].mean()), 4)
                                               for e in (5, 10, 15, 20, 25, 30, 40, 50) if e <= args.epochs},
              "val_dice_per_epoch": per_seed}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
