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
from pathlib import Path

import numpy as np

from train_runs import train_all, val_dice


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

    def folder(seed: int, dropout: float, lr: float) -> Path:
        return args.out / f"{args.preset}-d{dropout:g}-lr{lr:g}-s{seed}"

    train_all([(folder(seed, dropout, lr),
                ["--preset", args.preset, "--data", str(args.data), "--dropout", str(dropout), "--lr", str(lr),
                 "--seed", str(seed)] + (["--epochs", str(args.epochs)] if args.epochs else []))
               for seed, dropout, lr in itertools.product(args.seeds, args.dropouts, args.lrs)],  # a seed's grid at a time
              args.jobs, "preset_grid")
    pairs = []
    for dropout, lr in itertools.product(args.dropouts, args.lrs):
        curves = {s: [-1.0 if v is None else v for v in val_dice(folder(s, dropout, lr))] for s in args.seeds}
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
