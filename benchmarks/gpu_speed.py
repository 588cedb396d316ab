"""GPU speed of alseg's two hot loops at the paper's size, on generated data (no dataset needed).

Measured on one device, in one process:

* training throughput of :func:`alseg.train.fit` in image-steps/s (batch ``--batch-size``,
  augmentation on, validation off), at precision ``auto`` (bf16 autocast on CUDA) and ``fp32``.
  Each fit runs 2 epochs over ``--train-images`` images; the first is warm-up (CUDA context,
  cuDNN algorithm choice, allocator growth) and only the second is counted, from the epoch
  record's ``seconds`` (fit reads the loss back every step, so that time is synchronised);
* MC-dropout scoring by :func:`alseg.active.uncertainty.mc_dropout` in image-passes/s
  (images x T / seconds) at its default precision, after one warm-up call on one batch;
* peak GPU memory of each part (``torch.cuda.max_memory_allocated``, reset before each);
* GFLOP of one forward pass of one image (``torch.utils.flop_counter.FlopCounterMode``, a
  multiply-add counted as 2 FLOP) and the achieved TFLOP/s: training counts a step as 3 forward
  passes (forward + backward), MC scoring one forward pass per image-pass.

Images are uint8 noise with brighter elliptical blobs; masks are the blobs. Prints one JSON
object on stdout (one line with ``--json``, indented without); progress goes to stderr.

    python3 benchmarks/gpu_speed.py --device cuda --json            # the H200 run (benchmarks/gpu.sh)
    .venv/bin/python benchmarks/gpu_speed.py --device cpu --width 4 --size 32 \\
        --train-images 16 --mc-images 8 --passes 3                  # smoke test, seconds on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from alseg.active.uncertainty import mc_dropout, mc_precision
from alseg.model import ModelConfig, UNet, count_parameters
from alseg.runtime import Normalizer, resolve_device, resolve_precision
from alseg.train import TrainConfig, fit

# What the GPU should reach at width 64, 256 px (the paper-isic preset's model and size).
TARGETS = {"width": 64, "size": 256, "train_image_steps_per_s": 1000.0, "mc_passes_per_s": 4000.0}


def log(msg: str) -> None:
    print(f"[gpu_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def generated_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (size, size, 3) uint8 noise images with 1-3 brighter ellipses each, and their {0, 1} masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = rng.integers(0, 160, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            ry, rx = rng.uniform(0.05, 0.25, 2) * size
            masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
        images[i][masks[i] > 0] += np.uint8(80)  # noise < 160, so no overflow
    return images, masks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def forward_gflop(model: UNet, channels: int, size: int, device: torch.device) -> float:
    """FLOP of one deterministic forward pass of one image (dropout adds no FLOP here)."""
    was_training = model.training
    model.eval()
    x = torch.zeros((1, channels, size, size), device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).replace("torch.", "")


def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
        for key, read in (("tf32_conv", lambda: torch.backends.cudnn.allow_tf32),  # fp32 convolutions use TF32?
                          ("tf32_matmul", lambda: torch.backends.cuda.matmul.allow_tf32)):
            try:  # flags torch is moving to a new API for: never let reading them fail the benchmark
                info[key] = bool(read())
            except Exception as exc:  # noqa: BLE001
                info[key] = f"unread ({type(exc).__name__})"
    else:
        info["gpu"] = None
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--width", type=int, default=64, help="U-Net base width (paper: 64)")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--dropout", type=float, default=0.2, help="dropout rate (paper-isic preset: 0.2)")
    ap.add_argument("--size", type=int, default=256, help="working size in pixels, a multiple of 2^(depth-1)")
    ap.add_argument("--train-images", type=int, default=512)
    ap.add_argument("--mc-images", type=int, default=256)
    ap.add_argument("--passes", type=int, default=20, help="MC passes T")
    ap.add_argument("--batch-size", type=int, default=8, help="training batch (the presets' 8)")
    ap.add_argument("--mc-batch-size", type=int, default=16, help="MC scoring batch (alseg's default 16)")
    ap.add_argument("--json", action="store_true", help="print the JSON object on one line")
    args = ap.parse_args()

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    channels = 3
    n_data = max(args.train_images, args.mc_images)
    log(f"generating {n_data} images of {args.size} px")
    images, masks = generated_data(n_data, args.size)
    norm = Normalizer.fit(images)
    cfg_model = ModelConfig(in_channels=channels, width=args.width, depth=args.depth, dropout=args.dropout)

    res: dict = {"benchmark": "gpu_speed", "machine": machine(device),
                 "settings": {"width": args.width, "depth": args.depth, "dropout": args.dropout,
                              "dropout_scope": cfg_model.dropout_scope, "size": args.size,
                              "train_images": args.train_images, "batch_size": args.batch_size,
                              "mc_images": args.mc_images, "passes": args.passes,
                              "mc_batch_size": args.mc_batch_size, "data": "generated"}}

    probe = UNet(cfg_model).to(device)
    gflop = forward_gflop(probe, channels, args.size, device)
    res["model"] = {"parameters": count_parameters(probe), "gflop_per_pass": round(gflop, 4),
                    "gflop_per_train_step_image": round(3 * gflop, 4)}
    del probe
    log(f"{res['model']['parameters']:,} parameters, {gflop:.2f} GFLOP per forward pass of one image")

    # (a) training: 2 epochs, the second timed
    train = {}
    trained = None
    for precision in ("auto", "fp32"):
        torch.manual_seed(0)
        model = UNet(cfg_model)
        cfg = TrainConfig(epochs=2, batch_size=args.batch_size, lr=1e-4, augment=True, device=str(device),
                          precision=precision)
        epochs: list[dict] = []
        reset_peak(device)
        log(f"training, precision {precision}: 2 epochs of {args.train_images} images")
        t0 = time.perf_counter()
        fit(model, images[:args.train_images], masks[:args.train_images], None, None, cfg, norm, size=args.size,
            on_epoch=epochs.append, seed=0)
        sync(device)
        wall = time.perf_counter() - t0
        seconds = epochs[-1]["seconds"]
        rate = args.train_images / seconds
        train[precision] = {"autocast": dtype_name(resolve_precision(precision, device)),
                            "image_steps_per_s": round(rate, 2), "timed_epoch_s": round(seconds, 3),
                            "warmup_epoch_s": round(epochs[0]["seconds"], 3), "fit_wall_s": round(wall, 3),
                            "tflop_per_s": round(3 * gflop * rate / 1e3, 3), "peak_gpu_mib": peak_mib(device),
                            "train_loss_last_epoch": round(float(epochs[-1]["train_loss"]), 4)}
        log(f"  {rate:.1f} image-steps/s (epoch 2: {seconds:.2f} s; warm-up epoch {epochs[0]['seconds']:.2f} s)")
        if precision == "auto":
            trained = model
        else:
            del model
    res["train"] = train

    # (b) MC-dropout scoring at the default precision, on the model trained at "auto"
    mc_images = images[:args.mc_images]
    idx = np.arange(args.mc_images)
    warm = idx[:min(args.mc_batch_size, args.mc_images)]
    reset_peak(device)
    log(f"MC dropout warm-up: {len(warm)} images x {args.passes} passes")
    mc_dropout(trained, mc_images, warm, norm, passes=args.passes, batch_size=args.mc_batch_size, device=device)
    log(f"MC dropout: {args.mc_images} images x {args.passes} passes, batch {args.mc_batch_size}")
    sync(device)
    t0 = time.perf_counter()
    result = mc_dropout(trained, mc_images, idx, norm, passes=args.passes, batch_size=args.mc_batch_size,
                        device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    rate = args.mc_images * args.passes / seconds
    res["mc"] = {"autocast": dtype_name(resolve_precision(mc_precision("auto", device), device)),
                 "passes_per_s": round(rate, 2), "images_per_s": round(args.mc_images / seconds, 2),
                 "seconds": round(seconds, 3), "tflop_per_s": round(gflop * rate / 1e3, 3),
                 "peak_gpu_mib": peak_mib(device),
                 "variance_score_mean": round(float(np.mean(result.variance)), 4)}
    log(f"  {rate:.1f} image-passes/s ({seconds:.2f} s)")

    at_target_size = args.width == TARGETS["width"] and args.size == TARGETS["size"] and device.type == "cuda"
    res["targets"] = {**TARGETS,
                      "train_met": (train["auto"]["image_steps_per_s"] >= TARGETS["train_image_steps_per_s"])
                      if at_target_size else None,
                      "mc_met": (res["mc"]["passes_per_s"] >= TARGETS["mc_passes_per_s"]) if at_target_size else None,
                      "train_ratio": round(train["auto"]["image_steps_per_s"] / TARGETS["train_image_steps_per_s"], 3),
                      "mc_ratio": round(res["mc"]["passes_per_s"] / TARGETS["mc_passes_per_s"], 3),
                      "note": "met/not met only judged on CUDA at width 64, 256 px; ratios are for reference"}
    res["total_s"] = round(time.perf_counter() - t_start, 2)
    print(json.dumps(res, separators=(",", ":")) if args.json else json.dumps(res, indent=2), flush=True)


if __name__ == "__main__":
    main()
