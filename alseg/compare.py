"""Comparing strategies: run (or reuse) one run per strategy and seed, plus full supervision.

Owns the layout of a comparison folder and its summary:

* ``OUT/runs/<strategy>-s<seed>/``: ordinary run directories (resumed when unfinished, reused
  when finished, so ``alseg compare`` resumes like ``alseg run``);
* ``OUT/runs/full-s<seed>/``: with ``full``, supervised training on the whole train split with the
  same preset (the full-supervision reference);
* ``OUT/compare.png``: test Dice against expert labels, a band of ±1 standard deviation over seeds,
  the full-supervision line and the paper's reported Dice;
* ``OUT/compare.json`` and ``OUT/compare.csv``: per strategy, the expert labels needed to reach
  95 % of the full-supervision Dice (first round at or above it; per seed and mean) and the test
  Dice at 50 % labels (linear interpolation between rounds; null when the runs stop earlier).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from alseg.config import PAPER_DICE, ExperimentConfig
from alseg.errors import AlsegError
from alseg.experiment import train_supervised
from alseg.active.loop import run_active
from alseg.progress import SILENT, Reporter
from alseg.store import RunStore, atomic_write_bytes, atomic_write_text
from alseg.active.strategies import STRATEGIES


def _finished_full(run_dir: Path) -> float | None:
    if not (run_dir / "run.db").is_file():
        return None
    with RunStore.open_readonly(run_dir) as store:
        ev = [e for e in store.evaluations() if e["split"] == "test"]
    return ev[0]["mean_dice"] if ev else None


def dice_at(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """The curve's value at ``target`` labels, interpolated linearly; None outside the curve."""
    if not len(x) or target < x[0] or target > x[-1]:
        return None
    return float(np.interp(target, x, y))


def labels_to_reach(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    for xi, yi in zip(x, y):
        if yi >= target:
            return float(xi)
    return None


def compare(config: ExperimentConfig, out: str | Path, *, strategies: Sequence[str], seeds: int = 3,
            full: bool = False, reporter: Reporter = SILENT) -> dict:
    """Run every strategy for seeds 0..seeds-1 (resuming or reusing runs in ``out``) and summarise."""
    from alseg.report import figures  # matplotlib only when a figure is drawn

    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise AlsegError(f"unknown strategy {bad[0]!r}; choose from {', '.join(STRATEGIES)}")
    if seeds < 1:
        raise AlsegError("--seeds must be at least 1")
    out = Path(out)
    runs = out / "runs"
    results: dict[str, list[dict]] = {s: [] for s in strategies}
    full_dice: dict[int, float] = {}
    train_size = None
    for seed in range(seeds):
        cfg = dataclasses.replace(config, seed=seed)
        if full:
            run_dir = runs / f"full-s{seed}"
            dice = _finished_full(run_dir)
            if dice is None:
                if run_dir.exists():  # an interrupted supervised run: start it again
                    import shutil

                    shutil.rmtree(run_dir)
                reporter.note(f"full supervision, seed {seed}")
                dice = train_supervised(cfg, run_dir, full=True, reporter=reporter)["test"]["mean_dice"]
            full_dice[seed] = dice
        for strategy in strategies:
            run_dir = runs / f"{strategy}-s{seed}"
            reporter.note(f"{strategy}, seed {seed}")
            s_cfg = dataclasses.replace(cfg, active=dataclasses.replace(cfg.active, strategy=strategy))
            if (run_dir / "run.db").is_file():
                result = run_active(resume=run_dir, reporter=reporter)
            else:
                result = run_active(s_cfg, run_dir, reporter=reporter)
            with RunStore.open_readonly(run_dir) as store:
                train_size = len(store.split()["train"])
            results[strategy].append({"seed": seed, "rounds": result["rounds"]})
    summary = _summarise(results, full_dice, train_size)
    paper = PAPER_DICE.get(config.data.split_preset)
    curves = {s: summary["strategies"][s]["curve"] for s in strategies}
    full_line = None
    if full_dice:
        values = list(full_dice.values())
        full_line = (float(np.mean(values)), float(np.std(values)))
    figures.learning_curves(out / "compare.png", f"{config.preset}: test Dice vs expert labels ({seeds} seed"
                            f"{'s' if seeds > 1 else ''})", curves, train_size=train_size, full=full_line, paper=paper)
    summary.update({"preset": config.preset, "seeds": seeds, "paper_dice": paper, "figure": str(out / "compare.png"),
                    "full_dice": full_line[0] if full_line else None})
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["strategy", "labels_to_95pct_full_mean", "labels_to_95pct_full_per_seed", "dice_at_50pct_labels",
                     "final_dice_mean", "final_expert_labels"])
    for s in strategies:
        t = summary["strategies"][s]
        writer.writerow([s, t["labels_to_95pct_full"], " ".join(map(str, t["labels_to_95pct_full_per_seed"])),
                         t["dice_at_50pct_labels"], t["final_dice"], t["final_expert_labels"]])
    atomic_write_bytes(out / "compare.csv", buf.getvalue().encode())
    return summary


def _summarise(results: dict[str, list[dict]], full_dice: dict[int, float], train_size: int | None) -> dict:
    out = {"train_size": train_size, "strategies": {}}
    for strategy, per_seed in results.items():
        n_rounds = min(len(r["rounds"]) for r in per_seed)
        xs = np.array([[r["rounds"][k]["expert_labelled"] for k in range(n_rounds)] for r in per_seed], float)
        ys = np.array([[r["rounds"][k]["test_dice"] for k in range(n_rounds)] for r in per_seed], float)
        x, mean, std = xs.mean(0), ys.mean(0), ys.std(0)
        need = [labels_to_reach(xs[i], ys[i], 0.95 * full_dice[r["seed"]]) if r["seed"] in full_dice else None
                for i, r in enumerate(per_seed)]
        reached = [n for n in need if n is not None]
        out["strategies"][strategy] = {
            "curve": {"x": x.tolist(), "mean": mean.tolist(), "std": std.tolist(), "n": len(per_seed)},
            "labels_to_95pct_full_per_seed": need,
            "labels_to_95pct_full": float(np.mean(reached)) if reached and len(reached) == len(need) else None,
            "dice_at_50pct_labels": dice_at(x, mean, 0.5 * train_size) if train_size else None,
            "final_dice": float(mean[-1]), "final_expert_labels": float(x[-1]),
        }
    return out
