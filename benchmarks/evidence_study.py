"""The evidence studies of issue 31: CEAL, random and the ablations that separate selection from
pseudo-labels, over enough seeds for a paired test, on one fixed test split per dataset.

One ``alseg compare`` study per dataset (and per ``--round-steps`` setting), made in chunks of
``--chunk`` seeds (``--only-seeds``), so a study cut short leaves whole seeds (every arm and the
full-supervision reference of a seed), and resumed where it stopped when run again (every run is
resumable; finished runs are reused). Then one summarising call writes ``OUT/compare.json`` (and
``--json``, with the command) and prints the tables of ``study_tables.py``: per arm and round the
labels, pseudo-labels and optimiser steps, then the learning curves and the paired differences
against ``random`` and ``fg-random`` with their sign-flip p-values.

Arms (``--strategies``; the default is all five, made in two phases: ``ceal``, ``random`` and
``fg-random`` for every seed first, summarised then, so the headline comparison is whole before the
ablations start; then ``ceal-no-pseudo`` and ``random-pseudo``, and the summary of all five):

* ``ceal``: the method (expert batch of missed, uncertain and low-uncertainty random images, plus
  pseudo-labels behind the gate and cap);
* ``ceal-no-pseudo``: CEAL's expert batch alone: ceal against it is what pseudo-labels add;
* ``random``: the baseline;
* ``random-pseudo``: random's batch plus CEAL's pseudo-labels: against ceal, what selection adds
  when both have pseudo-labels;
* ``fg-random``: foreground-aware random (nnActive's baseline).

The test split is the same for every seed (``data.test_seed``: 0), so no seed's validation holds
another seed's test images. On LGG the final models are also scored on the test patients as whole
volumes, every slice (Buda et al.'s per-patient Dice; ``--external`` over a folder of links to those
patients' files, made in ``OUT``). Usage (CPU: about an hour of one core per LGG seed, two per ISIC
seed):

    .venv/bin/python benchmarks/evidence_study.py --dataset lgg --seeds 10 --out /work/studies31/lgg-default \\
        --json benchmarks/results/cpu-evidence-lgg.json
    .venv/bin/python benchmarks/evidence_study.py --dataset isic --seeds 5 --out /work/studies31/isic-default \\
        --json benchmarks/results/cpu-evidence-isic.json
    # equal training: every round of every arm the same optimiser steps; round 0 and the references
    # taken from the study above (they depend on no active-learning setting), not trained again
    .venv/bin/python benchmarks/evidence_study.py --dataset lgg --seeds 10 --round-steps 120 \
        --reuse-from /work/studies31/lgg-default --out /work/studies31/lgg-steps120 --json ...

A study longer than a session (the folders outside the checkout do not outlive it) is made in
parts: ``--seeds 0,1`` makes and summarises those seeds alone into their own ``--json`` (kept in
the repository with the commit that made them and each run's steps per round), and ``--merge``
the parts' files into the whole study's summary (``alseg merge``: nothing is trained, and parts
of other settings are refused; the default and equal-steps parts are named apart so that one
pattern picks one study's):

    .venv/bin/python benchmarks/evidence_study.py --dataset lgg --seeds 0,1 --out /work/lgg-default \\
        --json benchmarks/results/evidence-parts/cpu-evidence-lgg-default-s0-1.json
    .venv/bin/python benchmarks/evidence_study.py --dataset lgg --out /work/lgg-merged \\
        --merge benchmarks/results/evidence-parts/cpu-evidence-lgg-default-s*.json \\
        --json benchmarks/results/cpu-evidence-lgg.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
DATA = {"lgg": ROOT.parent / "shared" / "data" / "lgg", "isic": ROOT.parent / "shared" / "data" / "isic"}
PRESET = {"lgg": "quick-lgg", "isic": "quick-isic"}
PHASES = ("ceal,random,fg-random", "ceal-no-pseudo,random-pseudo")  # headline arms, then the ablations


def test_patients_folder(out: Path) -> Path:
    """``OUT/test-patients/kaggle_3m/<patient>/``: links to every slice (tumour-free ones too) of the
    LGG patients the study's runs were tested on (read from a finished run's split, not derived
    again), for scoring the final models per whole volume."""
    from alseg.config import build_config
    from alseg.data import load_cached, open_dataset
    from alseg.store import RunStore

    run = next(r for r in sorted((out / "runs").iterdir()) if (r / "run.db").is_file())
    with RunStore.open_readonly(run) as store:
        test_ids = store.split()["test"]
    data = load_cached(open_dataset(DATA["lgg"]), build_config(PRESET["lgg"]).data.size)
    folder = out / "test-patients"
    for patient in sorted({data.groups[k] for k in data.indices(test_ids)}):
        target = folder / "kaggle_3m" / patient
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted((DATA["lgg"] / "kaggle_3m" / patient).iterdir()):
            if not (target / f.name).is_symlink():
                (target / f.name).symlink_to(f)
    return folder


def seed_list(text: str) -> list[int]:
    """``--seeds``: N for seeds 0..N-1, or the seeds listed with commas (one alone: ``4,``)."""
    try:
        numbers = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        numbers = []
    seeds = sorted(set(numbers)) if "," in text else list(range(numbers[0])) if numbers else []
    if not seeds or seeds[0] < 0:
        raise SystemExit(f"--seeds takes N >= 1 or seeds >= 0 listed with commas, not {text!r}")
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(PRESET), required=True)
    ap.add_argument("--seeds", default="10", help="N for seeds 0..N-1, or the seeds listed with commas (one "
                                                  "alone: 4,): a part of the study, summarised alone and merged "
                                                  "with the other parts by --merge")
    ap.add_argument("--strategies", help="comma-separated arms, made in one phase (default: all five, in two)")
    ap.add_argument("--round-steps", type=int, help="optimiser steps of every active round (default: the preset's epochs)")
    ap.add_argument("--reuse-from", type=Path, help="a finished study's --out whose round 0 and references this "
                                                    "one takes (alseg compare --reuse-from)")
    ap.add_argument("--chunk", type=int, default=2, help="seeds made per compare call")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, help="also write the summary here, with the command, machine, commit and "
                                              "each run's steps per round (after each phase: the arms made so far)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="PART", help="the --json summaries of parts made "
                                                                          "apart (other sessions or machines) "
                                                                          "with the same settings: merged into "
                                                                          "--out and --json; nothing is trained")
    ap.add_argument("--smoke", action="store_true", help="tiny runs (32 px, width 4, 2 + 1 epochs, 1 round): "
                                                         "checks the script end to end in minutes, says nothing")
    args = ap.parse_args()
    import study_tables

    t0 = time.time()
    if args.merge:
        summary = _merge(args, t0)
    else:
        seeds = seed_list(args.seeds)
        phases = [args.strategies] if args.strategies else list(PHASES)
        arms: list[str] = []
        for phase in phases:
            arms += phase.split(",")
            common = [sys.executable, "-m", "alseg", "compare", "--preset", PRESET[args.dataset],
                      "--data", str(DATA[args.dataset]), "--strategies", ",".join(arms), "--seeds", args.seeds,
                      "--full", "--out", str(args.out)]
            if args.round_steps:
                common += ["--round-steps", str(args.round_steps)]
            if args.reuse_from:
                common += ["--reuse-from", str(args.reuse_from)]
            if args.smoke:
                common += ["--size", "32", "--width", "4", "--epochs", "2", "--round-epochs", "1", "--full-epochs",
                           "2", "--rounds", "1", "--mc-passes", "2"]
            for first in range(0, len(seeds), args.chunk):
                chunk = ",".join(str(s) for s in seeds[first:first + args.chunk])
                print(f"[evidence {time.strftime('%H:%M:%S')}] {','.join(arms)}: seeds {chunk}", file=sys.stderr,
                      flush=True)
                subprocess.run(common + ["--only-seeds", chunk, "--jobs", str(args.jobs)], check=True)
            summary = _summarise(args, common, {f"{a}-s{s}" for a in arms for s in seeds}, t0)
    print(study_tables.training_table(summary["study"]["training"]))
    print()
    print(study_tables.tables(summary))


def _commit() -> str:
    """The checkout's commit, with ``+changes`` when its tracked files differ from it: which code made a part."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return head + ("+changes" if dirty else "") if head else "unknown"


def _summarise(args: argparse.Namespace, common: list[str], names: set[str], t0: float) -> dict:
    """Summarise the runs made so far (every one is finished: nothing is trained here)."""
    import study_tables

    summary_cmd = common + ["--json"]
    if args.dataset == "lgg":
        summary_cmd += ["--external", str(test_patients_folder(args.out))]
    done = subprocess.run(summary_cmd, check=True, stdout=subprocess.PIPE, text=True)
    summary = json.loads(done.stdout)
    training = {k: v for k, v in study_tables.training_rows(str(args.out / "runs")).items() if k in names}
    summary["study"] = {"command": " ".join(sys.argv), "compare": " ".join(summary_cmd[1:]),
                        "machine": machine_info(), "commit": _commit(), "seconds_this_call": round(time.time() - t0),
                        "external": "the fixed test split's patients as whole volumes, every slice"
                                    if args.dataset == "lgg" else None,
                        "training": training}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _merge(args: argparse.Namespace, t0: float) -> dict:
    """One summary of parts made apart (``alseg merge`` checks their settings agree), with each
    part's seeds, commit and machine, and the runs' steps per round the parts kept."""
    parts = [(path, json.loads(path.read_text())) for path in args.merge]
    training: dict[str, list[dict]] = {}
    for path, part in parts:
        if not isinstance(part.get("study"), dict) or "training" not in part["study"]:
            raise SystemExit(f"{path}: not a part made by this script (no study record)")
        if part.get("preset") != PRESET[args.dataset]:
            raise SystemExit(f"{path}: a {part.get('preset')} study, not {PRESET[args.dataset]}")
        for name, rows in part["study"]["training"].items():
            if training.get(name, rows) != rows:
                raise SystemExit(f"{path}: run {name} is also in an earlier part, with other rounds")
            training[name] = rows
    cmd = [sys.executable, "-m", "alseg", "merge", *map(str, args.merge), "--out", str(args.out), "--json"]
    # stdout alone: a part merge refuses says why on stderr, which reaches the terminal
    summary = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
    summary["study"] = {"command": " ".join(sys.argv), "compare": " ".join(cmd[1:]), "commit": _commit(),
                        "seconds_this_call": round(time.time() - t0),
                        "parts": [{"file": str(path), "seeds": part["seed_list"], "commit": part["study"]["commit"],
                                   "machine": part["study"]["machine"]} for path, part in parts],
                        "external": parts[0][1]["study"]["external"], "training": training}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
