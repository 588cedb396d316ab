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


def emit(result: dict, path: Path | None, shown: object = None) -> None:
    """Print ``result`` as indented JSON (or only ``shown``, when given) and write it to ``path``."""
    text = json.dumps(result, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text if shown is None else json.dumps(shown, indent=2))
