"""Is a study faster as one process using every core, or as one single-thread process per core?

`alseg compare --only-seeds` lets several processes share one study folder. This measures, side by
side in one run, the training throughput (images per second through ``alseg.train.fit``, the
preset's model, precision and augmentation) of:

* ``one``: one process with ``--cores`` threads;
* ``split``: ``--cores`` processes at once, each with ``OMP_NUM_THREADS=1`` (their images/s summed).

Each measurement runs in fresh child processes; the training data are generated (uniform random
uint8 pixels and random masks at the preset's working size: content does not change the work of a
dense network). Every child trains ``--epochs`` epochs on ``--images`` images (the first epoch is a
warm-up and is not timed). Run it on a quiet machine. Progress goes to stderr; with ``--json``
stdout is one JSON object.

    .venv/bin/python benchmarks/process_split.py --preset quick-isic --json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from machine import machine_info  # benchmarks/ is on sys.path when a script there runs


def log(msg: str) -> None:
    print(f"[process_split {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def worker(preset: str, images: int, epochs: int, seed: int) -> dict:
    """Train in this process; return images/s over the epochs after the first."""
    import dataclasses

    import numpy as np
    import torch

    from alseg.config import build_config
    from alseg.model import UNet
    from alseg.runtime import Normalizer
    from alseg.train import fit

    cfg = build_config(preset, None, {"data": {"path": "generated"}})
    size, channels = cfg.data.size, cfg.model.in_channels
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (images, size, size, channels), dtype=np.uint8)
    y = (rng.random((images, size, size)) > 0.7).astype(np.uint8)
    stamps: list[float] = []
    torch.manual_seed(seed)
    fit(UNet(cfg.model), x, y, None, None, dataclasses.replace(cfg.train, epochs=epochs), Normalizer.fit(x),
        size=size, seed=seed, on_epoch=lambda record: stamps.append(time.perf_counter()))
    timed = (len(stamps) - 1) * images
    return {"threads": torch.get_num_threads(), "images_per_s": timed / (stamps[-1] - stamps[0])}


def run_children(n: int, threads: int, args) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--images", str(args.images),
           "--epochs", str(args.epochs)]
    procs = [subprocess.Popen(cmd + ["--seed", str(k)], env=env, stdout=subprocess.PIPE, text=True)
             for k in range(n)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        results.append(json.loads(out))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick-isic")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per child; the first is not timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.preset, args.images, args.epochs, args.seed)))
        return
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first is a warm-up)")
    log(f"one process, {args.cores} threads")
    one = run_children(1, args.cores, args)
    log(f"{args.cores} processes, 1 thread each")
    split = run_children(args.cores, 1, args)
    result = {
        "machine": {**machine_info(), "cores": args.cores},
        "preset": args.preset, "images": args.images, "timed_epochs": args.epochs - 1,
        "one_process_images_per_s": one[0]["images_per_s"],
        "split_images_per_s": sum(r["images_per_s"] for r in split),
        "split_per_process": [r["images_per_s"] for r in split],
    }
    result["ratio"] = result["split_images_per_s"] / result["one_process_images_per_s"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"one process x {args.cores} threads: {result['one_process_images_per_s']:.1f} images/s; "
              f"{args.cores} processes x 1 thread: {result['split_images_per_s']:.1f} ({result['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
