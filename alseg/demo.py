"""``alseg demo``: a small end-to-end run that works on a fresh machine with no data.

Without ``--data`` it generates the synthetic lesion dataset (:mod:`alseg.data.synthetic`) in the
cache folder and runs the ``demo`` preset on it; with ``--data`` it uses the quick preset of that
layout, scaled down to finish in minutes.
"""
from __future__ import annotations

from pathlib import Path

from alseg.config import build_config, preset_for_format
from alseg.data.cache import default_cache_dir
from alseg.data.sources import detect_format
from alseg.data.synthetic import make_synthetic
from alseg.experiment import train_supervised
from alseg.progress import SILENT, Reporter


def run_demo(data: str | Path | None, out: str | Path, reporter: Reporter = SILENT) -> dict:
    if data is None:
        data = make_synthetic(default_cache_dir() / "synthetic-lesions-v1")
        reporter.note(f"no --data: using generated lesion-like images (synthetic) in {data}")
        cfg = build_config("demo", overrides={"data": {"path": str(data), "format": "folder"}})
    else:
        fmt = detect_format(data)
        cfg = build_config(preset_for_format(fmt), overrides={
            "data": {"path": str(data), "format": fmt, "size": 64}, "model": {"width": 8}, "train": {"epochs": 4}})
    return train_supervised(cfg, out, reporter=reporter)
