"""How MC-dropout scoring grows: time and peak memory of ``mc_dropout`` against pool size and against T.

The claim checked: scoring time is linear in (pool size x T), and memory is bounded by the batch,
not by the pool or by T (the engine streams running statistics per batch).

Each point runs in a fresh child process, so memory one point freed (and the allocator kept)
cannot hide the next point's growth. In the child: a U-Net (``--width``, depth 5, dropout 0.1 in
every block, random weights seeded with ``--seed``) and a pool of generated images (uniform random
uint8 pixels at ``--size`` px: content does not change the work of a dense network) are built;
then one warm-up call (one batch, 2 passes) and the timed call ``mc_dropout(model, pool,
range(pool), passes=T, batch_size=--batch-size, precision=--precision)``. Peak memory is the
kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``; where
that is not allowed, ``VmRSS`` sampled every 5 ms in a thread):

* ``scoring_peak_mb``: peak RSS during warm-up and call, above the RSS once model and pool exist;
* ``call_peak_growth_mb``: peak RSS during the timed call above the RSS just before it;
* ``pool_mb``: the pool array itself (what a non-streaming engine would multiply by T).

Fits (least squares, with R^2): seconds against pool size (at ``--passes``), against T (on
``--t-pool`` images) and against image-passes (pool x T) over every point; each gives seconds per
image-pass. ``--figure`` draws two panels (time and memory against pool size, and against T).
Progress goes to stderr; with ``--json`` stdout is one JSON object.

    .venv/bin/python benchmarks/mc_growth.py --json [--figure docs/figures/mc-growth.png]
        [--pools 1000,4000,16000] [--passes 20] [--t-values 5,10,20,40] [--t-pool 1000] [--width 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import machine_info  # benchmarks/ is on sys.path when a script there runs
from rss import PeakRSS, status_kb  # benchmarks/ is on sys.path when a script there runs


def log(msg: str) -> None:
    print(f"[mc_growth {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


# ----------------------------------------------------------------------------- memory

# ----------------------------------------------------------------------------- one point (child process)

def run_point(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from alseg.active.uncertainty import mc_dropout
    from alseg.model import ModelConfig, UNet
    from alseg.runtime import Normalizer

    n, T, B, size = spec["pool"], spec["passes"], spec["batch_size"], spec["size"]
    torch.manual_seed(spec["seed"])
    model = UNet(ModelConfig(in_channels=3, width=spec["width"], depth=5, dropout=0.1, dropout_scope="all"))
    pool = np.random.default_rng(spec["seed"]).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    norm = Normalizer.fit(pool)
    rss_setup = status_kb("VmRSS")
    with PeakRSS() as warm:
        mc_dropout(model, pool, np.arange(min(B, n)), norm, passes=2, batch_size=B,
                   precision=spec["precision"], seed=spec["seed"])
    rss_before = status_kb("VmRSS")
    with PeakRSS() as call:
        t0 = time.perf_counter()
        res = mc_dropout(model, pool, np.arange(n), norm, passes=T, batch_size=B,
                         precision=spec["precision"], seed=spec["seed"])
        seconds = time.perf_counter() - t0
    peak = max(warm.peak_kb, call.peak_kb)
    return {"pool": n, "passes": T, "seconds": round(seconds, 4),
            "image_passes_per_s": round(n * T / seconds, 2),
            "scoring_peak_mb": round((peak - rss_setup) / 1024, 2),
            "call_peak_growth_mb": round((call.peak_kb - rss_before) / 1024, 2),
            "pool_mb": round(pool.nbytes / 2 ** 20, 2),
            "rss_setup_mb": round(rss_setup / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "memory_method": call.method,
            "scores_finite": bool(np.isfinite(res.variance).all()),
            "mean_variance_score": float(res.variance.mean())}


# ----------------------------------------------------------------------------- fits and figure

def linear_fit(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return {"slope": None, "intercept": None, "r2": None, "points": len(x)}
    slope, intercept = np.polyfit(x, y, 1)
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": round(r2, 5), "points": len(x)}


def draw(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    panels = [(axes[0], res["pool_sweep"], "pool", f"pool size (images, {cfg['size']} px)",
               res["fits"]["time_vs_pool"], f"T = {cfg['passes']}"),
              (axes[1], res["t_sweep"], "passes", "T (MC passes per image)",
               res["fits"]["time_vs_passes"], f"pool = {cfg['t_pool']} images")]
    for ax, points, key, xlabel, fit, fixed in panels:
        x = np.array([p[key] for p in points], float)
        t = np.array([p["seconds"] for p in points], float)
        handles = [ax.plot(x, t, "o", color="C0", label="scoring time")[0]]
        if fit["slope"] is not None:
            xs = np.linspace(0, x.max() * 1.05, 50)
            handles.append(ax.plot(xs, fit["slope"] * xs + fit["intercept"], "-", color="C0", alpha=0.6,
                                   label=f"linear fit (R² = {fit['r2']:.4f})")[0])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("scoring time (s)", color="C0")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        mem = ax.twinx()
        handles.append(mem.plot(x, [p["scoring_peak_mb"] for p in points], "s--", color="C3",
                                label="peak memory of scoring (RSS above setup)")[0])
        if key == "pool":
            handles.append(mem.plot(x, [p["pool_mb"] for p in points], ":", color="grey",
                                    label="the pool's own pixels (for scale)")[0])
        mem.set_ylabel("memory (MiB)", color="C3")
        mem.set_ylim(bottom=0, top=1.15 * max([p["scoring_peak_mb"] for p in points] +
                                              ([p["pool_mb"] for p in points] if key == "pool" else [])))
        ax.set_title(f"against {'pool size' if key == 'pool' else 'T'} ({fixed})")
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8,
                  frameon=False)
    m = res["machine"]
    fig.suptitle(f"alseg mc_dropout: U-Net width {cfg['width']}, depth 5, batch {cfg['batch_size']}, "
                 f"precision {cfg['precision']}; {m['cpu']}, {m['threads']} threads, torch {m['torch']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=_ints, default=[1000, 4000, 16000], help="pool sizes at --passes (comma list)")
    ap.add_argument("--passes", type=int, default=20, help="T for the pool sweep")
    ap.add_argument("--t-values", type=_ints, default=[5, 10, 20, 40], help="T values for the T sweep (comma list)")
    ap.add_argument("--t-pool", type=int, default=1000, help="pool size for the T sweep")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto", help="mc_dropout precision (default: its own default, auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", type=Path, default=None, help="write the two-panel figure here (PNG)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: run one point, print its JSON
    args = ap.parse_args()
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))))
        return
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    base = {"width": args.width, "size": args.size, "batch_size": args.batch_size, "precision": args.precision,
            "seed": args.seed, "threads": args.threads}
    wanted = [(p, args.passes) for p in args.pools] + [(args.t_pool, t) for t in args.t_values]
    specs = sorted(set(wanted), key=lambda pt: pt[0] * pt[1])  # shared points run once; small ones first
    total = sum(p * t for p, t in specs)
    res: dict = {"benchmark": "mc_growth", "machine": machine_info(),
                 "config": {**base, "passes": args.passes, "pools": args.pools, "t_values": args.t_values,
                            "t_pool": args.t_pool, "model": "U-Net depth 5, dropout 0.1 (scope all), random weights",
                            "images": "generated: uniform random uint8 pixels"},
                 "loadavg_start": [float(v) for v in open("/proc/loadavg").read().split()[:3]]}
    t_start = time.perf_counter()
    results: dict[tuple[int, int], dict] = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for pool, passes in specs:
        log(f"pool {pool} x T {passes} ({pool * passes} image-passes of {total} in all)")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--point",
               json.dumps({**base, "pool": pool, "passes": passes})]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            sys.exit(f"the point pool={pool}, T={passes} failed (exit {proc.returncode})")
        point = json.loads(proc.stdout.strip().splitlines()[-1])
        results[(pool, passes)] = point
        log(f"  {point['seconds']:.2f} s, {point['image_passes_per_s']:.0f} image-passes/s, "
            f"scoring peak {point['scoring_peak_mb']:.1f} MiB (pool itself {point['pool_mb']:.1f} MiB)")

    pool_sweep = [results[(p, args.passes)] for p in args.pools]
    t_sweep = [results[(args.t_pool, t)] for t in args.t_values]
    everything = [results[s] for s in specs]
    f_pool = linear_fit([p["pool"] for p in pool_sweep], [p["seconds"] for p in pool_sweep])
    f_t = linear_fit([p["passes"] for p in t_sweep], [p["seconds"] for p in t_sweep])
    f_all = linear_fit([p["pool"] * p["passes"] for p in everything], [p["seconds"] for p in everything])
    f_mem = linear_fit([p["pool"] for p in pool_sweep], [p["scoring_peak_mb"] for p in pool_sweep])
    f_mem_t = linear_fit([p["passes"] for p in t_sweep], [p["scoring_peak_mb"] for p in t_sweep])

    def per(fit: dict, div: int) -> float | None:
        return fit["slope"] / div if fit["slope"] is not None else None

    res["pool_sweep"] = pool_sweep
    res["t_sweep"] = t_sweep
    res["fits"] = {
        "time_vs_pool": {**f_pool, "units": "s per image, s", "seconds_per_image_pass": per(f_pool, args.passes)},
        "time_vs_passes": {**f_t, "units": "s per pass, s", "seconds_per_image_pass": per(f_t, args.t_pool)},
        "time_vs_image_passes": {**f_all, "units": "s per image-pass, s", "seconds_per_image_pass": f_all["slope"]},
        "memory_vs_pool": {**f_mem, "units": "MiB per image, MiB",
                           "mib_per_1000_images": f_mem["slope"] * 1000 if f_mem["slope"] is not None else None},
        "memory_vs_passes": {**f_mem_t, "units": "MiB per pass, MiB"},
    }
    mems = [p["scoring_peak_mb"] for p in everything]
    res["summary"] = {
        "seconds_per_image_pass": f_all["slope"],
        "time_r2": f_all["r2"],
        "scoring_peak_mb_range": [min(mems), max(mems)],
        "largest_pool_mb": max(p["pool_mb"] for p in pool_sweep),
        "per_point_seconds_per_image_pass": {f"{p['pool']}x{p['passes']}": p["seconds"] / (p["pool"] * p["passes"])
                                             for p in everything},
    }
    res["loadavg_end"] = [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.figure:
        draw(res, args.figure)
        res["figure"] = str(args.figure)
        log(f"figure written to {args.figure}")
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['machine']['cpu']}, {res['machine']['threads']} threads, torch {res['machine']['torch']}; "
          f"width {args.width}, {args.size} px, batch {args.batch_size}, precision {args.precision}")
    for p in everything:
        print(f"  pool {p['pool']:>6} x T {p['passes']:>3}: {p['seconds']:8.2f} s  "
              f"{p['image_passes_per_s']:8.0f} image-passes/s  scoring peak {p['scoring_peak_mb']:7.1f} MiB  "
              f"(pool {p['pool_mb']:.1f} MiB)")
    if f_all["slope"] is not None:
        print(f"  time = {f_all['slope'] * 1e3:.3f} ms per image-pass x pool x T + {f_all['intercept']:.2f} s "
              f"(R² {f_all['r2']:.4f})")


if __name__ == "__main__":
    main()
