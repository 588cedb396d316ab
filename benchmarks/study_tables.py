"""Markdown tables of an `alseg compare` summary (OUT/compare.json), for docs/benchmarks.md.

Prints, from the numbers `alseg compare` computed (nothing is recomputed here): test Dice at each
label count (mean over seeds and interval: the seeds' range at 2-3 seeds, a 95 % bootstrap interval
above), AULC, labels to 95 % and 98 % of full supervision, and the paired differences against random
with their sign-flip p-values (summaries written before p-values existed show none).

    .venv/bin/python benchmarks/study_tables.py OUT/compare.json [--variant OTHER/compare.json]

With ``--variant``, a study of the same seeds made with one setting changed (compare keeps one
setting per folder; e.g. ``active: {ceal: {pseudo_skip_empty: true}}``) is paired by seed with the
first: each of its strategies against the first study's random and its own namesake there, per seed
(AULC and final test Dice). Pairing needs the same round 0, which is checked (round-0 test Dice).

With ``--training OUT/runs``, how much each strategy trained per round, from the runs' stores (mean
over seeds): expert labels, pseudo-labels, and optimiser steps (each round's recorded
``train_steps``): pseudo-labels give a strategy more steps unless ``--round-steps`` fixed them.

    .venv/bin/python benchmarks/study_tables.py --training OUT/runs
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
    p = summary.get("p_value")
    tail = f", p = {p:.3g}" if p is not None else (" *" if summary.get("excludes_zero") else "")
    return f"{summary['mean']:+.{digits}f} [{summary['lo']:+.{digits}f}, {summary['hi']:+.{digits}f}]{tail}"


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
    for baseline in summary.get("baselines") or ["random"]:  # summaries made before fg-random paired with random
        lines += ["", f"| strategy - {baseline} (paired by seed) | AULC | final test Dice | labels to 95 % of full "
                  "| labels to 98 % of full | per seed (AULC) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, s in strategies.items():
            diff = s.get(f"vs_{baseline}")
            if not diff:
                continue
            per_seed = ", ".join(f"{v:+.3f}" for v in diff["aulc"]["per_seed"])
            lines.append(f"| {name} | {_signed(diff['aulc'])} | {_signed(diff['final_dice'])} | "
                         f"{_signed(diff['labels_to_95pct_full'], 0)} | "
                         f"{_signed(diff.get('labels_to_98pct_full'), 0)} | {per_seed} |")
    per_seed_full = ((summary.get("full") or {}).get("test_dice") or {}).get("per_seed")
    lines += ["", f"Seeds: {summary['seeds']}; full supervision test Dice per seed: "
              + (", ".join(f"{v:.3f}" for v in per_seed_full) if per_seed_full else "not run")
              + "; p: paired sign-flip test (`*` in older summaries: the interval excludes zero)."]
    return "\n".join(lines)


def variant_table(base: dict, variant: dict) -> str:
    """Per-seed differences of ``variant``'s strategies against ``base``'s random and namesakes."""
    seeds = variant["seed_list"]
    if any(s not in base["seed_list"] for s in seeds):
        raise SystemExit(f"the variant's seeds {seeds} are not all in the base study's {base['seed_list']}")

    def run(summary: dict, name: str, seed: int) -> dict:
        return summary["runs"][f"{name}-s{seed}"]

    head = "".join(f"| seed {k} " for k in seeds) + "| mean |"
    lines = []
    for name in variant["strategies"]:
        for seed in seeds:
            mine = run(variant, name, seed)
            theirs = next((r for k, r in base["runs"].items() if k.endswith(f"-s{seed}") and "curve" in r), None)
            if theirs is None or mine["curve"]["test_dice"][0] != theirs["curve"]["test_dice"][0]:
                raise SystemExit(f"{name}-s{seed}: round 0 differs from the base study's "
                                 f"({mine['curve']['test_dice'][0]} vs {theirs and theirs['curve']['test_dice'][0]})")
        rows = [("AULC", lambda seed: run(variant, name, seed)["aulc"], "{:.3f}")]
        for ref in ("random", name):
            if any(f"{ref}-s{seed}" not in base["runs"] for seed in seeds):
                continue
            for key, label in (("aulc", "AULC"), ("final_dice", "final Dice")):
                rows.append((f"{label} - {ref}", lambda seed, ref=ref, key=key:
                             run(variant, name, seed)[key] - run(base, ref, seed)[key], "{:+.3f}"))
        lines += ["", f"| {name} (variant) " + head, "| --- |" + " --- |" * (len(seeds) + 1)]
        for label, value, fmt in rows:
            values = [value(seed) for seed in seeds]
            lines.append(f"| {label} | " + " | ".join(fmt.format(v) for v in values)
                         + f" | {fmt.format(sum(values) / len(values))} |")
    return "\n".join(lines[1:])


def training_rows(runs_dir: str) -> dict[str, list[dict]]:
    """Per active run of a study's runs folder, its rounds' expert labels, pseudo-labels and
    optimiser steps (each round's recorded ``train_steps``) and CPU threads (``threads``: runs in
    other threads take other float paths; None for runs stored before it was recorded), as
    :func:`training_table` reads them (and evidence_study.py keeps them in a part's summary, whose runs folder does not outlive it)."""
    from pathlib import Path

    from alseg.active.loop import status

    return {run.name: [{k: row[k] for k in ("expert_labelled", "pseudo_labelled", "train_steps", "threads")}
                       for row in status(run)["rounds"]]
            for run in sorted(Path(runs_dir).iterdir())
            if not run.name.startswith("full-") and (run / "run.db").is_file()}


def _threads_text(counts) -> str:
    found = sorted({c for c in counts if c is not None})
    return "" if not found else f", {'/'.join(map(str, found))} thread{'s' if found != [1] else ''}"


def training_table(rows: dict[str, list[dict]]) -> str:
    """Per strategy and round, mean over its seeds: expert labels, pseudo-labels and optimiser steps,
    and the thread counts it trained in where recorded, from :func:`training_rows` (runs named
    STRATEGY-sSEED)."""
    by_strategy: dict[str, list[list[dict]]] = {}
    for name, rounds_of_run in sorted(rows.items()):
        by_strategy.setdefault(name.rsplit("-s", 1)[0], []).append(rounds_of_run)
    rounds = max(len(r) for seeds in by_strategy.values() for r in seeds)
    lines = ["| strategy (seeds) | " + " | ".join(f"round {k}" for k in range(rounds)) + " |",
             "| --- |" + " --- |" * rounds]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    for name, seeds in by_strategy.items():
        cells = []
        for k in range(min(len(r) for r in seeds)):
            rows_k = [r[k] for r in seeds]
            steps = mean([row["train_steps"] for row in rows_k])
            cells.append(f"{mean([row['expert_labelled'] for row in rows_k]):.0f} + "
                         f"{mean([row['pseudo_labelled'] for row in rows_k]):.0f} pseudo, "
                         + ("– steps" if steps is None else f"{steps:.0f} steps")
                         + _threads_text(row.get("threads") for row in rows_k))
        cells += ["–"] * (rounds - len(cells))  # rounds not every seed has finished
        lines.append(f"| {name} ({len(seeds)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--training":
        print(training_table(training_rows(args[1])))
    elif len(args) == 3 and args[1] == "--variant":
        print(variant_table(json.load(open(args[0])), json.load(open(args[2]))))
    elif len(args) == 1:
        print(tables(json.load(open(args[0]))))
    else:
        raise SystemExit(__doc__)
