"""Selection across volumes (issue 30): uncertain slices, random slices, random volumes and
uncertain volumes on LGG whole patients, test Dice against the share of train slices labelled.

Chlebus et al. (2019) found uncertainty-sampled slices reached full-volume quality with 4 % of
the slices labelled, random slices with 6 % and random volumes (the expert labels whole scans)
with 14 %. Arms (``alseg.active.volumes``), each an active run of ``--preset`` (by default
``quick-lgg-volume``: 31 patients, every slice, test and validation patients whole):

* ``uncertain-slices``: strategy ``uncertainty`` (top-k MC variance), slices wherever they are;
* ``random-slices``: strategy ``random``;
* ``random-volumes``: strategy ``random`` with ``volume_selection: volumes``: random slices of a
  few random patients a round;
* ``uncertain-volumes``: ``uncertainty`` with ``volume_selection: volumes``: the most uncertain
  slices of the patients whose slices are most uncertain on average (``volume_score: mean``);
* ``uncertain-volumes-top3``: the same, patients ranked by their 3 most uncertain slices;
* ``uncertain-capped``: ``uncertainty`` on slices, at most ``--max-per-volume`` (default 3) of
  one patient a round.

``--max-per-volume`` sets the cap of the volume arms too (unset: a third of the batch). To
compare at Chlebus's shares the runs start from ``--labelled-fraction`` (2 %) of the train slices,
labelled at random, not the preset's 37.5 %, and take ``--rounds`` (8) rounds of the preset's
batch (35): about 15 % labelled at the end. Every arm of one seed shares that seed's round 0 (trained once, adopted by the others: it cannot
differ between them). Each round reports the test Dice (per volume, ``volume_dice_mean``, when
the run's evaluation has it, else the mean over slices), the mean Dice over slices, and the
share of the train split's slices an expert has labelled (the initial set included). The summary
gives, per arm, the mean curve over seeds and the share at which each seed's curve first reaches
95 % of the best final Dice of any arm (that seed's), the form of Chlebus's comparison.

Children run ``--jobs`` at a time with one thread each; a finished run's result in ``--out`` is
reused and an interrupted one resumed. Full size is for the lead's machine; a smoke test:

    .venv/bin/python benchmarks/volume_selection.py --preset quick-lgg --seeds 0 --rounds 1 --epochs 1 \\
        --round-epochs 1 --size 64 --width 4 --mc-passes 2 --batch-size 8 --jobs 2 --out /tmp/vs-smoke
    .venv/bin/python benchmarks/volume_selection.py --seeds 0 1 2 --jobs 2 --out /work/volume-selection \\
        --json benchmarks/results/cpu-volume-selection.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from children import run_children
from machine import emit, machine_info

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg"
ARMS = {
    "uncertain-slices": {"strategy": "uncertainty", "volume_selection": "slices"},
    "random-slices": {"strategy": "random", "volume_selection": "slices"},
    "random-volumes": {"strategy": "random", "volume_selection": "volumes"},
    "uncertain-volumes": {"strategy": "uncertainty", "volume_selection": "volumes", "volume_score": "mean"},
    "uncertain-volumes-top3": {"strategy": "uncertainty", "volume_selection": "volumes", "volume_score": "top3"},
    "uncertain-capped": {"strategy": "uncertainty", "volume_selection": "slices", "capped": True},
}
DEFAULT_ARMS = ["uncertain-slices", "random-slices", "random-volumes", "uncertain-volumes"]
REACH = 0.95  # share of the best final Dice a curve must reach


def config(job: dict):
    """The run's config: the preset, the arm's active settings and the smoke-test overrides."""
    from alseg.config import build_config

    arm = dict(ARMS[job["arm"]])
    capped = arm.pop("capped", False)
    cap = job.get("max_per_volume")
    if capped and cap is None:
        cap = 3
    if arm["volume_selection"] == "slices" and not capped:
        cap = None  # the slice arms are the strategies as they are
    s = job["settings"]
    return build_config(job["preset"], overrides={
        "seed": job["seed"], "data": {"path": job["data"], "size": s.get("size"),
                                      "labelled_fraction": s.get("labelled_fraction")},
        "model": {"width": s.get("width")},
        "train": {"device": s.get("device", "cpu"), "epochs": s.get("epochs")},
        "active": {**arm, "max_per_volume": cap, "rounds": s.get("rounds"), "batch_size": s.get("batch_size"),
                   "round_epochs": s.get("round_epochs"), "mc_passes": s.get("mc_passes")}})


def _run_dir(out: Path, job: dict) -> Path:
    return out / "runs" / f"{job['arm']}-s{job['seed']}"


def _result_path(out: Path, job: dict) -> Path:
    return out / "results" / f"{job['arm']}-s{job['seed']}.json"


def one_run(job: dict) -> dict:
    """Make (or resume) one arm's run with one seed, adopting the seed's round 0 from ``donor``."""
    import dataclasses

    import torch

    from alseg.active.loop import adopt_initial_round, run_active, start_run
    from alseg.rundata import open_run_data
    from alseg.store import RunStore

    torch.set_num_threads(1)
    out = Path(job["out"])
    run_dir = _run_dir(out, job)
    t0 = time.time()
    started = False
    if run_dir.is_dir():
        with RunStore.open_readonly(run_dir) as store:
            started = store.started()
    if not started:
        start_run(config(job), run_dir)
    adopted = bool(job.get("donor")) and adopt_initial_round(run_dir, _run_dir(out, {**job, "arm": job["donor"]}))
    result = run_active(resume=run_dir)
    with RunStore.open_readonly(run_dir) as store:
        tests = {e["round"]: e for e in store.evaluations() if e["split"] == "test"}
        data = open_run_data(store).data
    group = dict(zip(data.ids, data.groups))
    rounds = []
    for r in result["rounds"]:
        ev = tests.get(r["round"], {})
        train = r["expert_labelled"] + r["pool"]  # pseudo-labelled slices stay in the pool
        volume = ev.get("volume_dice_mean")
        rounds.append({"round": r["round"], "expert_labelled": r["expert_labelled"], "train_slices": train,
                       "share_labelled": r["expert_labelled"] / train,
                       "dice": volume if volume is not None else ev.get("mean_dice"),
                       "dice_kind": "volume_dice_mean" if volume is not None else "mean_dice",
                       "mean_dice": ev.get("mean_dice"), "volume_dice_mean": volume,
                       # patients the round's batch came from (round 0: the initial set's)
                       "patients_asked": len({group.get(i) for i in r["expert_ids"]} - {None}),
                       "seconds": r["seconds"]})
    active = {k: v for k, v in dataclasses.asdict(config(job).active).items() if k != "ceal"}
    return {**job, "active": active, "adopted_round0": adopted, "rounds": rounds, "stopped": result["stopped"],
            "wall_seconds": time.time() - t0}


def _run_children(jobs: list[dict], parallel: int) -> None:
    run_children(jobs, parallel, script=__file__, extra_args=lambda j: [],
                 done=lambda j: _result_path(Path(j["out"]), j).is_file(), label=lambda j: f"{j['arm']} seed {j['seed']}", tag="volume_selection")


def summarize(out: Path, arms: list[str], seeds: list[int], settings: dict, preset: str) -> dict:
    """Per arm: each seed's curve, the mean curve over seeds, the share labelled to reach 95 % of the
    best final Dice of the seed's arms, and the final Dice."""
    import numpy as np

    from alseg.stats import labels_to_reach

    results = {a: {} for a in arms}
    for arm in arms:
        for seed in seeds:
            path = _result_path(out, {"arm": arm, "seed": seed})
            if path.is_file():
                results[arm][seed] = json.loads(path.read_text())
    best = {}
    for seed in seeds:
        finals = [results[a][seed]["rounds"][-1]["dice"] for a in arms if seed in results[a]]
        if finals:
            best[seed] = max(finals)
    table = {}
    for arm in arms:
        runs = results[arm]
        if not runs:
            continue
        n = min(len(r["rounds"]) for r in runs.values())
        curve = [{"round": k,
                  "share_labelled": round(float(np.mean([r["rounds"][k]["share_labelled"] for r in runs.values()])), 4),
                  "dice": round(float(np.mean([r["rounds"][k]["dice"] for r in runs.values()])), 4),
                  "mean_dice": round(float(np.mean([r["rounds"][k]["mean_dice"] for r in runs.values()])), 4)}
                 for k in range(n)]
        reach = {}
        for seed, r in runs.items():
            share = labels_to_reach([x["share_labelled"] for x in r["rounds"]], [x["dice"] for x in r["rounds"]],
                                    REACH * best[seed], interpolate=True)
            reach[seed] = None if share is None else round(share, 4)
        table[arm] = {"settings": ARMS[arm], "seeds": sorted(runs), "dice_kind": runs[min(runs)]["rounds"][-1]["dice_kind"],
                      "curve": curve, "final_dice": {s: round(r["rounds"][-1]["dice"], 4) for s, r in runs.items()},
                      "mean_final_dice": round(float(np.mean([r["rounds"][-1]["dice"] for r in runs.values()])), 4),
                      f"share_to_{int(REACH * 100)}pct_of_best": reach,
                      "patients_asked_per_round": {s: [x["patients_asked"] for x in r["rounds"][1:]]
                                                   for s, r in runs.items()},
                      "per_seed": {s: r["rounds"] for s, r in runs.items()}}
    return {"preset": preset, "settings": settings, "seeds": seeds, "machine": machine_info(),
            "best_final_dice": best, "arms": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick-lgg-volume")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-per-volume", type=int, default=None,
                    help="cap of slices per patient a round in the volume arms and uncertain-capped")
    ap.add_argument("--labelled-fraction", type=float, default=0.02,
                    help="share of the train slices labelled at the start, at random (the preset's: 0.375)")
    ap.add_argument("--rounds", type=int, default=8, help="active rounds (with 35 slices a round and 2 %% at the "
                    "start, about 15 %% of LGG's train slices labelled at the end)")
    for name in ("batch-size", "epochs", "round-epochs", "mc-passes", "size", "width"):
        ap.add_argument(f"--{name}", type=int, default=None, help="override the preset's (smoke tests)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-volume-selection"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the summary here.")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: one job as JSON
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        result = one_run(job)
        path = _result_path(Path(job["out"]), job)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
        return
    settings = {"labelled_fraction": args.labelled_fraction, "rounds": args.rounds, "batch_size": args.batch_size, "epochs": args.epochs,
                "round_epochs": args.round_epochs, "mc_passes": args.mc_passes, "size": args.size,
                "width": args.width, "device": args.device, "max_per_volume": args.max_per_volume}
    out = args.out.resolve()
    if out.is_dir() and (out / "settings.json").is_file():  # finished runs are reused only for the same study
        before = json.loads((out / "settings.json").read_text())
        if before != {"preset": args.preset, "data": str(args.data), **settings}:
            sys.exit(f"{out} holds runs made with other settings ({before}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps({"preset": args.preset, "data": str(args.data), **settings}) + "\n")
    jobs = {seed: [{"arm": arm, "seed": seed, "preset": args.preset, "data": str(args.data), "out": str(out),
                    "settings": settings, "max_per_volume": args.max_per_volume} for arm in args.arms]
            for seed in args.seeds}
    # each seed's first arm trains round 0; the others then adopt it
    _run_children([js[0] for js in jobs.values()], args.jobs)
    _run_children([{**j, "donor": js[0]["arm"]} for js in jobs.values() for j in js[1:]], args.jobs)
    summary = summarize(out, args.arms, args.seeds, settings, args.preset)
    emit(summary, args.json)


if __name__ == "__main__":
    main()
