"""``alseg demo``: a complete CEAL run that works on a fresh machine with no data.

Without ``--data`` it generates the synthetic lesion dataset (:mod:`alseg.data.synthetic`,
deterministic, clearly not real) in the cache folder and runs the ``demo`` preset on it; with
``--data`` it runs that layout's quick preset scaled down (64 px, width 8, 2 rounds of 2 epochs,
T = 10; the preset's initial epochs, which LGG needs) so it also ends in minutes on a CPU.
"""
from __future__ import annotations

from pathlib import Path

from alseg.config import build_config, preset_for_format
from alseg.data.cache import default_cache_dir
from alseg.data.sources import detect_format
from alseg.data.synthetic import make_synthetic
from alseg.loop import run_active
from alseg.progress import SILENT, Reporter

SYNTHETIC_IMAGES = 400


def synthetic_data(reporter: Reporter = SILENT) -> Path:
    """The generated lesion dataset (made once in the cache folder)."""
    data = make_synthetic(default_cache_dir() / f"synthetic-lesions-v1-{SYNTHETIC_IMAGES}", n=SYNTHETIC_IMAGES)
    reporter.note(f"no --data: using {SYNTHETIC_IMAGES} generated lesion-like images (synthetic) in {data}")
    return data


def run_demo(data: str | Path | None, out: str | Path, reporter: Reporter = SILENT) -> dict:
    if data is None:
        data = synthetic_data(reporter)
        cfg = build_config("demo", overrides={"data": {"path": str(data), "format": "folder"}})
    else:
        fmt = detect_format(data)
        cfg = build_config(preset_for_format(fmt), overrides={
            "data": {"path": str(data), "format": fmt, "size": 64}, "model": {"width": 8},
            "active": {"rounds": 2, "round_epochs": 2, "mc_passes": 10}})
    return run_active(cfg, out, reporter=reporter)
