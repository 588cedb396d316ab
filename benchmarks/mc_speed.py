"""Speed of MC-dropout scoring and of training steps, side by side in one run (CPU by default).

Scoring the pool is the active learner's inner loop. Compared on the same model and images:

* ``ceal-code style``: what the published CEAL code does: one image at a time, T predictions
  stacked in memory, then ``np.var`` over them;
* ``alseg fp32``: alseg's streaming engine (batches, Welford running statistics);
* ``alseg bf16``: the same with bf16 autocast and channels_last (alseg's default on CPUs with
  bf16 instructions);
* ``dropout_scope`` ``all`` against ``decoder`` (same weights, same FLOPs per whole pass): with
  dropout only in the decoder and bottleneck, alseg runs the encoder once per batch.

Also training image-steps per second of :func:`alseg.train.fit` (fp32 and bf16 autocast).
Prints one JSON object; ratios are what to compare, absolute times on shared CPUs are noisy.

    .venv/bin/python benchmarks/mc_speed.py [--size 96] [--width 16] [--images 64] [--passes 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc

import numpy as np
import torch

from alseg.data import load_cached, open_dataset
from alseg.model import ModelConfig, UNet, set_mc_dropout
from alseg.runtime import Normalizer
from alseg.train import TrainConfig, fit
from alseg.active.uncertainty import cpu_has_fast_bf16, mc_dropout


def ceal_style(model, images, norm, passes):
    """Per image: T forward passes kept in memory, variance with numpy (the published code's way)."""
    set_mc_dropout(model)
    scores = []
    with torch.no_grad():
        for img in images:
            x = norm(torch.from_numpy(np.ascontiguousarray(img[None])))
            stack = np.stack([torch.sigmoid(model(x))[0, 0].numpy() for _ in range(passes)])
            scores.append(float(np.var(stack, axis=0).sum()))
    return np.array(scores)


def timed(fn, repeat=2):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/isic")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--train-images", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_cached(open_dataset(args.data), args.size)
    idx = np.flatnonzero(data.has_mask)[: args.images]
    images = np.asarray(data.images[idx])
    norm = Normalizer.fit(images)
    model = UNet(ModelConfig(in_channels=data.channels, width=args.width, depth=5, dropout=0.1))
    n = len(idx)
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                      f"bf16 instructions: {cpu_has_fast_bf16()}",
           "torch": torch.__version__, "size": args.size, "width": args.width, "images": n, "passes": args.passes}

    tracemalloc.start()
    t_ceal, s_ceal = timed(lambda: ceal_style(model, images, norm, args.passes), repeat=1)
    peak_ceal = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    t_fp32, r_fp32 = timed(lambda: mc_dropout(model, data.images, idx, norm, passes=args.passes, precision="fp32"))
    peak_fp32 = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t_bf16, r_bf16 = timed(lambda: mc_dropout(model, data.images, idx, norm, passes=args.passes, precision="bf16"))
    res["mc_images_per_s"] = {"ceal_code_style": round(n / t_ceal, 2), "alseg_fp32": round(n / t_fp32, 2),
                              "alseg_bf16": round(n / t_bf16, 2)}
    res["mc_speedup_vs_ceal_style"] = {"alseg_fp32": round(t_ceal / t_fp32, 2), "alseg_bf16": round(t_ceal / t_bf16, 2)}
    res["mc_python_heap_peak_mb"] = {"ceal_code_style": round(peak_ceal / 2**20, 1), "alseg_fp32": round(peak_fp32 / 2**20, 1)}
    res["score_rank_agreement_bf16_vs_fp32"] = round(float(np.corrcoef(np.argsort(np.argsort(r_fp32.variance)),
                                                                        np.argsort(np.argsort(r_bf16.variance)))[0, 1]), 3)
    res["score_rank_agreement_ceal_vs_fp32"] = round(float(np.corrcoef(np.argsort(np.argsort(s_ceal)),
                                                                        np.argsort(np.argsort(r_fp32.variance)))[0, 1]), 3)

    # dropout_scope "decoder": the encoder levels without dropout run once per batch, not T times
    fp = "bf16" if cpu_has_fast_bf16() else "fp32"
    decoder = UNet(ModelConfig(in_channels=data.channels, width=args.width, depth=5, dropout=0.1, dropout_scope="decoder"))
    decoder.load_state_dict(model.state_dict())
    t_all, _ = timed(lambda: mc_dropout(model, data.images, idx, norm, passes=args.passes, precision=fp))
    t_dec, _ = timed(lambda: mc_dropout(decoder, data.images, idx, norm, passes=args.passes, precision=fp))
    res["mc_dropout_scope"] = {"precision": fp, "all_images_per_s": round(n / t_all, 2),
                               "decoder_encoder_once_images_per_s": round(n / t_dec, 2),
                               "speedup": round(t_all / t_dec, 2),
                               "deterministic_levels": decoder.deterministic_levels()}

    tidx = np.flatnonzero(data.has_mask)[: args.train_images]
    for precision in ("fp32", "bf16"):
        m = UNet(ModelConfig(in_channels=data.channels, width=args.width, depth=5, dropout=0.1))
        cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", precision=precision)
        t0 = time.perf_counter()
        fit(m, data.images[tidx], data.masks[tidx], None, None, cfg, norm, size=args.size)
        res.setdefault("train_image_steps_per_s", {})[precision] = round(2 * len(tidx) / (time.perf_counter() - t0), 2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
