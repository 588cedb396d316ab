"""What the benchmarks record about the machine they ran on: CPU model, bf16/AMX support, threads, versions."""
from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    import numpy as np
    import torch

    model, flags = None, set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if flags and model:
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "amx_tile": "amx_tile" in flags, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
