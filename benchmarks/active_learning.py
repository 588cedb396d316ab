"""Active-learning benchmark: strategies side by side against the full-supervision reference.

(`alseg compare` does the same with seeds, bands and a figure; this script is the one-seed,
print-as-you-go version used on the lent GPU machine, where a cut-off run must still report.)

For each dataset it trains the full-supervision reference (all training labels, same preset,
size and width) and then runs each strategy; it prints one JSON line per finished job, so a run
cut short still reports what it finished, and ends with a table of the expert labels each
strategy needed to reach 95 % of the reference Dice. Usage:

    .venv/bin/python benchmarks/active_learning.py --preset quick-lgg --data ../shared/data/lgg \\
        --strategies ceal,random,uncertainty [--seeds 0] [--size 128] [--rounds N] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from alseg.stats import labels_to_reach
from alseg.config import build_config
from alseg.experiment import train_supervised
from alseg.active.loop import run_active


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--strategies", default="ceal,random,uncertainty")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--size", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--budget", type=float)
    ap.add_argument("--full-epochs", type=int, help="epochs of the full-supervision reference (default: the preset's)")
    ap.add_argument("--full-dice", type=float, help="reuse a measured full-supervision Dice instead of training it")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-bench-al"))
    ap.add_argument("--results", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--time-limit", type=float, default=1e9, help="start no new job after this many seconds")
    args = ap.parse_args()
    t_start = time.perf_counter()
    stamp = f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"

    def emit(obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if args.results:
            with open(args.results, "a") as fh:
                fh.write(line + "\n")

    def config(seed: int, strategy: str | None = None, full_epochs: int | None = None):
        return build_config(args.preset, overrides={
            "seed": seed, "data": {"path": args.data, "size": args.size}, "model": {"width": args.width},
            "train": {"device": args.device, "full_epochs": full_epochs},
            "active": {"strategy": strategy, "rounds": args.rounds, "budget": args.budget}})

    seeds = [int(s) for s in args.seeds.split(",")]
    full: dict[int, float] = {}
    summary = []
    for seed in seeds:
        if time.perf_counter() - t_start > args.time_limit:
            break
        t0 = time.perf_counter()
        if args.full_dice is not None:
            full[seed] = args.full_dice
        else:
            ref = train_supervised(config(seed, full_epochs=args.full_epochs), args.out / f"{stamp}-full-s{seed}", full=True)
            full[seed] = ref["test"]["mean_dice"]
            emit({"job": "full", "preset": args.preset, "seed": seed, "size": args.size, "labelled": ref["labelled"],
                  "test": ref["test"], "best_epoch": ref["best_epoch"], "wall_s": round(time.perf_counter() - t0, 1)})
        for strategy in args.strategies.split(","):
            if time.perf_counter() - t_start > args.time_limit:
                break
            t0 = time.perf_counter()
            result = run_active(config(seed, strategy), args.out / f"{stamp}-{strategy}-s{seed}")
            rounds = [{k: r[k] for k in ("round", "expert_labelled", "pseudo_labelled", "pool", "test_dice", "seconds")}
                      for r in result["rounds"]]
            need = labels_to_reach([r["expert_labelled"] for r in rounds], [r["test_dice"] for r in rounds],
                                   0.95 * full[seed])
            summary.append((strategy, seed, need, rounds[-1]["test_dice"], rounds[-1]["expert_labelled"]))
            emit({"job": "active", "preset": args.preset, "strategy": strategy, "seed": seed, "size": args.size,
                  "full_dice": full[seed], "labels_to_95pct_full": need,
                  "rounds": rounds, "stopped": result["stopped"], "wall_s": round(time.perf_counter() - t0, 1)})
    print("\nstrategy  seed  labels-to-95%-of-full  final-Dice  final-expert-labels", file=sys.stderr)
    for strategy, seed, need, dice, labels in summary:
        print(f"{strategy:<10}{seed:>4}  {str(need):>21}  {dice:>10.4f}  {labels:>19}", file=sys.stderr)


if __name__ == "__main__":
    main()
