"""Choosing a preset's initial epochs on validation Dice only (never the test split).

Trains the preset's round-0 model (its initial labelled set, `alseg train` without `--full`) for
`--epochs` epochs on each of `--seeds` (seeds other than those the preset was designed on; with
`--full`, the full-supervision reference instead: the whole train split, `alseg train --full`), reads
every epoch's validation Dice from the run's store, and reports per epoch count E the mean over
seeds of the best validation Dice within the first E epochs (what a run of E epochs keeps, since
the best checkpoint by validation Dice is kept). The suggested E is the smallest whose mean is
within `--tolerance` of the best mean over all epochs. Usage:

    .venv/bin/python benchmarks/preset_epochs.py --preset quick-lgg --data ../shared/data/lgg \
        --epochs 50 --seeds 3 4 5 --jobs 2 --out /tmp/alseg-epochs [--lr 1e-3] [--full] \
        [--json benchmarks/results/cpu-quick-lgg-epochs.json]

Children run `--jobs` at a time with one thread each; finished runs in `--out` are reused.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from machine import emit
from train_runs import train_all, val_dice


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
    ap.add_argument("--lr", type=float, default=None, help="Override the preset's learning rate.")
    ap.add_argument("--full", action="store_true", help="The full-supervision reference (whole train split).")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-epochs"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args()
    kind = "-full" if args.full else ""
    folders = {seed: args.out / f"{args.preset}{kind}-s{seed}" for seed in args.seeds}
    train_all([(out, ["--preset", args.preset, "--data", str(args.data), "--epochs", str(args.epochs),
                      "--seed", str(seed)] + (["--lr", str(args.lr)] if args.lr else [])
                + (["--full"] if args.full else []))
               for seed, out in folders.items()], args.jobs, "preset_epochs")
    per_seed = {seed: val_dice(out) for seed, out in folders.items()}
    curves = [best_so_far(val) for val in per_seed.values()]
    curves = np.array(curves)
    result = {"preset": args.preset, "data": str(args.data), "full": args.full, "epochs": args.epochs, "lr": args.lr,
              "seeds": args.seeds,
              "tolerance": args.tolerance, "suggested_epochs": suggest(curves, args.tolerance),
              "mean_best_val_dice_by_epochs": {e: round(float(curves[:, e - 1].mean()), 4)
                                               for e in (5, 10, 15, 20, 25, 30, 40, 50) if e <= args.epochs},
              "val_dice_per_epoch": per_seed}
    emit(result, args.json)


if __name__ == "__main__":
    main()
