"""MC-dropout scoring throughput: alseg's engine against baal 2.1 and a plain PyTorch loop, in one process.

Same model (U-Net width 16, depth 5, dropout 0.1 in every block, 3 input channels; initialised
with torch seed ``--seed`` and given ``--train-steps`` quick Adam steps on other ISIC images, so
that scores differ between images, unless ``--checkpoint`` names an alseg checkpoint), same real
ISIC 2017 images at ``--size`` px, same T and batch size, each path going from uint8 pixels to one
variance score per image (the sum over pixels of the variance of the T sigmoid probabilities):

* ``baal``: ``baal.modelwrapper.ModelWrapper`` (``TrainingArgs(replicate_in_memory=True)``) on the
  model wrapped as ``MCDropoutModule(Sequential(unet, Sigmoid()))``, driven through
  ``predict_on_dataset`` (its DataLoader normalises each image): baal replicates each batch T
  times (one forward of batch x T images), keeps every prediction ``[N, 1, H, W, T]`` in memory,
  then ``baal.active.heuristics.Variance(reduction="sum")`` scores them (np.var over T);
* ``baal_batch*`` (issue 31: baal at its fastest documented use): the same wrapped model, driven
  through ``ModelWrapper.predict_on_batch(batch, iterations=T)`` (baal 2.1 runs it under
  ``torch.no_grad``; the device comes from ``TrainingArgs.use_cuda``) on float tensors normalised
  before the clock starts, each batch's ``[B, 1, H, W, T]`` scored at once by the same
  ``Variance(reduction="sum")``. ``baal_batch``: ``replicate_in_memory=True`` (baal's default: one
  forward of batch x T images); ``baal_batch_noreplicate``: ``replicate_in_memory=False`` (T
  forwards of the batch); ``baal_batch_cached``: ``replicate_in_memory=False`` with the model also
  wrapped in baal's ``MCCachingModule`` (its documented MC speed-up: a Conv2d/Linear whose input
  did not change between passes returns its cached output; here only the first convolution, the
  rest follows a dropout);
* ``plain_fp32``: the model in MC mode (``set_mc_dropout``), T forward passes per batch, the T
  probability maps stacked and ``torch.var`` over them, summed per image;
* ``alseg``: :func:`alseg.active.uncertainty.mc_dropout` at its default precision (``auto``: bf16
  autocast on CPUs with bf16 instructions) and at fp32.

Each path is warmed up once per batch size (one batch, same shapes) and then timed
best-of-``--repeat``, the paths and batch sizes taking turns (so a change in the load of a shared
machine slows every path alike; the load average is recorded at the start, after each round and
at the end). ``--batch-sizes`` measures several batch sizes in one process: ``by_batch`` holds
each one's figures and ``best`` each path's fastest batch and the ratios at it; the top-level
keys of earlier raw files describe ``--batch-size``. ``peak_rss_growth_mb`` is each path's resident-memory peak above its start (a lower
bound: memory an earlier path freed and the allocator kept is reused without growth). FLOPs per pass come from ``torch.utils.flop_counter.FlopCounterMode`` on one
forward of one image (convolutions and matmuls only); the peaks from a timed 2048x2048 matmul
(fp32 and bf16) with the same thread count. ``selection_overlap``: on a pool of ``--pool`` ISIC
images, the share of the top 10 % by variance that alseg's default precision picks in common with
alseg at fp32 (same seed, so same dropout masks). With ``--seed-baseline`` also fp32 against fp32
with another seed: how much the MC noise alone moves the pick, to read the first number against.

baal is a benchmark-only dependency (``pip install -e '.[bench]'``); alseg never imports it.
Progress goes to stderr; with ``--json`` stdout is one JSON object.

    ALSEG_CACHE_DIR=/tmp/alseg-cache-full .venv/bin/python benchmarks/mc_scoring.py \\
        --width 16 --size 128 --passes 20 --images 32 --json
    # issue 31: every path at batch 2-16 in one process (1 thread: the run shared its 2 cores with
    # two single-threaded benchmarks, and 2 threads beside them slowed the paths unevenly)
    .venv/bin/python benchmarks/mc_scoring.py --width 16 --size 128 --passes 20 --images 32 --pool 0 \\
        --threads 1 --batch-sizes 2 4 8 16 --json > benchmarks/results/cpu-mc-scoring-vs-baal-best.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import copy
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alseg.active.uncertainty import mc_dropout
from alseg.model import ModelConfig, UNet, set_mc_dropout
from alseg.runtime import Normalizer
from machine import machine_info  # benchmarks/ is on sys.path when a script there runs
from rss import reset_peak_rss, status_kb  # benchmarks/ is on sys.path when a script there runs

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic"
DEFAULT_CACHE = "/tmp/alseg-cache-full"  # where the full-supervision benchmark's 128 px ISIC cache lives


def log(msg: str) -> None:
    print(f"[mc_scoring {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- machine

def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """Best-of-``repeat`` GFLOP/s of an n x n matmul in ``dtype`` (2 n^3 FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def gflop_per_pass(model: UNet, size: int, channels: int) -> float:
    """FLOPs of one forward of one image (FlopCounterMode: convolutions, transposed convolutions, matmuls)."""
    set_mc_dropout(model, True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, size, size))
    return counter.get_total_flops() / 1e9


def quick_train(model: UNet, images: np.ndarray, masks: np.ndarray, norm: Normalizer, steps: int, batch: int,
                seed: int) -> float:
    """A few plain Adam steps (BCE + soft Dice, no augmentation) so the scores depend on the image:
    a freshly initialised U-Net gives nearly the same variance everywhere, and ranking near-equal
    numbers says little about whether bf16 changes the pick. Returns the last steps' mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    info = machine_info()
    fast = info["avx512_bf16"] or info["amx_bf16"]
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(images), (batch,), generator=gen).numpy()
        x = norm(torch.from_numpy(images[pick]))
        y = torch.from_numpy(masks[pick]).float()[:, None]
        with torch.autocast("cpu", torch.bfloat16, enabled=fast):
            logits = model(x)
        logits = logits.float()
        prob = torch.sigmoid(logits).flatten(1)
        dice = (2 * (prob * y.flatten(1)).sum(1) + 1) / (prob.sum(1) + y.flatten(1).sum(1) + 1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y) + (1 - dice).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    model.eval()
    return float(np.mean(losses[-10:]))


# ----------------------------------------------------------------------------- the paths

def plain_fp32(model: UNet, pool: np.ndarray, norm: Normalizer, passes: int, batch_size: int) -> np.ndarray:
    """T dropout-on forward passes per batch, the T probability maps stacked, variance over them."""
    set_mc_dropout(model, True)
    scores = np.zeros(len(pool), np.float64)
    with torch.no_grad():
        for start in range(0, len(pool), batch_size):
            x = norm(torch.from_numpy(np.ascontiguousarray(pool[start:start + batch_size])))
            probs = torch.stack([torch.sigmoid(model(x))[:, 0] for _ in range(passes)])
            scores[start:start + len(x)] = probs.var(dim=0, unbiased=False).flatten(1).sum(1).double().numpy()
    return scores


class _BaalPool(torch.utils.data.Dataset):
    """Normalised images as a torch Dataset for baal's DataLoader (baal wants (input, target, ...))."""

    def __init__(self, pool: np.ndarray, norm: Normalizer):
        self.pool, self.norm = pool, norm

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i):
        return self.norm(torch.from_numpy(np.ascontiguousarray(self.pool[i:i + 1])))[0], 0


def import_baal():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import baal
            from baal.active.heuristics import Variance
            from baal.bayesian.caching_utils import MCCachingModule
            from baal.bayesian.dropout import MCDropoutModule
            from baal.modelwrapper import ModelWrapper, TrainingArgs
    except ImportError as exc:
        sys.exit(f"baal is needed for this benchmark ({exc}); install it with: .venv/bin/pip install -e '.[bench]' "
                 "(or 'baal==2.1.0' with a constraints file pinning torch)")
    # baal configures structlog at import to print info lines on stdout: keep stdout for the JSON
    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    return baal, ModelWrapper, TrainingArgs, MCDropoutModule, MCCachingModule, Variance


class BaalScorer:
    """baal 2.1's MC-dropout scoring of a segmentation pool, as its documentation wires it."""

    def __init__(self, model: UNet, batch_size: int):
        self.baal, ModelWrapper, TrainingArgs, MCDropoutModule, _, Variance = import_baal()
        # baal's Variance takes np.var of whatever the model outputs: make it output probabilities,
        # as alseg scores them. MCDropoutModule swaps every nn.Dropout (RowSeededDropout is one) for
        # baal's always-on Dropout; inplace=False works on a deep copy, same weights.
        wrapped = MCDropoutModule(nn.Sequential(copy.deepcopy(model), nn.Sigmoid()), inplace=False)
        self.wrapper = ModelWrapper(wrapped, TrainingArgs(batch_size=batch_size, use_cuda=False, workers=0,
                                                          replicate_in_memory=True))
        self.heuristic = Variance(reduction="sum")
        self.pred_s = self.heuristic_s = 0.0

    def __call__(self, pool: np.ndarray, norm: Normalizer, passes: int) -> np.ndarray:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            preds = self.wrapper.predict_on_dataset(_BaalPool(pool, norm), iterations=passes, verbose=False)
        t1 = time.perf_counter()
        scores = self.heuristic.get_uncertainties(preds)  # [N]: sum over pixels of np.var over T
        self.pred_s, self.heuristic_s = t1 - t0, time.perf_counter() - t1
        self.predictions_mb = preds.nbytes / 2 ** 20
        return np.asarray(scores, np.float64)


class BaalBatchScorer:
    """baal 2.1's fastest documented MC-dropout use on a batch: ``ModelWrapper.predict_on_batch`` on
    tensors already normalised, then ``Variance(reduction="sum")`` on each batch's predictions.

    ``replicate_in_memory``: True stacks the batch T times into one forward (baal's default), False
    runs T forwards of the batch. ``caching``: also wrap the model in ``MCCachingModule`` (baal
    documents it with ``replicate_in_memory=False``; with True the input differs between the
    replicas and the cache cannot hit, and baal warns)."""

    def __init__(self, model: UNet, replicate_in_memory: bool, caching: bool = False):
        _, ModelWrapper, TrainingArgs, MCDropoutModule, MCCachingModule, Variance = import_baal()
        net = nn.Sequential(copy.deepcopy(model), nn.Sigmoid())
        # net is already this scorer's own copy, so both patches may work in place; the order is that
        # of baal's MCCachingModule tutorial: caching inside, dropout patched over it
        if caching:
            net = MCCachingModule(net)
        wrapped = MCDropoutModule(net)
        self.wrapper = ModelWrapper(wrapped, TrainingArgs(use_cuda=False, workers=0,
                                                          replicate_in_memory=replicate_in_memory))
        self.wrapper.eval()  # what predict_on_dataset does first; predict_on_batch leaves the mode alone
        self.heuristic = Variance(reduction="sum")

    def __call__(self, pool: torch.Tensor, passes: int, batch_size: int) -> np.ndarray:
        scores = [self.heuristic.get_uncertainties(self.wrapper.predict_on_batch(pool[s:s + batch_size], passes))
                  for s in range(0, len(pool), batch_size)]  # slices of a contiguous tensor: views, no copy
        return np.concatenate(scores).astype(np.float64)


BAAL_BATCH_PATHS = {  # name: (replicate_in_memory, caching)
    "baal_batch": (True, False),
    "baal_batch_noreplicate": (False, False),
    "baal_batch_cached": (False, True),
}


# ----------------------------------------------------------------------------- helpers

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def load_model(args, channels: int) -> tuple[UNet, Normalizer | None, str]:
    if not args.checkpoint:
        torch.manual_seed(args.seed)
        cfg = ModelConfig(in_channels=channels, width=args.width, depth=5, dropout=0.1, dropout_scope="all")
        return UNet(cfg), None, f"random init (torch seed {args.seed})"
    blob = torch.load(args.checkpoint, map_location="cpu", weights_only=True)  # alseg's checkpoint layout
    model = UNet(ModelConfig(**blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model, Normalizer.from_dict(blob["normalizer"]), f"checkpoint {args.checkpoint}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="ISIC 2017 folder (official layout), read in place")
    ap.add_argument("--cache-dir", default=None,
                    help=f"pixel cache folder (default: $ALSEG_CACHE_DIR, else {DEFAULT_CACHE})")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--passes", type=int, default=20, help="T, MC passes per image")
    ap.add_argument("--images", type=int, default=32, help="images timed per path")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="images per batch for every path (baal: x T per forward); the top-level keys and the "
                         "selection pool use it")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="measure every path at each of these batch sizes in one process (must include "
                         "--batch-size); default: --batch-size alone")
    ap.add_argument("--baal-path", choices=("dataset", "batch", "both"), default="both",
                    help="baal through predict_on_dataset (the path of the earlier raw files), through "
                         "predict_on_batch on normalised tensors (replicate_in_memory True and False, and with "
                         "MCCachingModule), or both")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per path after the warm-up; the best is kept")
    ap.add_argument("--pool", type=int, default=128, help="pool for selection_overlap (0: skip)")
    ap.add_argument("--select-fraction", type=float, default=0.1)
    ap.add_argument("--seed-baseline", action="store_true",
                    help="also score the pool at fp32 with another seed (MC-noise floor of the overlap)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--checkpoint", default=None, help="an alseg checkpoint (best.pt) instead of random weights")
    ap.add_argument("--train-steps", type=int, default=50,
                    help="Adam steps (batch 8) on other ISIC images before measuring, so scores differ between "
                         "images (0: random weights; ignored with --checkpoint)")
    ap.add_argument("--skip-baal", action="store_true", help="leave baal out (when it is not installed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    batch_sizes = list(dict.fromkeys(args.batch_sizes or [args.batch_size]))
    if args.batch_size not in batch_sizes:
        ap.error(f"--batch-size {args.batch_size} must be one of --batch-sizes {batch_sizes}")
    if min(batch_sizes) < 1:
        ap.error("batch sizes must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache_dir:
        os.environ["ALSEG_CACHE_DIR"] = args.cache_dir
    os.environ.setdefault("ALSEG_CACHE_DIR", DEFAULT_CACHE)
    from alseg.data import load_cached, open_dataset

    res: dict = {"benchmark": "mc_scoring", "machine": machine_info(), "loadavg_start": loadavg()}
    t_start = time.perf_counter()
    log(f"loading {args.data} at {args.size} px (cache {os.environ['ALSEG_CACHE_DIR']})")
    data = load_cached(open_dataset(args.data), args.size)
    n_pool = min(args.pool, len(data.ids)) if args.pool else 0
    n_time = min(args.images, len(data.ids))
    timed_imgs = np.array(data.images[:n_time])  # in memory, writable: the same array for every path
    model, ckpt_norm, weights = load_model(args, data.channels)
    norm = ckpt_norm or Normalizer.fit(np.asarray(data.images[: max(n_time, n_pool)]))
    if args.train_steps and not args.checkpoint:
        # training images: labelled ones after those timed and pooled
        train_idx = np.flatnonzero(np.asarray(data.has_mask))
        train_idx = train_idx[train_idx >= max(n_time, n_pool)][:512]
        t0 = time.perf_counter()
        loss = quick_train(model, np.array(data.images[train_idx]), np.array(data.masks[train_idx]), norm,
                           args.train_steps, 8, args.seed)
        weights += f", then {args.train_steps} Adam steps x 8 images on {len(train_idx)} other ISIC images " \
                   f"(final loss {loss:.3f})"
        log(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.1f} s, loss {loss:.3f}")
    T, B = args.passes, args.batch_size
    res.update({"weights": weights, "model": model.config.to_dict(), "size": args.size, "passes": T,
                "images": n_time, "batch_size": B, "batch_sizes": batch_sizes, "repeat": args.repeat,
                "dataset": str(args.data), "image_ids": [data.ids[0], data.ids[n_time - 1]]})

    # FLOPs and peaks first (short, and on a quiet machine they are what the rest is read against)
    gflop = gflop_per_pass(model, args.size, data.channels)
    peak32, peak16 = matmul_peak_gflops(torch.float32), matmul_peak_gflops(torch.bfloat16)
    res.update({"gflop_per_pass": round(gflop, 4), "peak_gflops_fp32": round(peak32, 1),
                "peak_gflops_bf16": round(peak16, 1)})
    log(f"{gflop:.3f} GFLOP per image-pass; matmul peak fp32 {peak32:.0f}, bf16 {peak16:.0f} GFLOP/s")

    # every path takes (uint8 images, the same images normalised, T); the baal_batch paths get the
    # normalised tensor (made here, before any clock: baal's best case), the others the pixels
    timed_norm = norm(torch.from_numpy(np.ascontiguousarray(timed_imgs))).contiguous()
    run_dataset = not args.skip_baal and args.baal_path in ("dataset", "both")
    run_batch = not args.skip_baal and args.baal_path in ("batch", "both")
    baal_scorers: dict[int, BaalScorer] = {}
    batch_scorers: dict[str, BaalBatchScorer] = {}
    if run_dataset:
        for b in batch_sizes:
            baal_scorers[b] = BaalScorer(model, b)
    if run_batch:
        batch_scorers = {name: BaalBatchScorer(model, *how) for name, how in BAAL_BATCH_PATHS.items()}
    if not args.skip_baal:
        res["machine"]["baal"] = importlib.metadata.version("baal")
        res["baal_paths"] = {
            **({"baal": "ModelWrapper.predict_on_dataset, TrainingArgs(replicate_in_memory=True), "
                        "DataLoader normalising each image"} if run_dataset else {}),
            **({name: f"ModelWrapper.predict_on_batch on pre-normalised tensors, replicate_in_memory={rep_}"
                      + (", MCCachingModule" if cache else "")
                for name, (rep_, cache) in BAAL_BATCH_PATHS.items()} if run_batch else {})}

    def paths_at(b: int) -> dict[str, callable]:
        paths: dict[str, callable] = {}
        if run_dataset:
            paths["baal"] = lambda u8, xn, t: baal_scorers[b](u8, norm, t)
        for name, scorer in batch_scorers.items():
            paths[name] = lambda u8, xn, t, scorer=scorer: scorer(xn, t, b)
        paths["plain_fp32"] = lambda u8, xn, t: plain_fp32(model, u8, norm, t, b)
        paths["alseg"] = lambda u8, xn, t: mc_dropout(model, u8, np.arange(len(u8)), norm, passes=t, batch_size=b,
                                                      seed=args.seed).variance
        paths["alseg_fp32"] = lambda u8, xn, t: mc_dropout(model, u8, np.arange(len(u8)), norm, passes=t,
                                                           batch_size=b, precision="fp32", seed=args.seed).variance
        return paths

    runs = {b: paths_at(b) for b in batch_sizes}
    # warm-up: one batch with the shapes of the timed runs, at every batch size (baal's replicated
    # forward is batch x T images, so it warms up with T passes)
    for b, paths in runs.items():
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn(timed_imgs[:b], timed_norm[:b], T if name in ("baal", "baal_batch") else 2)
            log(f"warm-up batch {b} {name}: {time.perf_counter() - t0:.1f} s")

    best = {b: {name: float("inf") for name in paths} for b, paths in runs.items()}
    scores: dict[int, dict[str, np.ndarray]] = {b: {} for b in batch_sizes}
    peak_mb: dict[int, dict[str, float | None]] = {b: {} for b in batch_sizes}
    baal_split: dict[int, tuple[float, float, float]] = {}
    res["loadavg_by_round"] = []
    for r in range(args.repeat):  # paths and batch sizes take turns: slow drift in machine load hits all alike
        for b, paths in runs.items():
            for name, fn in paths.items():
                rss0 = status_kb("VmRSS")
                can_peak = reset_peak_rss()
                t0 = time.perf_counter()
                scores[b][name] = fn(timed_imgs, timed_norm, T)
                dt = time.perf_counter() - t0
                hwm = status_kb("VmHWM")
                peak_mb[b][name] = round((hwm - rss0) / 1024, 1) if can_peak and hwm and rss0 else None
                if dt < best[b][name]:
                    best[b][name] = dt
                    if name == "baal":
                        sc = baal_scorers[b]
                        baal_split[b] = (sc.pred_s, sc.heuristic_s, sc.predictions_mb)
                log(f"run {r + 1}/{args.repeat} batch {b} {name}: {dt:.1f} s ({n_time / dt:.2f} images/s)")
        res["loadavg_by_round"].append(loadavg())

    def figures(b: int) -> dict:
        """One batch size's figures, under the keys of the earlier raw files."""
        ips = {name: n_time / sec for name, sec in best[b].items()}
        achieved = {name: gflop * T * v for name, v in ips.items()}
        out = {"seconds_best": {k: round(v, 3) for k, v in best[b].items()},
               # resident memory above the call's start, last run of each path: a lower bound, since memory an
               # earlier call freed but the allocator kept is reused without growth (large blocks go back to the OS)
               "peak_rss_growth_mb": peak_mb[b],
               "images_per_s": {k: round(v, 3) for k, v in ips.items()},
               "ratios": {f"alseg_over_{k}": round(ips["alseg"] / v, 3) for k, v in ips.items() if k != "alseg"},
               "achieved_gflops_by_path": {k: round(v, 2) for k, v in achieved.items()},
               "fraction_of_fp32_peak_by_path": {k: round(v / peak32, 4) for k, v in achieved.items()}}
        baal_names = [k for k in ips if k.startswith("baal")]
        if baal_names:
            fastest = max(baal_names, key=ips.get)
            out["baal_fastest_path"] = fastest
            out["alseg_over_baal_fastest"] = round(ips["alseg"] / ips[fastest], 3)
        if b in baal_split:
            pred_s, heur_s, mb = baal_split[b]
            out["baal_seconds_split"] = {"predict": round(pred_s, 3), "variance_heuristic": round(heur_s, 3),
                                         "predictions_in_memory_mb": round(mb, 1)}
        # sanity: every path computes the same quantity (dropout masks differ except alseg's two, same seed)
        ref = scores[b]["alseg_fp32"]
        out["score_check_vs_alseg_fp32"] = {
            k: {"spearman": round(spearman(v, ref), 4), "mean_ratio": round(float(v.mean() / ref.mean()), 4)
                if ref.mean() > 0 else None} for k, v in scores[b].items() if k != "alseg_fp32"}
        return out

    by_batch = {b: figures(b) for b in batch_sizes}
    res["by_batch"] = {str(b): f for b, f in by_batch.items()}
    # each path at its own fastest batch, and alseg at its best against the fastest baal path and batch
    top = {}
    for name in runs[batch_sizes[0]]:
        b_best = max(batch_sizes, key=lambda b: by_batch[b]["images_per_s"][name])
        top[name] = {"batch_size": b_best, "images_per_s": by_batch[b_best]["images_per_s"][name]}
    res["best"] = {"by_path": top}
    baal_top = [k for k in top if k.startswith("baal")]
    if baal_top:
        fastest = max(baal_top, key=lambda k: top[k]["images_per_s"])
        res["best"].update({"baal_fastest": {"path": fastest, **top[fastest]},
                            "alseg_best_over_baal_best": round(top["alseg"]["images_per_s"]
                                                               / top[fastest]["images_per_s"], 3),
                            "alseg_over_baal_fastest_same_batch": {str(b): by_batch[b]["alseg_over_baal_fastest"]
                                                                   for b in batch_sizes}})

    # the top-level keys of the earlier raw files: the figures at --batch-size
    head = by_batch[B]
    ips = {name: n_time / sec for name, sec in best[B].items()}
    achieved = {name: gflop * T * v for name, v in ips.items()}
    res["seconds_best"] = head["seconds_best"]
    res["peak_rss_growth_mb"] = head["peak_rss_growth_mb"]
    res["images_per_s"] = head["images_per_s"]
    res["alseg_images_per_s"] = round(ips["alseg"], 3)
    res["alseg_fp32_images_per_s"] = round(ips["alseg_fp32"], 3)
    res["plain_fp32_images_per_s"] = round(ips["plain_fp32"], 3)
    res["baal_images_per_s"] = round(ips["baal"], 3) if "baal" in ips else None
    res["ratio"] = round(ips["alseg"] / ips["baal"], 3) if "baal" in ips else None  # alseg default / baal (dataset)
    res["ratios"] = head["ratios"]
    res["alseg_default_precision"] = "auto (bf16 autocast expected)" if res["machine"]["avx512_bf16"] or \
        res["machine"]["amx_bf16"] else "auto (fp32 expected: no bf16 instructions)"
    res["achieved_gflops"] = round(achieved["alseg"], 2)
    res["achieved_gflops_by_path"] = head["achieved_gflops_by_path"]
    res["fraction_of_bf16_peak"] = round(achieved["alseg"] / peak16, 4)
    res["fraction_of_fp32_peak"] = round(achieved["alseg"] / peak32, 4)
    res["fraction_of_fp32_peak_by_path"] = head["fraction_of_fp32_peak_by_path"]
    if "baal_seconds_split" in head:
        res["baal_seconds_split"] = head["baal_seconds_split"]
    res["score_check_vs_alseg_fp32"] = head["score_check_vs_alseg_fp32"]

    if n_pool:
        pool = np.array(data.images[:n_pool])
        k = max(1, int(round(args.select_fraction * n_pool)))
        log(f"selection overlap: scoring a pool of {n_pool} (top {k}) at default precision and fp32")
        t0 = time.perf_counter()
        v_auto = mc_dropout(model, pool, np.arange(n_pool), norm, passes=T, batch_size=B, seed=args.seed).variance
        t1 = time.perf_counter()
        v_fp32 = mc_dropout(model, pool, np.arange(n_pool), norm, passes=T, batch_size=B, precision="fp32",
                            seed=args.seed).variance
        t2 = time.perf_counter()
        res["selection_overlap"] = round(len(top_k(v_auto, k) & top_k(v_fp32, k)) / k, 4)
        rel = np.abs(v_auto - v_fp32) / np.maximum(np.abs(v_fp32), 1e-12)
        srt = np.sort(v_fp32)[::-1]
        res["selection"] = {"pool": n_pool, "k": k, "seed": args.seed,
                            "spearman_default_vs_fp32": round(spearman(v_auto, v_fp32), 4),
                            "median_relative_score_difference": round(float(np.median(rel)), 6),
                            "max_relative_score_difference": round(float(np.max(rel)), 6),
                            # how far apart the scores are: spread over the pool, and the gap at the cut
                            "score_relative_std": round(float(v_fp32.std() / max(v_fp32.mean(), 1e-12)), 5),
                            "relative_gap_at_cut": round(float((srt[k - 1] - srt[k]) / max(srt[k - 1], 1e-12)), 6)
                            if k < n_pool else None,
                            "pool_images_per_s": {"alseg": round(n_pool / (t1 - t0), 3),
                                                  "alseg_fp32": round(n_pool / (t2 - t1), 3)}}
        if args.seed_baseline:
            v_other = mc_dropout(model, pool, np.arange(n_pool), norm, passes=T, batch_size=B, precision="fp32",
                                 seed=args.seed + 1).variance
            res["selection"]["overlap_fp32_seed_vs_seed"] = round(len(top_k(v_other, k) & top_k(v_fp32, k)) / k, 4)
            res["selection"]["spearman_fp32_seed_vs_seed"] = round(spearman(v_other, v_fp32), 4)
    else:
        res["selection_overlap"] = None

    res["loadavg_end"] = loadavg()
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['machine']['cpu']}, {res['machine']['threads']} threads, torch {res['machine']['torch']}")
    for b in batch_sizes:
        print(f" batch {b}:")
        for name, v in by_batch[b]["images_per_s"].items():
            gf = by_batch[b]["achieved_gflops_by_path"][name]
            print(f"  {name:<23} {v:8.2f} images/s  {gf:8.1f} GFLOP/s  "
                  f"({gf / peak32:.1%} of fp32 peak {peak32:.0f}, {gf / peak16:.1%} of bf16 peak {peak16:.0f})")
        if "alseg_over_baal_fastest" in by_batch[b]:
            print(f"  alseg / baal's fastest here ({by_batch[b]['baal_fastest_path']}) = "
                  f"{by_batch[b]['alseg_over_baal_fastest']:.2f}x")
    if "alseg_best_over_baal_best" in res["best"]:
        fb = res["best"]["baal_fastest"]
        print(f"  alseg at its best batch ({res['best']['by_path']['alseg']['batch_size']}) / baal at its fastest "
              f"({fb['path']}, batch {fb['batch_size']}) = {res['best']['alseg_best_over_baal_best']:.2f}x")
    if res["ratio"] is not None and len(batch_sizes) == 1:
        print(f"  alseg (default precision) / baal = {res['ratio']:.2f}x")
    if res["selection_overlap"] is not None:
        print(f"  top-{res['selection']['k']} overlap, default precision vs fp32 on {n_pool} images: "
              f"{res['selection_overlap']:.2f}")

if __name__ == "__main__":
    main()
