"""LGG as whole patients (issue 30): the empty-slice ratio of ``quick-lgg-volume``, chosen on
validation, and per-volume test Dice against the tumour-slice model of ``quick-lgg``.

One fixed split (preset ``lgg-volume``, split seed 0, whatever the run's seed): 31 patients of
``../shared/data/lgg``, test and validation patients whole, every slice with its mask. Each arm
trains one model on the whole train split (full supervision, the preset's 128 px and width 16)
for a fixed budget of optimiser steps, so that arms that see more empty slices an epoch do not
get more steps:

* ``ratio-R``: every tumour slice of the train patients and R tumour-free slices per tumour slice,
  drawn afresh each epoch (``train.empty_ratio``); ``ratio-all``: every slice every epoch;
* ``tumour``: the tumour slices only, as ``quick-lgg`` trains (the paper's filter);
* ``ARM+batch`` (or ``+lesion``, ``+bce``, ``+dice``): the arm with another loss (``train.loss``:
  soft Dice over the whole batch + BCE, per-image soft Dice over the tumour slices only + BCE,
  BCE alone, per-image soft Dice + BCE, the presets' default). An empty slice's own Dice term
  pulls every pixel to 0; over the batch it does not, but a big tumour then outweighs a small
  one, which the tumour-slice Dice does not let it.
* ``ARM+LOSS+cos``: the learning rate decayed by a cosine to a twentieth over the run
  (``train.lr_schedule``), against the preset's constant rate; ``+pre``: the U-Net starts from
  inpainting pre-training on the train and validation slices (``alseg.pretrain``, once per seed,
  cached in ``--out``), as a project's round 0 does; ``+ema``: the weights validated and kept
  are an exponential moving average over the optimiser steps (``train.weight_average`` =
  ``EMA_DECAY``: a horizon of about 200 steps, four of the preset's epochs); ``+patch``: the
  slices at 256 px, trained on 128 px crops of them (``train.patch_size``, a third centred on
  the tumour), so a step costs what the preset's does while small tumours have four times the
  pixels; validated and tested on whole 256 px slices (false-positive voxels then count 256 px
  voxels, a quarter of a 128 px one's area each).

Every arm keeps the epoch with the best mean per-volume Dice on the validation patients (all
their slices: what a lab can measure) and is scored on the test patients over all their slices:
mean per-volume 3D Dice (Buda et al.'s figure), Dice on tumour slices, false-positive voxels on
tumour-free slices; also after keeping the largest 3D component. The ratio is chosen on the
validation figure only. Children run ``--jobs`` at a time with one thread each; finished runs in
``--out`` are reused.

    .venv/bin/python benchmarks/lgg_volume.py --arms ratio-1 ratio-all tumour ratio-1+batch ratio-all+batch \\
        --seeds 3 --steps 2000 --jobs 2 --out /work/lgg-volume --json benchmarks/results/cpu-lgg-volume.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from machine import emit, machine_info

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lgg"
PRESET = "quick-lgg-volume"
LOSSES = {"batch": "batch_dice_bce", "dice": "dice_bce", "lesion": "lesion_dice_bce", "bce": "bce"}  # an arm's "+LOSS" suffix
MODIFIERS = ("cos", "pre", "ema", "patch")
EMA_DECAY = 0.995
PATCH = (256, 128)  # +patch: the working size and the training patches


def _fixed(size: int | None = None):
    from alseg.config import build_config
    from alseg.data import load_cached, open_dataset
    from alseg.data.splits import make_split

    cfg = build_config(PRESET)
    dataset = open_dataset(DATA)
    data = load_cached(dataset, size or cfg.data.size)
    split = make_split(data.ids, has_mask=data.has_mask, positive=data.positive, groups=data.groups,
                       subsets=data.subsets, preset=cfg.data.split_preset, seed=0)
    return cfg, dataset, data, split


def one_run(job: dict) -> dict:
    """Train one arm with one seed; its validation curve and test figures."""
    import dataclasses
    import tempfile

    import numpy as np
    import torch

    from alseg.evaluate import score_model
    from alseg.model import UNet
    from alseg.runtime import Normalizer, seed_everything
    from alseg.train import Checkpoint, epoch_rows, epoch_steps, fit

    torch.set_num_threads(1)
    arm, *mods = job["arm"].split("+")
    cfg, dataset, data, split = _fixed(PATCH[0] if "patch" in mods else None)
    loss = next((m for m in mods if m not in MODIFIERS), "dice_bce")
    train_ids = [i for i in split.train if arm != "tumour" or data.positive[data.indices([i])[0]]]
    ratio = None if arm in ("ratio-all", "tumour") else float(arm.split("-", 1)[1])
    ti = data.indices(train_ids)
    lesion = np.asarray(data.masks[ti]).reshape(len(ti), -1).any(1)
    train_cfg = dataclasses.replace(cfg.train, empty_ratio=ratio, device="cpu", loss=LOSSES.get(loss, loss),
                                    lr_schedule="cosine" if "cos" in mods else "constant",
                                    weight_average=EMA_DECAY if "ema" in mods else None,
                                    patch_size=PATCH[1] if "patch" in mods else None)
    steps_per_epoch = epoch_steps(epoch_rows(lesion, ratio), train_cfg)
    train_cfg = dataclasses.replace(train_cfg, epochs=max(1, math.ceil(job["steps"] / steps_per_epoch)))
    model_cfg = dataclasses.replace(cfg.model, in_channels=data.channels)
    normalizer = Normalizer.fit(data.images[data.indices(list(split.train))])
    seed_everything(job["seed"])
    model = UNet(model_cfg)
    vi = data.indices(list(split.val))
    pretrain_s = 0.0
    if "pre" in mods:  # inpainting pre-training on the train and validation slices, cached in --out
        from alseg.pretrain import PretrainConfig, load_into, pretrain

        ids = list(split.train) + list(split.val)
        t0 = time.process_time()
        result = pretrain(data.images[data.indices(ids)], model_cfg, normalizer, PretrainConfig(enabled=True),
                          folder=Path(job["out"]) / f"pretrain-{data.size}px-s{job['seed']}", ids=ids, seed=job["seed"], device="cpu")
        pretrain_s = time.process_time() - t0 if not result["reused"] else float(result["seconds"])
        load_into(model, result["weights"])
    where = np.asarray(dataset.slice_indices())
    val_volumes = ([data.groups[i] for i in vi], where[vi].tolist())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        result = fit(model, data.images[ti], data.masks[ti], data.images[vi], data.masks[vi], train_cfg, normalizer,
                     size=data.size, checkpoint_dir=tmp, seed=job["seed"], val_volumes=val_volumes)
        seconds = time.process_time() - t0
        best = Checkpoint.load(Path(tmp) / "best.pt")
    test = data.indices(list(split.test))
    scored = score_model(best, data, test, slice_index=where)
    raw = scored.summary
    largest = score_model(best, data, test, slice_index=where, largest_component=True).summary
    tumour_voxels: dict[str, int] = {}
    for i in test:
        tumour_voxels[data.groups[i]] = tumour_voxels.get(data.groups[i], 0) + int(np.count_nonzero(data.masks[i]))
    return {**job, "train_slices": len(ti), "tumour_slices": int(lesion.sum()), "steps_per_epoch": steps_per_epoch,
            "epochs": train_cfg.epochs, "best_epoch": result["best_epoch"], "val_volume_dice": result["best_val_dice"],
            "val_curve": [h["val_dice"] for h in result["history"]], "cpu_seconds": seconds,
            "pretrain_seconds": pretrain_s,
            "test": {k: raw.get(k) for k in ("volume_dice_mean", "volume_dice_mean_nonempty", "volume_dice_median",
                                             "lesion_slice_dice_mean", "false_positive_voxels", "mean_dice")},
            "test_largest_component": {k: largest.get(k) for k in ("volume_dice_mean", "lesion_slice_dice_mean",
                                                                   "false_positive_voxels")},
            "test_volumes": len({data.groups[i] for i in test}), "test_slices": len(test),
            # which patients a model finds: each test patient's 3D Dice beside its tumour's voxels (working size)
            "test_per_volume": {g: {"dice": round(d, 4), "tumour_voxels": tumour_voxels[g]}
                                for g, d in scored.volumes.items()}}


def _path(out: Path, job: dict) -> Path:
    return out / f"{job['arm']}-s{job['seed']}-{job['steps']}.json"


def _child(job: dict) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    result = one_run(job)
    path = _path(Path(job["out"]), job)
    path.write_text(json.dumps(result) + "\n")
    print(f"[lgg_volume {time.strftime('%H:%M:%S')}] {path.stem}: val {result['val_volume_dice']:.3f}, "
          f"test {result['test']['volume_dice_mean']:.3f}", flush=True)
    return result


def summarize(results: list[dict]) -> dict:
    import numpy as np

    arms: dict = {}
    for r in results:
        arms.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, rows in arms.items():
        rows.sort(key=lambda r: r["seed"])

        def mean(get):
            vals = [get(r) for r in rows if get(r) is not None]
            return float(np.mean(vals)) if vals else None
        out[arm] = {"seeds": [r["seed"] for r in rows],
                    "val_volume_dice": mean(lambda r: r["val_volume_dice"]),
                    "val_per_seed": [round(r["val_volume_dice"], 3) for r in rows],
                    "test_volume_dice": mean(lambda r: r["test"]["volume_dice_mean"]),
                    "test_per_seed": [round(r["test"]["volume_dice_mean"], 3) for r in rows],
                    "test_volume_dice_largest_component": mean(lambda r: r["test_largest_component"]["volume_dice_mean"]),
                    "test_tumour_slice_dice": mean(lambda r: r["test"]["lesion_slice_dice_mean"]),
                    "test_false_positive_voxels": mean(lambda r: r["test"]["false_positive_voxels"]),
                    "epochs": rows[0]["epochs"], "steps_per_epoch": rows[0]["steps_per_epoch"],
                    "best_epochs": [r["best_epoch"] for r in rows],
                    "cpu_seconds": mean(lambda r: r["cpu_seconds"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["ratio-0.5", "ratio-1", "ratio-2", "ratio-all", "tumour"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--steps", type=int, default=2000, help="optimiser steps per arm (epochs = steps / steps an epoch)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("/tmp/alseg-lgg-volume"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the summary here.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [{"arm": a, "seed": s, "steps": args.steps, "out": str(args.out)} for s in args.seeds for a in args.arms]
    todo = [j for j in jobs if not _path(args.out, j).is_file()]
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(_child, todo))
    results = [json.loads(_path(args.out, j).read_text()) for j in jobs]
    _, dataset, data, split = _fixed()
    summary = {"machine": machine_info(), "preset": PRESET, "steps": args.steps,
               "split": {"train_patients": len({data.groups[i] for i in data.indices(list(split.train))}),
                         "val_patients": len({data.groups[i] for i in data.indices(list(split.val))}),
                         "test_patients": len({data.groups[i] for i in data.indices(list(split.test))}),
                         **split.counts()},
               "arms": summarize(results), "runs": results}
    emit(summary, args.json, shown=summary["arms"])


if __name__ == "__main__":
    main()
