"""Choosing a preset's retraining epochs per round on validation Dice only (never the test split).

For each count K of `--round-epochs`, runs the preset's active learning with `--strategy` (random by
default: no selection effect, only the retraining) on each of `--seeds` (seeds other than those
the preset was designed on) through `alseg compare`, one study folder per K under `--out`. Round 0
does not depend on K: the first K's runs train it and the other K's runs adopt it
(`adopt_initial_round`), so every K starts from the same model per seed. Reads each round's
validation Dice (the best epoch of the round's retraining, the checkpoint a run keeps) from the
runs' stores and reports per K the mean over seeds of the validation Dice averaged over the active
rounds (a validation learning curve's area) and of the last round, with the retraining seconds per
round. The suggested K is the smallest whose mean area is within `--tolerance` of the best. Usage:

    .venv/bin/python benchmarks/round_epochs.py --preset quick-lgg --data ../shared/data/lgg \
        --round-epochs 2 5 10 --seeds 3 4 5 --jobs 2 --out /tmp/alseg-round-epochs \
        [--json benchmarks/results/cpu-quick-lgg-round-epochs.json]

Finished runs in `--out` are reused (compare resumes a study folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def study(out: Path, k: int) -> Path:
    return out / f"round-epochs-{k}"


def compare(args: argparse.Namespace, k: int) -> None:
    """`alseg compare` of the strategy at K epochs per round, in a child (its own threads and lock holds)."""
    cmd = [sys.executable, "-m", "alseg", "compare", "--preset", args.preset, "--data", str(args.data),
           "--strategies", args.strategy, "--seeds", ",".join(map(str, args.seeds)) + ",",
           "--round-epochs", str(k), "--out", str(study(args.out, k)), "--jobs", str(args.jobs), "--json"]
    print(f"[round_epochs] {k} epochs per round", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def adopt_round0(args: argparse.Namespace, k: int, donor_k: int) -> None:
    """Start K's runs and give them round 0 of the first K's runs (same data, model, training, seed)."""
    from alseg.active.loop import adopt_initial_round, start_run
    from alseg.config import build_config

    base = build_config(args.preset, None, {"data": {"path": str(args.data)}, "active": {"round_epochs": k}})
    for seed in args.seeds:
        run = study(args.out, k) / "runs" / f"{args.strategy}-s{seed}"
        if not (run / "run.db").is_file():
            cfg = dataclasses.replace(base, seed=seed, active=dataclasses.replace(base.active, strategy=args.strategy))
            start_run(cfg, run)
        adopt_initial_round(run, study(args.out, donor_k) / "runs" / f"{args.strategy}-s{seed}")


def validation_curve(run: Path) -> list[tuple[float, float]]:
    """(validation Dice, retraining seconds) of each active round of a finished run."""
    from alseg.store import RunStore

    with RunStore.open_readonly(run) as store:
        return [(r["val_dice"], r["timings"].get("train_s", 0.0)) for r in store.rounds()[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--round-epochs", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--strategy", default="random")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-round-epochs"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = ap.parse_args()
    first, *others = args.round_epochs
    compare(args, first)
    for k in others:
        adopt_round0(args, k, first)
        compare(args, k)
    per_k = {}
    for k in args.round_epochs:
        curves = {seed: validation_curve(study(args.out, k) / "runs" / f"{args.strategy}-s{seed}")
                  for seed in args.seeds}
        area = [float(np.mean([v for v, _ in c])) for c in curves.values()]
        last = [c[-1][0] for c in curves.values()]
        per_k[k] = {"mean_val_dice_over_rounds": float(np.mean(area)), "per_seed_mean_over_rounds": area,
                    "last_round_val_dice": float(np.mean(last)), "per_seed_last_round": last,
                    "train_s_per_round": float(np.mean([s for c in curves.values() for _, s in c])),
                    "val_dice_per_round": {str(seed): [v for v, _ in c] for seed, c in curves.items()}}
    best = max(r["mean_val_dice_over_rounds"] for r in per_k.values())
    suggested = min(k for k, r in per_k.items() if r["mean_val_dice_over_rounds"] >= best - args.tolerance)
    result = {"preset": args.preset, "data": str(args.data), "strategy": args.strategy, "seeds": args.seeds,
              "tolerance": args.tolerance, "suggested_round_epochs": suggested,
              "by_round_epochs": {str(k): r for k, r in per_k.items()}}
    print("round epochs | mean val Dice over rounds (per seed) | last round | retraining s/round")
    for k, r in per_k.items():
        print(f"{k:12d} | {r['mean_val_dice_over_rounds']:.3f} ("
              + ", ".join(f"{v:.3f}" for v in r["per_seed_mean_over_rounds"])
              + f") | {r['last_round_val_dice']:.3f} | {r['train_s_per_round']:.0f}")
    print(f"suggested: {suggested} (smallest within {args.tolerance} of the best mean)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
