"""What the benchmarks share: the record of the machine they ran on (CPU model, bf16/AMX support,
threads, versions) and how a result is written out."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path


def machine_info() -> dict:
    import numpy as np
    import torch

    info: dict[str, str] = {}  # the first processor's lines: one machine's CPUs are alike
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    # "AMD EPYC" names several generations; family / model / stepping and the vector ISA torch
    # dispatches to (AVX2, AVX512) tell them apart, and with them the float paths a run takes
    family = "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(), "cpu_family_model": family,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "amx_tile": "amx_tile" in flags, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "float_fingerprint": float_fingerprint()}


def float_fingerprint() -> str:
    """A hash of the bits a fixed small U-Net computes in one thread: seeded weights and batch, a
    forward pass and three Adam steps. Runs repeat bit for bit on one machine in the same threads
    (LGG ceal seed 0 at equal steps, made again a session later on the same CPU model, AMD EPYC
    25/1/1: the same losses and test Dice to the last digit), but not in other threads: the same
    run in 2 threads rather than 1 scored the pool 5e-7 apart and trained 1e-7 apart from the
    first epoch, and chose other images by round 2. Other CPUs (AVX-512 against AVX2) differ more.
    This records, beside a part, the float path of its machine (unlike hashes: other bits; like
    ones: what to expect of runs made again there in one thread)."""
    import torch

    from alseg.model import ModelConfig, UNet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each job of ``compare --jobs`` on 2 cores
    try:
        with torch.random.fork_rng():  # the caller's global generator is left as it was
            torch.manual_seed(0)  # the weights
            return _three_adam_steps(UNet(ModelConfig(in_channels=3, width=8, depth=3, dropout=0.0)))
    finally:
        torch.set_num_threads(threads)


def _three_adam_steps(net) -> str:
    import torch

    gen = torch.Generator().manual_seed(0)  # the batch
    x = torch.rand(4, 3, 64, 64, generator=gen)
    y = (torch.rand(4, 1, 64, 64, generator=gen) > 0.7).float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    digest = hashlib.sha256()
    for _ in range(3):
        opt.zero_grad()
        out = net(x)
        torch.nn.functional.binary_cross_entropy_with_logits(out, y).backward()
        opt.step()
        digest.update(out.detach().numpy().tobytes())
    for p in net.parameters():
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()[:16]


def emit(result: dict, path: Path | None, shown: object = None) -> None:
    """Print ``result`` as indented JSON (or only ``shown``, when given) and write it to ``path``."""
    text = json.dumps(result, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text if shown is None else json.dumps(shown, indent=2))
