"""Learning from a lab's first masks: test Dice after training on 10 to 160 expert masks.

For each dataset (ISIC 2017 at quick-isic, LGG at quick-lgg), label count n and seed, n masks
are drawn at random from the train part of one fixed split (split seed 0, whatever the seed: one
test set per dataset that nothing here is chosen on). As in a lab's project, a fifth of them
(whole patients on LGG) validate and keep the best epoch (``carve_validation``) and the rest
train round 0's model. Each run reports the kept model's Dice on the dataset's validation split
(what settings are chosen on) and on the test split (what is reported), the last epoch's too,
and its training seconds on one CPU thread.

Variants (each a set of config overrides on the preset; ``today`` undoes this work's additions):

* ``today``: the presets before this work: epochs only (16 images at batch 8 are 2 steps an
  epoch), no warm-up, standard augmentation, no pre-training;
* ``steps``: + a floor of 20 optimiser steps an epoch (``train.min_epoch_steps``; 500 in quick-isic's 25
  epochs) and a 50-step warm-up;
* ``pretrain``: ``steps`` + self-supervised pre-training on the train and validation images
  (``alseg.pretrain``, inpainting), once per dataset and seed, shared by every n;
* ``denoise``: ``steps`` + pre-training by denoising instead (the method comparison);
* ``strong``: ``pretrain`` + stronger augmentation (``train.augment_strength: strong``);
* ``all``: the presets as they are now (every piece this work kept).

``--head-start`` also builds, per dataset and seed, a project of 20 masks and 200 unlabelled
train images for ``today`` and ``all``, asks ``alseg query -n 10`` for its first batch and scores
the exported predicted masks against the true ones at the images' own size: the median Dice and
the share an expert could accept as is (Dice >= 0.9). A batch that offers no head start (a model
no better than a constant mask) scores as an empty mask.

Children run ``--jobs`` at a time with one thread each; finished results in ``--out`` are reused.

    .venv/bin/python benchmarks/cold_start.py --dataset isic --counts 10 20 40 80 160 --seeds 0 1 2 \\
        --variants today steps pretrain all --jobs 2 --out /tmp/cold-start --json benchmarks/results/cpu-cold-start-isic.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
DATA = {"isic": ROOT.parent / "shared" / "data" / "isic", "lgg": ROOT.parent / "shared" / "data" / "lgg"}
PRESET = {"isic": "quick-isic", "lgg": "quick-lgg"}
TODAY = {"train": {"min_epoch_steps": 0, "warmup_steps": 0, "augment_strength": "standard"},
         "pretrain": {"enabled": False}}
STEPS = {"train": {"min_epoch_steps": 20, "warmup_steps": 50, "augment_strength": "standard"},
         "pretrain": {"enabled": False}}
VARIANTS = {
    "today": TODAY,
    "steps": STEPS,
    "pretrain": {**STEPS, "pretrain": {"enabled": True, "method": "inpaint"}},
    "denoise": {**STEPS, "pretrain": {"enabled": True, "method": "denoise"}},
    "strong": {"train": {**STEPS["train"], "augment_strength": "strong"},
               "pretrain": {"enabled": True, "method": "inpaint"}},
    "all": {},
}


def _config(dataset: str, variant: str, seed: int):
    from alseg.config import build_config

    return build_config(PRESET[dataset], overrides={**VARIANTS[variant], "seed": seed,
                                                     "train": {**VARIANTS[variant].get("train", {}), "device": "cpu"},
                                                     "data": {"path": str(DATA[dataset])}})


def _fixed(dataset: str, size: int):
    """The dataset's pixels and its one fixed split (split seed 0)."""
    from alseg.config import build_config
    from alseg.data import load_cached, open_dataset
    from alseg.data.splits import make_split

    cfg = build_config(PRESET[dataset])
    data = load_cached(open_dataset(DATA[dataset]), size)
    split = make_split(data.ids, has_mask=data.has_mask, positive=data.positive, groups=data.groups,
                       subsets=data.subsets, preset=cfg.data.split_preset, seed=0)
    return data, split


def labelled_subset(split, data, n: int, seed: int) -> tuple[list[str], list[str]]:
    """``(train ids, validation ids)``: n random train-split images, a fifth of them for validation."""
    import numpy as np

    from alseg.data.splits import carve_validation

    rng = np.random.default_rng(1000 + seed)
    chosen = [split.train[i] for i in sorted(rng.choice(len(split.train), n, replace=False))]
    group_of = dict(zip(data.ids, data.groups))
    val = carve_validation(chosen, [group_of[i] for i in chosen], seed)
    return [i for i in chosen if i not in set(val)], val


def one_run(job: dict) -> dict:
    """Train one (dataset, variant, n, seed) model in this process; its Dice and seconds."""
    import torch

    from alseg.metrics import dice_per_image
    from alseg.model import UNet
    from alseg.pretrain import load_into, pretrain
    from alseg.runtime import Normalizer, seed_everything
    from alseg.train import Checkpoint, epoch_steps, fit, predict_probs

    torch.set_num_threads(1)
    cfg = _config(job["dataset"], job["variant"], job["seed"])
    data, split = _fixed(job["dataset"], cfg.data.size)
    cfg.model = type(cfg.model)(**{**cfg.model.to_dict(), "in_channels": data.channels})
    train_ids, val_ids = labelled_subset(split, data, job["n"], job["seed"])
    normalizer = Normalizer.fit(data.images[data.indices(list(split.train))])  # as the loop: every train image
    seed_everything(job["seed"])
    model = UNet(cfg.model)
    pretrain_facts = None
    if cfg.pretrain.enabled:
        ids = list(split.train) + list(split.val)
        pre = pretrain(data.images[data.indices(ids)], cfg.model, normalizer, cfg.pretrain,
                       folder=Path(job["out"]) / "pretrain" / f"{job['dataset']}-s{job['seed']}-{cfg.pretrain.method}",
                       ids=ids, seed=job["seed"], device="cpu")
        load_into(model, pre["weights"])
        pretrain_facts = {k: pre[k] for k in ("steps", "seconds", "images", "reused")}
    ti, vi = data.indices(train_ids), data.indices(val_ids)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        result = fit(model, data.images[ti], data.masks[ti], data.images[vi], data.masks[vi], cfg.train, normalizer,
                     size=data.size, checkpoint_dir=tmp, seed=job["seed"])
        seconds = time.process_time() - t0
        scores = {}
        for which in ("best", "last"):
            ckpt = Checkpoint.load(Path(tmp) / f"{which}.pt")
            for part in ("val", "test"):
                idx = data.indices(list(getattr(split, part)))
                probs = predict_probs(ckpt.model, data.images[idx], normalizer)
                scores[f"{which}_{part}_dice"] = float(dice_per_image(probs > 0.5, data.masks[idx] > 0).mean())
    return {**job, "train_images": len(train_ids), "val_images": len(val_ids), "best_epoch": result["best_epoch"],
            "small_val_dice": result["best_val_dice"], "steps": cfg.train.epochs * epoch_steps(len(train_ids), cfg.train),
            "cpu_seconds": seconds, "pretrain": pretrain_facts, **scores}


def head_start(job: dict) -> dict:
    """A 20-mask project's first exported batch against the truth (see the module docstring)."""
    import csv

    import numpy as np
    import torch
    from PIL import Image

    from alseg.data import open_dataset
    from alseg.data.imageio import read_mask
    from alseg.metrics import dice_per_image
    from alseg.project import init_project, query

    torch.set_num_threads(1)
    cfg = _config(job["dataset"], job["variant"], job["seed"])
    data, split = _fixed(job["dataset"], cfg.data.size)
    train_ids, val_ids = labelled_subset(split, data, 20, job["seed"])
    labelled = set(train_ids) | set(val_ids)
    rng = np.random.default_rng(2000 + job["seed"])
    rest = [i for i in split.train if i not in labelled]
    pool = [rest[k] for k in sorted(rng.choice(len(rest), 200, replace=False))]
    samples = {s.id: s for s in open_dataset(DATA[job["dataset"]]).samples}
    root = Path(job["out"]) / "head-start" / f"{job['dataset']}-{job['variant']}-s{job['seed']}"
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    groups = ["image,group"]
    for i in sorted(labelled | set(pool)):  # ids are unique file stems in both layouts
        s = samples[i]
        (images / f"{i}{s.image.suffix}").symlink_to(s.image)
        if i in labelled:
            (masks / f"{i}_mask{s.mask.suffix}").symlink_to(s.mask)
        if s.group is not None:
            groups.append(f"{i}{s.image.suffix},{s.group}")
    if len(groups) > 1:
        (images / "groups.csv").write_text("\n".join(groups) + "\n")  # LGG: patients stay together
    project = root / "project"
    t0 = time.time()
    init_project(project, images, masks, preset=PRESET[job["dataset"]], pretrain=cfg.pretrain.enabled,
                 overrides={**VARIANTS[job["variant"]], "seed": job["seed"],
                            "train": {**VARIANTS[job["variant"]].get("train", {}), "device": "cpu"}})
    result = query(project, n=10)
    seconds = time.time() - t0
    folder = Path(result["batch"]["folder"])
    dices = []
    with open(folder / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            truth = read_mask(samples[row["id"]].mask)
            if row["predicted"]:
                pred = np.asarray(Image.open(folder / row["predicted"]).convert("L")) >= 128
            else:
                pred = np.zeros_like(truth)
            dices.append(float(dice_per_image(pred[None], truth[None])[0]))
    return {**job, "kind": "head_start", "dice": dices, "median_dice": float(np.median(dices)),
            "accept_share": float(np.mean(np.array(dices) >= 0.9)), "offered": result["warning"] is None,
            "round0_val_dice": result["rounds"][0]["val_dice"], "wall_seconds": seconds}


def _result_path(out: Path, job: dict) -> Path:
    kind = "head" if job.get("head_start") else "run"
    return out / "results" / f"{kind}-{job['dataset']}-{job['variant']}-n{job['n']}-s{job['seed']}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATA), required=True)
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 20, 40, 80, 160])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["today", "steps", "pretrain", "all"], choices=sorted(VARIANTS))
    ap.add_argument("--head-start", action="store_true", help="Also measure a 20-mask project's first batch.")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-cold-start"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the summary here.")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: one job as JSON
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        result = head_start(job) if job.get("head_start") else one_run(job)
        path = _result_path(Path(job["out"]), job)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
        return
    jobs = [{"dataset": args.dataset, "variant": v, "n": n, "seed": s, "out": str(args.out)}
            for s in args.seeds for v in args.variants for n in args.counts]
    # the pre-training of a (dataset, seed, method) runs once: the first job of each goes first, alone
    pre = {}
    for job in jobs:
        method = VARIANTS[job["variant"]].get("pretrain", {}).get("method") if job["variant"] != "today" else None
        if job["variant"] in ("pretrain", "denoise", "strong", "all"):
            pre.setdefault((job["seed"], method), job)
    first = list(pre.values())
    rest = [j for j in jobs if j not in first]
    if args.head_start:
        rest += [{**j, "n": 20, "variant": v, "head_start": True} for v in ("today", "all")
                 for j in [{"dataset": args.dataset, "seed": s, "out": str(args.out)} for s in args.seeds]]
    _run_children(first, args.jobs)
    _run_children(rest, args.jobs)
    summary = summarize(args.out, args.dataset)
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


def _run_children(jobs: list[dict], parallel: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    todo = [j for j in jobs if not _result_path(Path(j["out"]), j).is_file()]
    running: list[tuple[dict, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            print(f"[cold_start {time.strftime('%H:%M:%S')}] {_result_path(Path(job['out']), job).stem}",
                  file=sys.stderr, flush=True)
            running.append((job, subprocess.Popen([sys.executable, __file__, "--dataset", job["dataset"], "--one",
                                                   json.dumps(job)], env=env, cwd=ROOT, stderr=subprocess.PIPE,
                                                  text=True)))
        time.sleep(2)
        for item in list(running):
            job, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                for _, other in running:
                    other.kill()
                sys.exit(f"{job} failed: {proc.stderr.read()[-3000:]}")


def summarize(out: Path, dataset: str) -> dict:
    """Per variant and n: mean (and per-seed) test and validation Dice, seconds; head-start figures."""
    import numpy as np

    runs = [json.loads(p.read_text()) for p in sorted((out / "results").glob(f"run-{dataset}-*.json"))]
    heads = [json.loads(p.read_text()) for p in sorted((out / "results").glob(f"head-{dataset}-*.json"))]
    table: dict = {}
    for r in runs:
        cell = table.setdefault(r["variant"], {}).setdefault(str(r["n"]), {"seeds": []})
        cell["seeds"].append(r["seed"])
        for key in ("best_test_dice", "best_val_dice", "last_test_dice", "last_val_dice", "cpu_seconds", "steps"):
            cell.setdefault(key, []).append(r[key])
    for variant in table.values():
        for cell in variant.values():
            for key in [k for k in cell if k != "seeds"]:
                cell[f"mean_{key}"] = round(float(np.mean(cell[key])), 4)
    pretraining = {}
    for r in runs:
        if r.get("pretrain") and not r["pretrain"]["reused"]:
            pretraining[f"{r['variant']}-s{r['seed']}"] = r["pretrain"]
    head = {}
    for h in heads:
        cell = head.setdefault(h["variant"], {"seeds": [], "median_dice": [], "accept_share": [], "offered": []})
        for key in ("median_dice", "accept_share", "offered"):
            cell[key].append(h[key])
        cell["seeds"].append(h["seed"])
    return {"dataset": dataset, "preset": PRESET[dataset], "machine": machine_info(), "variants": VARIANTS,
            "dice": table, "pretraining": pretraining, "head_start": head}


if __name__ == "__main__":
    main()
