"""Full-supervision reference: supervised training on ALL labelled training images, test Dice.

This is the line the active learner is measured against. Runs `alseg train --full` on the
LGG tumour slices (31 patients of ../shared/data/lgg, split by patient) and on ISIC 2017 (test
carved from the 2000 training pairs), 128 px, width 16, on CPU, and prints one JSON line per
dataset. Usage:

    .venv/bin/python benchmarks/full_supervision.py [--epochs-isic 20] [--epochs-lgg 40] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs-isic", type=int, default=20)
    ap.add_argument("--epochs-lgg", type=int, default=40)
    ap.add_argument("--only", choices=["isic", "lgg"], default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-bench-full"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    jobs = [("lgg", SHARED / "lgg" / "kaggle_3m", "quick-lgg", args.epochs_lgg),
            ("isic", SHARED / "isic", "quick-isic", args.epochs_isic)]
    for name, data, preset, epochs in jobs:
        if args.only and name != args.only:
            continue
        out = args.out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = [sys.executable, "-m", "alseg", "train", "--data", str(data), "--preset", preset, "--size", "128",
               "--width", "16", "--epochs", str(epochs), "--full", "--device", args.device, "--out", str(out), "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        result = json.loads(proc.stdout)
        train_images = result["labelled"] * epochs
        print(json.dumps({"dataset": name, "command": " ".join(cmd[1:]), "epochs": epochs,
                          "wall_s": round(time.perf_counter() - t0, 1),
                          "train_image_steps_per_s": round(train_images / result["seconds"], 2),
                          **{k: result[k] for k in ("labelled", "split", "split_by", "best_epoch", "best_val_dice")},
                          "test": result["test"]}), flush=True)


if __name__ == "__main__":
    main()
