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
* ``steps``: + at least 20 optimiser steps an epoch (``train.min_epoch_steps``; 500 in
  quick-isic's 25 epochs);
* ``warmup``: ``steps`` + a 50-step linear warm-up of the learning rate;
* ``pretrain``: ``steps`` + self-supervised pre-training on the train and validation images
  (``alseg.pretrain``, inpainting), once per dataset and seed, shared by every n;
* ``denoise``: ``steps`` + pre-training by denoising instead (the method comparison);
* ``strong``: ``pretrain`` + stronger augmentation (``train.augment_strength: strong``);
* ``cover``: ``pretrain``, but the n masks are those a project without masks would ask for first:
  one per k-means cluster of the pre-trained features, spread over patients (``alseg.active.coldstart``),
  against ``pretrain``'s random n;
* ``batchdice``, ``bce``: ``steps`` with another loss (``train.loss``): soft Dice over the batch +
  BCE, or BCE alone, against the presets' per-image soft Dice + BCE;
* ``all``: the preset as it is now, with pre-training on (what a lab's project runs; on ISIC
  ``longcos`` since that study, ``strong`` before);
* ``long``, ``cosine``, ``longcos``: ``all`` with a floor of 40 steps an epoch (twice the
  preset's), with the learning rate decayed by a cosine to a twentieth (``train.lr_schedule``),
  and both: what was tried next for the 80-mask target.

Variants whose effective settings are the same (``all`` and the one it was chosen from) are
trained once: the runs are deterministic, so the result is shared and the summary says so.

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
import shutil
import tempfile
import time
from pathlib import Path

from children import run_children
from machine import emit, machine_info

ROOT = Path(__file__).resolve().parents[1]
DATA = {"isic": ROOT.parent / "shared" / "data" / "isic", "lgg": ROOT.parent / "shared" / "data" / "lgg"}
PRESET = {"isic": "quick-isic", "lgg": "quick-lgg"}
TODAY = {"train": {"min_epoch_steps": 0, "warmup_steps": 0, "augment_strength": "standard", "lr_schedule": "constant"},
         "pretrain": {"enabled": False}}
STEPS = {"train": {"min_epoch_steps": 20, "warmup_steps": 0, "augment_strength": "standard", "lr_schedule": "constant"},
         "pretrain": {"enabled": False}}
STRONG = {"min_epoch_steps": 20, "warmup_steps": 0, "augment_strength": "strong"}
INPAINT = {"enabled": True, "method": "inpaint"}
VARIANTS = {
    "today": TODAY,
    "steps": STEPS,
    "warmup": {**STEPS, "train": {**STEPS["train"], "warmup_steps": 50}},
    "pretrain": {**STEPS, "pretrain": INPAINT},
    "denoise": {**STEPS, "pretrain": {"enabled": True, "method": "denoise"}},
    "strong": {"train": {**STEPS["train"], "augment_strength": "strong"}, "pretrain": INPAINT},
    "batchdice": {**STEPS, "train": {**STEPS["train"], "loss": "batch_dice_bce"}},
    "bce": {**STEPS, "train": {**STEPS["train"], "loss": "bce"}},
    "cover": {**STEPS, "pretrain": INPAINT},
    "all": {"pretrain": {"enabled": True}},
    # after the first study, for the 80-mask target: twice the step floor, a cosine decay, both
    "long": {"pretrain": INPAINT, "train": {**STRONG, "min_epoch_steps": 40, "lr_schedule": "constant"}},
    "cosine": {"pretrain": INPAINT, "train": {**STRONG, "lr_schedule": "cosine"}},
    "longcos": {"pretrain": INPAINT, "train": {**STRONG, "min_epoch_steps": 40, "lr_schedule": "cosine"}},
}
COVER = {"cover"}  # variants whose n masks are chosen to cover the pool (the rest: at random)


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


def labelled_subset(split, data, n: int, seed: int, features=None) -> tuple[list[str], list[str]]:
    """``(train ids, validation ids)``: n train-split images, a fifth of them for validation. At random,
    or with ``features`` (one row per train-split image) one per k-means cluster, as a project without
    masks picks its first batch (``alseg.active.coldstart``)."""
    import numpy as np

    from alseg.active.coldstart import cover_selection
    from alseg.data.splits import carve_validation

    rng = np.random.default_rng(1000 + seed)
    group_of = dict(zip(data.ids, data.groups))
    if features is None:
        chosen = [split.train[i] for i in sorted(rng.choice(len(split.train), n, replace=False))]
    else:
        picked = cover_selection(features, [group_of[i] for i in split.train], n, rng)
        chosen = [split.train[i] for i in sorted(picked)]
    val = carve_validation(chosen, [group_of[i] for i in chosen], seed)
    return [i for i in chosen if i not in set(val)], val


def one_run(job: dict) -> dict:
    """Train one (dataset, variant, n, seed) model in this process; its Dice and seconds."""
    import torch

    import numpy as np

    from alseg.active.uncertainty import bottleneck_features
    from alseg.metrics import dice_per_image
    from alseg.model import UNet
    from alseg.pretrain import load_into, pretrain
    from alseg.runtime import Normalizer, seed_everything
    from alseg.train import Checkpoint, epoch_steps, fit, predict_probs

    torch.set_num_threads(1)
    cfg = _config(job["dataset"], job["variant"], job["seed"])
    data, split = _fixed(job["dataset"], cfg.data.size)
    cfg.model = type(cfg.model)(**{**cfg.model.to_dict(), "in_channels": data.channels})
    normalizer = Normalizer.fit(data.images[data.indices(list(split.train))])  # as the loop: every train image
    seed_everything(job["seed"])
    model = UNet(cfg.model)
    pretrain_facts = None
    if cfg.pretrain.enabled:
        pseed = job.get("pretrain_seed", job["seed"])
        ids = list(split.train) + list(split.val)
        pre = pretrain(data.images[data.indices(ids)], cfg.model, normalizer, cfg.pretrain,
                       folder=Path(job["out"]) / "pretrain" / f"{job['dataset']}-s{pseed}-{cfg.pretrain.method}",
                       ids=ids, seed=pseed, device="cpu")
        load_into(model, pre["weights"])
        pretrain_facts = {k: pre[k] for k in ("steps", "seconds", "images", "reused")}
    features = None
    if job["variant"] in COVER:  # the first batch chosen in the pre-trained features, as the loop does
        features = bottleneck_features(model, data.images, data.indices(list(split.train)), normalizer)
    train_ids, val_ids = labelled_subset(split, data, job["n"], job["seed"], features)
    ti, vi = data.indices(train_ids), data.indices(val_ids)

    def split_dice(net, part: str, most: int | None = None) -> float:
        ids = list(getattr(split, part))
        if most is not None and len(ids) > most:  # evenly spread, the same every epoch
            ids = [ids[int(k)] for k in np.linspace(0, len(ids) - 1, most).round()]
        idx = data.indices(ids)
        probs = predict_probs(net, data.images[idx], normalizer)
        return float(dice_per_image(probs > 0.5, data.masks[idx] > 0).mean())

    # every epoch's model on (up to 100 images of) the validation and test splits, outside the timed
    # training, so that rules for which epoch to keep can be compared afterwards, on the validation split
    epochs: list[dict] = []
    spent = [0.0]

    def on_epoch(record: dict) -> None:
        if not job.get("curves"):
            return
        t = time.process_time()
        epochs.append({"epoch": record["epoch"], "small_val_dice": record["val_dice"],
                       "val_dice": split_dice(model, "val", 100), "test_dice": split_dice(model, "test", 100)})
        spent[0] += time.process_time() - t

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        result = fit(model, data.images[ti], data.masks[ti], data.images[vi], data.masks[vi], cfg.train, normalizer,
                     size=data.size, checkpoint_dir=tmp, seed=job["seed"], on_epoch=on_epoch)
        seconds = time.process_time() - t0 - spent[0]
        scores = {}
        for which in ("best", "last"):
            ckpt = Checkpoint.load(Path(tmp) / f"{which}.pt")
            for part in ("val", "test"):
                scores[f"{which}_{part}_dice"] = split_dice(ckpt.model, part)
    return {**job, "train_images": len(train_ids), "val_images": len(val_ids), "best_epoch": result["best_epoch"],
            "small_val_dice": result["best_val_dice"], "steps": cfg.train.epochs * epoch_steps(len(train_ids), cfg.train),
            "cpu_seconds": seconds, "pretrain": pretrain_facts, "epochs": epochs, **scores}


def head_start_ids(split, data, seed: int) -> tuple[set[str], list[str]]:
    """A head-start project's 20 masked images and its pool of 200 other train-split images."""
    import numpy as np

    train_ids, val_ids = labelled_subset(split, data, 20, seed)
    labelled = set(train_ids) | set(val_ids)
    rest = [i for i in split.train if i not in labelled]
    rng = np.random.default_rng(2000 + seed)
    return labelled, [rest[k] for k in sorted(rng.choice(len(rest), 200, replace=False))]


def head_start(job: dict) -> dict:
    """A 20-mask project's first exported batch against the truth (see the module docstring)."""
    import csv

    import numpy as np
    import torch

    from alseg.data import open_dataset
    from alseg.data.imageio import read_mask
    from alseg.metrics import dice_per_image
    from alseg.project import init_project, query

    torch.set_num_threads(1)
    cfg = _config(job["dataset"], job["variant"], job["seed"])
    data, split = _fixed(job["dataset"], cfg.data.size)
    labelled, pool = head_start_ids(split, data, job["seed"])
    samples = {s.id: s for s in open_dataset(DATA[job["dataset"]]).samples}
    root = Path(job["out"]) / "head-start" / f"{job['dataset']}-{job['variant']}-s{job['seed']}"
    shutil.rmtree(root, ignore_errors=True)  # an interrupted attempt
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
        (root / "groups.csv").write_text("\n".join(groups) + "\n")  # LGG: patients stay together
    project = root / "project"
    t0 = time.time()
    # root is a folder layout (images/, masks/, groups.csv): images without a mask are the pool
    init_project(project, root, preset=PRESET[job["dataset"]], pretrain=cfg.pretrain.enabled,
                 overrides={**VARIANTS[job["variant"]], "seed": job["seed"],
                            "train": {**VARIANTS[job["variant"]].get("train", {}), "device": "cpu"}})
    result = query(project, n=10)
    seconds = time.time() - t0
    folder = Path(result["batch"]["folder"])
    with open(folder / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    predicted = _predicted_masks(project, rows, folder)
    dices = [float(dice_per_image(predicted[r["id"]][None], read_mask(samples[r["id"]].mask)[None])[0]) for r in rows]
    offered = all(r["predicted"] for r in rows)
    return {**job, "kind": "head_start", "dice": dices, "reasons": [r["reason"] for r in rows],
            "median_dice": float(np.median(dices)),
            "accept_share": float(np.mean(np.array(dices) >= 0.9)), "offered": offered,
            "round0_val_dice": result["rounds"][0]["val_dice"], "warning": result["warning"], "wall_seconds": seconds,
            **pool_head_start(job)}


def pool_head_start(job: dict) -> dict:
    """What round 0's model of a head-start project predicts (dropout off) for every one of its 200 pool
    images, at the working size: the head start a random batch would offer, beside CEAL's batch, which
    holds by design the images the model does worst on."""
    import numpy as np

    from alseg.metrics import dice_per_image
    from alseg.runtime import Normalizer
    from alseg.store import RunStore
    from alseg.train import Checkpoint, predict_probs

    cfg = _config(job["dataset"], job["variant"], job["seed"])
    data, split = _fixed(job["dataset"], cfg.data.size)
    pool = data.indices(head_start_ids(split, data, job["seed"])[1])
    project = Path(job["out"]) / "head-start" / f"{job['dataset']}-{job['variant']}-s{job['seed']}" / "project"
    with RunStore.open_readonly(project) as store:
        normalizer = Normalizer.from_dict(store.normalizer())
    model = Checkpoint.load(project / "checkpoints" / "round-000" / "best.pt").model
    dices = dice_per_image(predict_probs(model, data.images[pool], normalizer) > 0.5, data.masks[pool] > 0)
    return {"pool_median_dice": float(np.median(dices)), "pool_accept_share": float(np.mean(dices >= 0.9))}


def _predicted_masks(project: Path, rows: list[dict], folder: Path) -> dict:
    """Each batch image's predicted mask at its own size: the exported file, or, where the batch offers
    none (a model no better than a constant mask), what the export made before the gate existed (the
    thresholded MC mean of round 0's model with the export's seed), so ``today`` is scored as it was."""
    import numpy as np
    from PIL import Image

    from alseg.active.uncertainty import mc_dropout
    from alseg.config import config_from_dict
    from alseg.data.cache import map_to_size
    from alseg.rundata import open_run_data
    from alseg.runtime import Normalizer, step_seed
    from alseg.store import RunStore
    from alseg.train import Checkpoint

    out = {r["id"]: np.asarray(Image.open(folder / r["predicted"]).convert("L")) >= 128
           for r in rows if r["predicted"]}
    missing = [r for r in rows if not r["predicted"]]
    if missing:
        with RunStore.open_readonly(project) as store:
            cfg = config_from_dict(store.config())
            data = open_run_data(store).data
            normalizer = Normalizer.from_dict(store.normalizer())
        model = Checkpoint.load(project / "checkpoints" / "round-000" / "best.pt").model
        a = cfg.active
        mc = mc_dropout(model, data.images, data.indices([r["id"] for r in missing]), normalizer, passes=a.mc_passes,
                        batch_size=a.mc_batch_size, precision=a.mc_precision, seed=step_seed(cfg.seed, 1, 6),
                        keep_maps=True)
        for k, r in enumerate(missing):
            out[r["id"]] = map_to_size(mc.mean[k], int(r["width"]), int(r["height"])) > 0.5
    return out


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
    ap.add_argument("--markdown", action="store_true", help="Print the summary's tables as Markdown (docs).")
    ap.add_argument("--pretrain-speed", action="store_true", help="Only time pre-training at the preset's size "
                    "(seconds a step, minutes per 1,000 images with the default schedule), on a quiet machine.")
    ap.add_argument("--pretrain-seed", type=int, default=None, help="Pre-train once with this seed and share it "
                    "across seeds (default: one pre-training per seed).")
    ap.add_argument("--epoch-curves", action="store_true", help="Also score every epoch's model on the validation "
                    "and test splits (to compare rules for which epoch to keep; slower).")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: one job as JSON
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        result = head_start(job) if job.get("head_start") else one_run(job)
        path = _result_path(Path(job["out"]), job)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result) + "\n")
        return
    if args.pretrain_speed:
        emit(pretrain_speed(args.dataset), args.json)
        return
    if args.markdown:  # the tables of what has run, nothing trained
        print(markdown(summarize(args.out, args.dataset, args.variants, args.counts, args.seeds)))
        return
    same = canonical(args.dataset)
    jobs = []
    for seed in args.seeds:
        for variant in dict.fromkeys(same[v] for v in args.variants):
            jobs += [{"dataset": args.dataset, "variant": variant, "n": n, "seed": seed, "out": str(args.out),
                      "curves": args.epoch_curves,
                      **({} if args.pretrain_seed is None else {"pretrain_seed": args.pretrain_seed})}
                     for n in args.counts]
    # each (seed, pre-training method) is pre-trained once: its first job goes first, then the rest share it
    first: dict = {}
    for job in jobs:
        method = _pretrain_method(args.dataset, job["variant"])
        if method:
            first.setdefault((job.get("pretrain_seed", job["seed"]), method), job)
    rest = [j for j in jobs if j not in first.values()]
    if args.head_start:
        rest += [{"dataset": args.dataset, "variant": same[v], "n": 20, "seed": s, "out": str(args.out),
                  "head_start": True} for s in args.seeds for v in ("today", "all")]
    _run_children(list(first.values()), args.jobs)
    _run_children(rest, args.jobs)
    summary = summarize(args.out, args.dataset, args.variants, args.counts, args.seeds)
    emit(summary, args.json)


def canonical(dataset: str) -> dict[str, str]:
    """Each variant's first variant (in ``VARIANTS`` order) with the same effective settings."""
    seen: dict[str, str] = {}
    out = {}
    for name in VARIANTS:
        cfg = _config(dataset, name, 0).to_dict()
        if not cfg["pretrain"]["enabled"]:  # pre-training settings count only when it runs
            cfg["pretrain"] = {"enabled": False}
        key = json.dumps([cfg, name in COVER], sort_keys=True)
        out[name] = seen.setdefault(key, name)
    return out


def _pretrain_method(dataset: str, variant: str) -> str | None:
    p = _config(dataset, variant, 0).pretrain
    return p.method if p.enabled else None


def _run_children(jobs: list[dict], parallel: int) -> None:
    run_children(jobs, parallel, script=__file__, extra_args=lambda j: ["--dataset", j["dataset"]],
                 done=lambda j: _result_path(Path(j["out"]), j).is_file(), label=lambda j: _result_path(Path(j["out"]), j).stem, tag="cold_start")


def summarize(out: Path, dataset: str, variants: list[str], counts: list[int], seeds: list[int]) -> dict:
    """Per variant and n: per-seed and mean test and validation Dice, steps and seconds; the
    pre-trainings' cost; the head-start figures. A variant trained as another is marked ``same_as``."""
    import numpy as np

    same = canonical(dataset)

    def load(kind: str, variant: str, n: int, seed: int) -> dict | None:
        path = _result_path(out, {"dataset": dataset, "variant": same[variant], "n": n, "seed": seed,
                                  "head_start": kind == "head"})
        return json.loads(path.read_text()) if path.is_file() else None

    table: dict = {}
    pretraining: dict = {}
    for variant in variants:
        table[variant] = {"same_as": same[variant]} if same[variant] != variant else {}
        for n in counts:
            rows = [r for r in (load("run", variant, n, s) for s in seeds) if r]
            if not rows:
                continue
            cell = {"seeds": [r["seed"] for r in rows]}
            for key in ("best_test_dice", "best_val_dice", "last_test_dice", "last_val_dice", "cpu_seconds", "steps"):
                cell[key] = [round(r[key], 4) for r in rows]
                cell[f"mean_{key}"] = round(float(np.mean(cell[key])), 4)
            table[variant][str(n)] = cell
            for r in rows:
                if r.get("pretrain") and not r["pretrain"]["reused"]:
                    pretraining[f"{_pretrain_method(dataset, variant)}-s{r['seed']}"] = r["pretrain"]
    head = {}
    for variant in ("today", "all"):
        rows = [h for h in (load("head", variant, 20, s) for s in seeds) if h]
        if rows:
            head[variant] = {"seeds": [h["seed"] for h in rows], "median_dice": [h["median_dice"] for h in rows],
                             "accept_share": [h["accept_share"] for h in rows],
                             "offered": [h["offered"] for h in rows],
                             "mean_median_dice": round(float(np.mean([h["median_dice"] for h in rows])), 4),
                             "mean_accept_share": round(float(np.mean([h["accept_share"] for h in rows])), 4),
                             "pool_median_dice": [round(h["pool_median_dice"], 4) for h in rows],
                             "pool_accept_share": [round(h["pool_accept_share"], 4) for h in rows],
                             # CEAL asks for the images the model misses on purpose: its head start by reason
                             "median_dice_by_reason": {
                                 reason: round(float(np.median([d for h in rows for d, r in zip(h["dice"], h["reasons"])
                                                                if r == reason])), 4)
                                 for reason in sorted({r for h in rows for r in h["reasons"]})}}
    return {"dataset": dataset, "preset": PRESET[dataset], "machine": machine_info(),
            "variants": {v: VARIANTS[v] for v in variants}, "dice": table, "pretraining": pretraining,
            "head_start": head}


def pretrain_speed(dataset: str, steps: int = 60) -> dict:
    """Seconds per pre-training step at the preset's size, one and two threads, and what the default
    schedule costs per 1,000 images (20 passes, 500 to 2,000 steps), measured on synthetic pixels."""
    import numpy as np
    import torch

    from alseg.model import ModelConfig
    from alseg.pretrain import PretrainConfig, pretrain
    from alseg.runtime import Normalizer

    cfg = _config(dataset, "all", 0)
    size = cfg.data.size
    images = np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    model = ModelConfig(**{**cfg.model.to_dict(), "in_channels": 3})
    out = {"dataset": dataset, "size": size, "width": model.width, "batch_size": cfg.pretrain.batch_size,
           "machine": machine_info()}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            timed = PretrainConfig(enabled=True, min_steps=steps, max_steps=steps, save_every=10 ** 6)
            result = pretrain(images, model, Normalizer((0.5,) * 3, (0.25,) * 3), timed, folder=tmp,
                              ids=[str(i) for i in range(len(images))], device="cpu")
        out[f"seconds_per_step_{threads}_thread"] = round(result["seconds"] / steps, 4)
    per_1000 = cfg.pretrain.steps(1000)
    out["default_steps_per_1000_images"] = per_1000
    for threads in (1, 2):
        out[f"minutes_per_1000_images_{threads}_thread"] = round(per_1000 * out[f"seconds_per_step_{threads}_thread"] / 60, 1)
    return out


def markdown(summary: dict) -> str:
    """Test Dice (and validation-split Dice) by variant and label count: mean over seeds [per seed]."""
    counts = sorted({int(n) for v in summary["dice"].values() for n in v if n != "same_as"})
    lines = ["| variant | " + " | ".join(f"{n} masks" for n in counts) + " |", "| --- |" + " --- |" * len(counts)]
    for key, label in (("best_test_dice", "test"), ("best_val_dice", "validation split")):
        for variant, cells in summary["dice"].items():
            name = variant + (f" (= {cells['same_as']})" if "same_as" in cells else "")
            row = []
            for n in counts:
                c = cells.get(str(n))
                row.append("-" if c is None else f"{c['mean_' + key]:.3f} [{', '.join(f'{v:.3f}' for v in c[key])}]")
            lines.append(f"| {name}, {label} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("| variant | " + " | ".join(f"{n} masks" for n in counts) + " |")
    lines.append("| --- |" + " --- |" * len(counts))
    for variant, cells in summary["dice"].items():
        row = [("-" if cells.get(str(n)) is None else
                f"{cells[str(n)]['mean_steps']:.0f} steps, {cells[str(n)]['mean_cpu_seconds']:.0f} s") for n in counts]
        lines.append(f"| {variant} | " + " | ".join(row) + " |")
    for variant, h in summary["head_start"].items():
        lines.append(f"\nhead start, {variant}: median Dice per seed {[round(v, 3) for v in h['median_dice']]}, "
                     f"share >= 0.9 {[round(v, 2) for v in h['accept_share']]}, offered {h['offered']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
