"""Choosing a preset's dropout, learning rate, batch size and training precision on validation Dice only (never the test split).

For every (dropout, lr, batch size, precision) point of the grid and every seed of `--seeds` (seeds other than those the
preset was designed on), trains the preset's round-0 model (`alseg train` without `--full`: the
initial labelled set, the preset's epochs, its validation split) and reads every epoch's
validation Dice from the run's store. `--precisions` defaults to the preset's own (auto: fp32
on a CPU) and `--batch-sizes` to the preset's own; `--batch-sizes 4 8 16` compares batch sizes at the
preset's epochs (a larger batch takes fewer steps an epoch); `--precisions fp32 bf16` asks whether bf16 training, faster on CPUs with bf16
instructions, reaches the same validation Dice. Per point it reports, as means over seeds:

* ``best_val_dice``: the best validation Dice within the preset's epochs (what a run keeps, since
  the best checkpoint by validation Dice is kept);
* ``last5_mean`` and ``last5_std``: mean and spread of the last five epochs' validation Dice (a
  large spread is the oscillation that made dropout 0.5 with lr 1e-3 unusable at width 16).

The suggested point has the highest mean best validation Dice. Children run `--jobs` at a time,
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

from train_runs import train_all, train_seconds, val_dice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[None],
                    help="Training batch sizes to compare (default: the preset's own).")
    ap.add_argument("--precisions", nargs="+", default=["auto"],
                    help="Training precisions to compare (auto, fp32, bf16): bf16 trains faster on CPUs with bf16 "
                         "instructions; whether it reaches the same validation Dice is what this measures.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3])
    ap.add_argument("--epochs", type=int, default=None, help="Override the preset's epochs (smoke tests).")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-grid"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args()

    def folder(seed: int, dropout: float, lr: float, batch: int | None, precision: str) -> Path:
        # the preset's batch and precision leave the name as it was, so earlier grids' runs are reused
        tail = ("" if batch is None else f"-b{batch}") + ("" if precision == "auto" else f"-{precision}")
        return args.out / f"{args.preset}-d{dropout:g}-lr{lr:g}-s{seed}{tail}"

    def options(seed: int, dropout: float, lr: float, batch: int | None, precision: str) -> list[str]:
        return (["--preset", args.preset, "--data", str(args.data), "--dropout", str(dropout), "--lr", str(lr),
                 "--precision", precision, "--seed", str(seed)]
                + (["--batch-size", str(batch)] if batch is not None else [])
                + (["--epochs", str(args.epochs)] if args.epochs else []))

    grid = list(itertools.product(args.dropouts, args.lrs, args.batch_sizes, args.precisions))
    train_all([(folder(seed, *point), options(seed, *point))
               for seed in args.seeds for point in grid],  # a seed's grid at a time
              args.jobs, "preset_grid")
    pairs = []
    for dropout, lr, batch, precision in grid:
        curves = {s: [-1.0 if v is None else v for v in val_dice(folder(s, dropout, lr, batch, precision))]
                  for s in args.seeds}
        best = [max(v) for v in curves.values()]
        last5 = [v[-5:] for v in curves.values()]
        seconds = [train_seconds(folder(s, dropout, lr, batch, precision)) for s in args.seeds]
        pairs.append({"dropout": dropout, "lr": lr, "batch_size": batch, "precision": precision,
                      "best_val_dice": round(float(np.mean(best)), 4),
                      "train_s_per_seed": [round(t, 1) for t in seconds],
                      "best_val_dice_per_seed": [round(b, 4) for b in best],
                      "last5_mean": round(float(np.mean([np.mean(v) for v in last5])), 4),
                      "last5_std": round(float(np.mean([np.std(v) for v in last5])), 4),
                      "val_dice_per_epoch": curves})
    top = max(pairs, key=lambda p: p["best_val_dice"])
    result = {"preset": args.preset, "data": str(args.data), "seeds": args.seeds,
              "suggested": {"dropout": top["dropout"], "lr": top["lr"], "batch_size": top["batch_size"],
                            "precision": top["precision"]}, "pairs": pairs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("| dropout | lr | batch | precision | best validation Dice (per seed) | last 5 epochs: mean | "
          "last 5 epochs: std | training s (mean over seeds) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in pairs:
        mark = " (suggested)" if p is top else ""
        per_seed = ", ".join(f"{b:.3f}" for b in p["best_val_dice_per_seed"])
        batch = "preset" if p["batch_size"] is None else p["batch_size"]
        print(f"| {p['dropout']:g} | {p['lr']:g} | {batch} | {p['precision']} | {p['best_val_dice']:.3f}{mark} ({per_seed}) | "
              f"{p['last5_mean']:.3f} | {p['last5_std']:.3f} | {np.mean(p['train_s_per_seed']):.0f} |")


if __name__ == "__main__":
    main()
