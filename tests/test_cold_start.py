"""Useful from the first ten masks: learning at small n, pre-training, the cold-start batch, the
pseudo-label gate and cap, the warning for a useless model, and presets chosen by the images."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alseg.active.coldstart import TISSUE_SHARE, cover_selection, spread_selection, tissue_candidates, tissue_shares
from alseg.active.gate import ModelHealth, constant_mask_dice, model_health, pseudo_gate
from alseg.config import preset_for_images
from alseg.data import open_dataset
from alseg.data.synthetic import make_synthetic
from alseg.errors import AlsegError
from alseg.evaluate import evaluate
from alseg.project import init_project, query
from alseg.store import SCHEMA_VERSION, RunStore
from alseg.train import TrainConfig, _Schedule, epoch_steps
from conftest import ISIC, LGG, ROOT, run_cli, run_json

TINY = {"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 2},
        "active": {"round_epochs": 1, "mc_passes": 3}, "pretrain": {"min_steps": 40, "max_steps": 40, "save_every": 10}}


def _manifest(batch: dict) -> list[dict]:
    with open(batch["manifest"], newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ learning from ten masks
def _isic_folders(root: Path, n_images: int, n_masks: int, skip: int = 0) -> tuple[Path, Path]:
    """A plain folder of ISIC images (links) with the first ``n_masks`` of their masks beside."""
    samples = [s for s in open_dataset(ISIC).samples if s.mask is not None][skip:skip + n_images]
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for k, s in enumerate(samples):
        (images / s.image.name).symlink_to(s.image)
        if k < n_masks:
            (masks / s.mask.name).symlink_to(s.mask)
    return images, masks


def test_a_ten_mask_isic_project_learns_more_than_a_constant_mask(tmp_path):
    """Ten ISIC masks (8 train, 2 validate) and 50 unlabelled images: the step floor and the pre-training
    give a model that beats the better constant mask on 40 ISIC images the project never saw."""
    images, masks = _isic_folders(tmp_path / "lab", 60, 10)
    project = tmp_path / "project"
    init_project(project, images, masks, overrides={
        "data": {"size": 32}, "model": {"width": 8}, "train": {"epochs": 15, "min_epoch_steps": 20},
        "active": {"mc_passes": 3}, "pretrain": {"min_steps": 100, "max_steps": 100}})
    result = query(project, n=5)
    r0 = result["rounds"][0]
    assert r0["expert_labelled"] == 8 and r0["model"]["useful"], r0["model"]
    held_out, held_masks = _isic_folders(tmp_path / "held", 40, 40, skip=60)
    layout = tmp_path / "held-layout"
    layout.mkdir()
    (layout / "images").symlink_to(held_out)
    (layout / "masks").symlink_to(held_masks)
    scored = evaluate(project, layout).summary
    truth = np.stack([np.asarray(Image.open(p).convert("L").resize((32, 32), Image.NEAREST)) >= 128
                      for p in sorted(held_masks.iterdir())])
    assert scored["images"] == 40 and scored["mean_dice"] > max(constant_mask_dice(truth)) + 0.1, scored


def test_the_step_floor_and_warm_up():
    """16 images at batch 8 take 2 steps an epoch; the floor makes it 20; 461 images take their 58."""
    assert epoch_steps(16, TrainConfig(batch_size=8)) == 2
    assert epoch_steps(16, TrainConfig(batch_size=8, min_epoch_steps=20)) == 20
    assert epoch_steps(461, TrainConfig(batch_size=8, min_epoch_steps=20)) == 58  # the floor does not bind
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = _Schedule(opt, TrainConfig(lr=1e-3, warmup_steps=4), 6)
    rates = []
    for _ in range(6):
        schedule.advance()
        rates.append(opt.param_groups[0]["lr"])
    assert np.allclose(rates, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    schedule = _Schedule(opt, TrainConfig(lr=1e-3, warmup_steps=2, lr_schedule="cosine"), 6)
    rates = []
    for _ in range(6):
        schedule.advance()
        rates.append(opt.param_groups[0]["lr"])
    # warm-up, then from the full rate (step 2) down to lr / 20 at the last step (6)
    down = [0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert np.allclose(rates, [5e-4, 1e-3] + [1e-3 * f for f in down]) and rates[-1] == pytest.approx(5e-5)


# ------------------------------------------------------------------ the gate and the warning
def test_constant_masks_and_the_gate_rules():
    masks = np.zeros((4, 10, 10), bool)
    masks[1, :5] = True  # half the image
    masks[2, 0, 0] = True  # one pixel
    empty, full = constant_mask_dice(masks)
    assert empty == 0.5 and np.isclose(full, (2 * 50 / 150 + 2 * 1 / 101) / 4)
    weak = model_health(0.40, masks)
    assert not weak.useful and "no better than an all-background mask" in weak.warning()
    good = model_health(0.70, masks)
    assert good.useful and good.warning() is None
    assert ModelHealth.from_dict(json.loads(json.dumps(weak.to_dict()))) == weak  # as the store keeps it
    assert pseudo_gate(20, weak, 100, min_val_dice=0.5, max_pool_fraction=0.5).limit == 0
    assert pseudo_gate(20, model_health(0.58, masks), 100, min_val_dice=0.6, max_pool_fraction=0.5).limit == 0
    capped = pseudo_gate(60, good, 100, min_val_dice=0.5, max_pool_fraction=0.5)
    assert capped.limit == 50 and capped.reason == "50 of 60 pseudo-labels: at most 50% of the 100 pool images left"
    assert pseudo_gate(20, good, 100, min_val_dice=0.5, max_pool_fraction=0.5).limit == 20
    assert pseudo_gate(20, None, 100, min_val_dice=0.5, max_pool_fraction=0.5).limit == 0


def test_the_gate_refuses_pseudo_labels_from_a_collapsed_model_and_says_why(tmp_path):
    """A model that never learnt (learning rate 0) gets no pseudo-labels; status, query and the
    report say why, and the batch offers no head start."""
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text("train:\n  lr: 0.0\n")
    out = tmp_path / "run"
    result = run_json("run", "--preset", "quick-lgg", "--data", LGG, "--rounds", "1", "--size", "32", "--width", "4",
                      "--epochs", "1", "--round-epochs", "1", "--mc-passes", "3", "--config", frozen, "--out", out)
    r0, r1 = result["rounds"]
    assert not r0["model"]["useful"] and r0["model"]["val_dice"] < r0["model"]["constant_dice"] + 0.05
    assert r1["pseudo_labelled"] == 0
    gate = r1["gate"]
    assert (gate["asked"], gate["limit"], gate["taken"]) == (20, 0, 0)
    assert gate["reason"].startswith("no pseudo-labels: validation Dice") and "constant mask" in gate["reason"]
    status = run_json("status", out)
    assert status["warning"] is not None and status["warning"] == status["rounds"][-1]["model"]["warning"]
    text = run_cli("status", out)
    assert "warning: the model is no better than" in text.stderr
    run_cli("report", out, "--images", "2")
    page = (out / "report" / "index.html").read_text()
    assert "The model and its pseudo-labels" in page and "no pseudo-labels: validation Dice" in page


def test_a_useless_model_offers_no_head_start_and_the_page_says_so(tmp_path):
    from fastapi.testclient import TestClient

    from alseg.annotate.server import create_app
    from alseg.project import Project

    src = make_synthetic(tmp_path / "syn", n=30, size=48, seed=2)
    images, masks = tmp_path / "imgs", tmp_path / "msks"
    images.mkdir()
    masks.mkdir()
    for k, p in enumerate(sorted((src / "images").iterdir())):
        shutil.copy(p, images / p.name)
        if k < 10:
            shutil.copy(src / "masks" / p.name, masks / p.name)
    project = tmp_path / "p"
    init_project(project, images, masks, preset="demo", pretrain=False,
                 overrides={**TINY, "train": {"epochs": 1, "lr": 0.0}})
    result = query(project, n=4)
    assert result["warning"] and not result["rounds"][0]["model"]["useful"]
    rows = _manifest(result["batch"])
    assert len(rows) == 4 and all(r["predicted"] == "" and r["uncertainty"] for r in rows)
    assert not list((Path(result["batch"]["folder"]) / "predicted").iterdir())
    with Project(project) as p, TestClient(create_app(p)) as client:
        batch = client.get("/api/batch").json()
    assert batch["model"]["warning"] == result["warning"]
    assert all(it["urls"]["predicted"] is None for it in batch["items"])


# ------------------------------------------------------------------ pre-training
def _synthetic_project(tmp_path: Path, name: str, n_masks: int, **init) -> Path:
    src = make_synthetic(tmp_path / "syn", n=40, size=48, seed=5)
    images, masks = tmp_path / f"{name}-imgs", tmp_path / f"{name}-msks"
    images.mkdir()
    masks.mkdir()
    for k, p in enumerate(sorted((src / "images").iterdir())):
        shutil.copy(p, images / p.name)
        if k < n_masks:
            shutil.copy(src / "masks" / p.name, masks / p.name)
    project = tmp_path / name
    init_project(project, images, masks, preset="demo", **init)
    return project


def _query_child(project: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ALSEG_FAULT", None)
    if fault:
        env["ALSEG_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "alseg", "query", str(project), "-n", "4", "--json"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_pretraining_is_cached_reused_every_round_and_resumes_after_a_kill(tmp_path):
    overrides = {**TINY, "active": {**TINY["active"], "warm_start": False}}  # every round starts fresh
    killed = _synthetic_project(tmp_path, "killed", 10, overrides=overrides)
    whole = _synthetic_project(tmp_path, "whole", 10, overrides=overrides)
    proc = _query_child(killed, fault="pretrain-saved@2")  # killed after the state of step 20 was saved
    assert proc.returncode == -9
    state = torch.load(killed / "pretrain" / "state.pt", weights_only=True)
    assert state["step"] == 20 and not (killed / "pretrain" / "pretrained.pt").exists()
    assert _query_child(killed).returncode == 0
    assert _query_child(whole).returncode == 0
    a = torch.load(killed / "pretrain" / "pretrained.pt", weights_only=True)
    b = torch.load(whole / "pretrain" / "pretrained.pt", weights_only=True)
    assert not (killed / "pretrain" / "state.pt").exists()
    assert a["facts"]["steps"] == 40 and a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])  # resumed = uninterrupted
    # the next round (from scratch) reuses the cached weights: no second pre-training
    stamp = (killed / "pretrain" / "pretrained.pt").stat().st_mtime_ns
    with RunStore.open_readonly(killed) as store:
        batch = store.queued(1)
    src = tmp_path / "syn"
    folder = killed / "rounds" / "001" / "masks"
    for i in batch:
        shutil.copy(src / "masks" / f"{i}.png", folder / f"{i}.png")
    run_cli("ingest", killed)
    proc = _query_child(killed)
    assert proc.returncode == 0 and "pre-trained on" not in proc.stderr
    assert json.loads(proc.stdout)["batch"]["round"] == 2
    assert (killed / "pretrain" / "pretrained.pt").stat().st_mtime_ns == stamp


def test_round_0_starts_from_the_pretrained_weights_and_no_pretrain_means_none(tmp_path):
    """With a learning rate of 0 round 0's model is exactly where training started: the pre-trained
    encoder and decoder (the head is new); with --no-pretrain nothing is pre-trained."""
    frozen = {**TINY, "train": {"epochs": 1, "lr": 0.0}}
    project = _synthetic_project(tmp_path, "pre", 10, overrides=frozen)
    query(project, n=4)
    weights = torch.load(project / "pretrain" / "pretrained.pt", weights_only=True)["weights"]
    model = torch.load(project / "checkpoints" / "round-000" / "best.pt", weights_only=True)["state_dict"]
    assert weights.keys() == {k for k in model if not k.startswith("head.")}
    assert all(torch.equal(weights[k], model[k]) for k in weights)
    plain = _synthetic_project(tmp_path, "plain", 10, overrides=frozen, pretrain=False)
    query(plain, n=4)
    assert not (plain / "pretrain").exists()
    other = torch.load(plain / "checkpoints" / "round-000" / "best.pt", weights_only=True)["state_dict"]
    assert not torch.equal(other["down.0.0.weight"], model["down.0.0.weight"])


# ------------------------------------------------------------------ the cold-start batch
def test_cover_selection_takes_every_kind_once_and_spreads_over_groups():
    rng = np.random.default_rng(0)
    common = rng.normal(0, 1, (200, 6))
    rare = rng.normal(9, 0.5, (4, 6))  # 2 % of the pool, far from the rest
    x = np.concatenate([common, rare])
    picked = cover_selection(x, [None] * len(x), 5, np.random.default_rng(1))
    assert len(picked) == len(set(picked)) == 5 and sum(i >= 200 for i in picked) == 1
    groups = [f"g{i % 4}" for i in range(len(x))]
    spread = cover_selection(x, groups, 8, np.random.default_rng(1))
    assert sorted(np.bincount([int(groups[i][1]) for i in spread], minlength=4)) == [2, 2, 2, 2]
    assert cover_selection(x, groups, 8, np.random.default_rng(1)) == spread  # seeded


def test_tissue_shares_measure_each_slice_against_its_volumes_fullest_and_spread_covers_volumes():
    """Two generated volumes of 4 slices: a square of tissue whose side grows; the second so dim
    that a level taken over both volumes would call none of it tissue; an all-black volume and a
    slice without a volume leave nothing out. The shares are the squares' areas over the largest
    in the same volume; a first batch takes the slices at or above the share, or every slice when
    too few are."""
    sides = [0, 4, 8, 16]
    slices = []
    for level in (200, 10):
        for side in sides:
            img = np.zeros((16, 16, 3), np.uint8)
            img[:side, :side] = level
            slices.append(img)
    slices += [np.zeros((16, 16, 3), np.uint8)] * 2 + [np.full((16, 16, 3), 3, np.uint8)]
    images = np.stack(slices)
    groups = ["a"] * 4 + ["b"] * 4 + ["dark"] * 2 + [None]
    shares = tissue_shares(images, np.arange(11)[::-1], groups[::-1])[::-1]  # any order of indices
    assert np.allclose(shares, [s * s / 256 for s in sides] * 2 + [1.0, 1.0, 1.0])
    ids = [f"{g}{k}" for k, g in enumerate(groups)]
    below = {ids[k] for k in (0, 1, 4, 5)}  # the empty and the 4 px slices: under a quarter
    assert (shares < TISSUE_SHARE).sum() == 4
    assert tissue_candidates(images, ids, np.arange(11), groups, 7) == [i for i in ids if i not in below]
    assert tissue_candidates(images, ids, np.arange(11), groups, 8) == ids  # too few with tissue: all
    batch = spread_selection(ids[:10], groups[:10], 3, np.random.default_rng(0))
    assert len(set(batch)) == 3 and {b.rstrip("0123456789") for b in batch} == {"a", "b", "dark"}
    assert spread_selection(ids[:10], groups[:10], 3, np.random.default_rng(0)) == batch


def test_a_project_without_masks_can_start_with_a_batch_that_covers_the_pool(tmp_path):
    cover = {**TINY, "active": {**TINY["active"], "initial_selection": "cover"}}
    project = _synthetic_project(tmp_path, "cold", 0, overrides=cover)
    with RunStore.open_readonly(project) as store:  # random unless asked: cover measured below random
        assert store.config()["active"]["initial_selection"] == "cover"
    default = _synthetic_project(tmp_path, "cold-default", 0, overrides=TINY)
    with RunStore.open_readonly(default) as store:
        assert store.config()["active"]["initial_selection"] == "random"
    first = query(project, n=6)
    assert {r["reason"] for r in _manifest(first["batch"])} == {"initial (one per kind of image)"}
    assert (project / "pretrain" / "pretrained.pt").is_file()
    with RunStore.open_readonly(project) as store:
        assert set(store.selection_reasons(0).values()) == {"cover"}


# ------------------------------------------------------------------ presets for real images
def test_presets_chosen_by_the_images():
    assert preset_for_images("folder", 3, 1024)[:2] == ("quick-isic", None)
    assert preset_for_images("folder", 1, 512)[:2] == ("quick-lgg", None)
    assert preset_for_images("folder", 3, 60)[:2] == ("quick-isic", 48)
    assert preset_for_images("lgg", 3, 256)[:2] == ("quick-lgg", None)
    assert preset_for_images("nifti", 3, 240)[:2] == ("quick-lgg-volume", None)  # MRI channels are not colour
    assert preset_for_images("dicom", 1, 64)[:2] == ("quick-lgg-volume", 64)
    assert all(preset_for_images(f, c, s)[0] != "demo" for f in ("folder", None) for c in (1, 3) for s in (20, 4000))


def test_init_on_a_plain_folder_picks_a_preset_for_its_images_and_says_why(tmp_path):
    colour = tmp_path / "colour"
    colour.mkdir()
    for s in [s for s in open_dataset(ISIC).samples][:6]:
        (colour / s.image.name).symlink_to(s.image)
    proc = run_cli("init", tmp_path / "p1", "--images", colour, "--no-pretrain")
    assert "preset quick-isic at 96 px (colour images, median shorter side 256 px" in proc.stdout.replace("\n", " ")
    grey = tmp_path / "grey"
    grey.mkdir()
    for k in range(6):
        Image.fromarray(np.full((40, 60), 30 * k, np.uint8)).save(grey / f"slice_{k}.png")
    made = run_json("init", tmp_path / "p2", "--images", grey)
    assert (made["preset"], made["working_size"]) == ("quick-lgg", 32)
    assert "grey images" in made["preset_reason"]
    with RunStore.open_readonly(tmp_path / "p2") as store:
        cfg = store.config()
    assert cfg["preset"] == "quick-lgg" and cfg["data"]["size"] == 32 and cfg["pretrain"]["enabled"]


# ------------------------------------------------------------------ the store's schema
def test_a_schema_2_store_is_migrated_when_written_and_read_without_facts(tmp_path):
    project = _synthetic_project(tmp_path, "old", 10, overrides=TINY, pretrain=False)
    db = project / "run.db"
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE round_facts")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with RunStore.open_readonly(project) as store:
        assert store.round_facts() == {}
    assert run_json("status", project)["warning"] is None
    query(project, n=4)  # writes: migrates, then records round 0's model
    with RunStore.open_readonly(project) as store:
        assert store._get("schema_version") == SCHEMA_VERSION and "model" in store.round_facts()[0]
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    with pytest.raises(AlsegError, match=f"schema {SCHEMA_VERSION + 1}, made by a newer alseg"):
        RunStore.open_readonly(project)
