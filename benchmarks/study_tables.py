"""Markdown tables of an `alseg compare` summary (OUT/compare.json), for docs/benchmarks.md.

Prints, from the numbers `alseg compare` computed (nothing is recomputed here): test Dice at each
label count (mean over seeds and 95 % bootstrap interval), AULC, labels to 95 % of full
supervision, and the paired differences against random.

    .venv/bin/python benchmarks/study_tables.py OUT/compare.json
"""
from __future__ import annotations

import json
import sys


def _ci(mean, lo, hi, digits=3) -> str:
    if mean is None:
        return "–"
    if lo is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _signed(summary: dict | None, digits=3) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    star = " *" if summary.get("excludes_zero") else ""
    return f"{summary['mean']:+.{digits}f} [{summary['lo']:+.{digits}f}, {summary['hi']:+.{digits}f}]{star}"


def tables(summary: dict) -> str:
    strategies = summary["strategies"]
    first = next(iter(strategies.values()))
    xs = first["curve"]["x"]
    lines = ["| strategy | " + " | ".join(f"{x:.0f} labels" for x in xs) + " | AULC | labels to 95 % of full |",
             "| --- |" + " --- |" * (len(xs) + 2)]
    for name, s in strategies.items():
        c = s["curve"]
        cells = [_ci(m, lo, hi) for m, lo, hi in zip(c["mean"], c["lo"], c["hi"])]
        aulc = _ci(s["aulc"], *(s["aulc_interval"] or (None, None)))
        reached = s["labels_to_95pct_full_per_seed"]
        if s["labels_to_95pct_full"] is not None:
            labels = _ci(s["labels_to_95pct_full"], *(s["labels_to_95pct_full_interval"] or (None, None)), digits=0)
        else:
            labels = "not reached in " + f"{sum(r is None for r in reached)} of {len(reached)} seeds"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {aulc} | {labels} |")
    lines += ["", "| strategy - random (paired by seed) | AULC | final test Dice | labels to 95 % of full | per seed (AULC) |",
              "| --- | --- | --- | --- | --- |"]
    for name, s in strategies.items():
        diff = s.get("vs_random")
        if not diff:
            continue
        per_seed = ", ".join(f"{v:+.3f}" for v in diff["aulc"]["per_seed"])
        lines.append(f"| {name} | {_signed(diff['aulc'])} | {_signed(diff['final_dice'])} | "
                     f"{_signed(diff['labels_to_95pct_full'], 0)} | {per_seed} |")
    per_seed_full = ((summary.get("full") or {}).get("test_dice") or {}).get("per_seed")
    lines += ["", f"Seeds: {summary['seeds']}; full supervision test Dice per seed: "
              + (", ".join(f"{v:.3f}" for v in per_seed_full) if per_seed_full else "not run")
              + "; `*`: the interval excludes zero."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables(json.load(open(sys.argv[1]))))
