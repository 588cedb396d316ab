"""What the benchmarks share: the record of the machine they ran on (CPU model, bf16/AMX support,
threads, versions) and how a result is written out."""
from __future__ import annotations

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
            "numpy": np.__version__, "python": platform.python_version()}


def emit(result: dict, path: Path | None, shown: object = None) -> None:
    """Print ``result`` as indented JSON (or only ``shown``, when given) and write it to ``path``."""
    text = json.dumps(result, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text if shown is None else json.dumps(shown, indent=2))
