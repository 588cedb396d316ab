"""A lab's project: init -> query -> ingest -> query, on real data and on generated edge cases.

The expert's masks are supplied by the tests from the datasets' own files, as a person would put
them in the batch's masks/ folder.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alseg.data import open_dataset
from alseg.data.imageio import read_mask
from alseg.data.synthetic import make_synthetic
from alseg.errors import AlsegError
from alseg.project import Project, ingest, init_project, query
from alseg.store import RunStore
from conftest import ISIC, LGG, run_cli, run_json

TINY = {"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 2},
        "active": {"round_epochs": 1, "mc_passes": 3}, "pretrain": {"min_steps": 30, "max_steps": 30}}


def _manifest(batch: dict) -> list[dict]:
    with open(batch["manifest"], newline="") as fh:
        return list(csv.DictReader(fh))


def _answer(batch: dict, masks_by_id: dict[str, Path], ids=None) -> None:
    """Put the dataset's mask of each queued image into the batch's masks/ folder as a 0/255 PNG."""
    for row in _manifest(batch):
        if ids is None or row["id"] in ids:
            mask = read_mask(masks_by_id[row["id"]])
            Image.fromarray(mask.astype(np.uint8) * 255).save(Path(batch["folder"]) / row["mask"])


def test_project_selects_exactly_what_alseg_run_selects(tmp_path):
    """A project (split like a run, masks hidden) driven by query -> ingest chooses the run's ids."""
    args = ["--preset", "quick-lgg", "--data", str(LGG), "--rounds", "2", "--size", "32", "--width", "4",
            "--epochs", "2", "--round-epochs", "1", "--mc-passes", "3", "--seed", "3"]
    reference = run_json("run", *args, "--out", tmp_path / "run")
    masks = {s.id: s.mask for s in open_dataset(LGG).samples}
    project = tmp_path / "project"
    init_project(project, LGG, preset="quick-lgg", pool="split", pretrain=False,  # as `alseg run` by default
                 overrides={"seed": 3, **TINY, "train": {"epochs": 2}})
    chosen = []
    for round in (1, 2):
        result = query(project)
        batch = result["batch"]
        assert batch["round"] == round and result["stopped"] == "awaiting labels"
        assert query(project)["batch"] == batch  # asking again shows the same batch
        ids = [row["id"] for row in _manifest(batch)]
        chosen.append(ids)
        _answer(batch, masks)
        done = ingest(project)
        assert done["complete"] and not done["invalid"] and len(done["stored"]) == len(ids)
    assert chosen == [r["expert_ids"] for r in reference["rounds"][1:]]
    final = query(project)  # trains round 2, then exports round 3's batch
    run_rounds = {r["round"]: r for r in reference["rounds"]}
    for r in final["rounds"]:
        assert r["test_dice"] == pytest.approx(run_rounds[r["round"]]["test_dice"], abs=1e-6)
        assert r["expert_labelled"] == run_rounds[r["round"]]["expert_labelled"]


@pytest.fixture(scope="module")
def isic_project(tmp_path_factory):
    """Real ISIC images: 200 of them, 40 with their masks as the lab's starting set."""
    root = tmp_path_factory.mktemp("isic-project")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    samples = open_dataset(ISIC).samples[:200]
    for k, s in enumerate(samples):
        (images / s.image.name).symlink_to(s.image)
        if k % 5 == 0:
            (masks / s.mask.name).symlink_to(s.mask)
    return root, {s.id: s.mask for s in samples}


def test_isic_project_two_rounds_records_validation_dice(isic_project, tmp_path):
    root, truth = isic_project
    project = tmp_path / "lab"
    created = run_json("init", project, "--images", root / "images", "--masks", root / "masks", "--preset",
                       "quick-isic", "--size", "32", "--width", "4", "--epochs", "2", "--round-epochs", "1",
                       "--mc-passes", "3")
    assert created["expert_labelled"] + created["pool"] == 200 - 8  # a fifth of the 40 validate
    assert (created["pool"], created["queued"]) == (160, 0)
    for round in (1, 2):
        result = run_json("query", project, "-n", "10")
        batch = result["batch"]
        assert batch["round"] == round and batch["images"] == 10 and result["queued"] == 10
        rows = _manifest(batch)
        first = rows[0]
        image = Image.open(Path(batch["folder"]) / first["image"])
        predicted = Image.open(Path(batch["folder"]) / first["predicted"])
        overlay = Image.open(Path(batch["folder"]) / first["uncertainty"])
        source = Image.open(open_dataset(ISIC).samples[0].image.parent / f"{first['id']}.jpg")
        assert image.size == predicted.size == overlay.size == source.size  # the original size
        assert set(np.unique(np.asarray(predicted))) <= {0, 255} and overlay.mode == "RGB"
        assert {r["reason"] for r in rows} <= {"missed", "uncertain", "low-uncertainty random"}
        _answer(batch, truth)
        stored = json.loads(run_cli("ingest", project, "--json").stdout)
        assert stored["complete"] and len(stored["stored"]) == 10
    status = run_json("query", project)
    assert [r["round"] for r in status["rounds"]] == [0, 1, 2]
    assert all(r["val_dice"] is not None and 0 <= r["val_dice"] <= 1 for r in status["rounds"])
    assert [r["expert_labelled"] for r in status["rounds"]] == [32, 42, 52]
    shown = run_json("status", project)
    assert (shown["expert_labelled"], shown["queued"], shown["pool"]) == (52, 10, 130)  # queued left the pool


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "data", n=40, size=48, seed=5)


def _plain_folders(src: Path, root: Path, with_masks: int) -> tuple[Path, Path]:
    images, masks = root / "imgs", root / "msks"
    images.mkdir(parents=True)
    masks.mkdir()
    for k, p in enumerate(sorted((src / "images").iterdir())):
        shutil.copy(p, images / p.name)
        if k < with_masks:
            m = next((src / "masks").glob(p.stem + "*"))
            shutil.copy(m, masks / m.name)
    return images, masks


def _truth(src: Path) -> dict[str, Path]:
    return {p.name.split("_mask")[0].rsplit(".", 1)[0]: p for p in (src / "masks").iterdir()}


def test_project_without_masks_starts_with_a_random_initial_batch(synthetic, tmp_path):
    images, _ = _plain_folders(synthetic, tmp_path, 0)
    project = tmp_path / "p"
    created = init_project(project, images, preset="demo", overrides=TINY, pretrain=False)
    assert (created["expert_labelled"], created["pool"]) == (0, 40)
    first = query(project, n=10)
    batch = first["batch"]
    rows = _manifest(batch)
    assert batch["round"] == 0 and len(rows) == 10 and {r["reason"] for r in rows} == {"initial"}
    assert all(not r["predicted"] for r in rows)  # no model yet: nothing to offer as a head start
    _answer(batch, _truth(synthetic))
    assert ingest(project)["complete"]
    second = query(project, n=6)
    assert [r["round"] for r in second["rounds"]] == [0] and second["rounds"][0]["val_dice"] is not None
    with RunStore.open_readonly(project) as store:
        assert len(store.split()["val"]) == 2 and len(store.labelled_ids(("expert",))) == 8
    assert second["batch"]["round"] == 1 and len(_manifest(second["batch"])) == 6


@pytest.fixture(scope="module")
def base_project(synthetic, tmp_path_factory):
    """A project with 10 masks whose round-1 batch of 6 is open (made once, copied per test)."""
    root = tmp_path_factory.mktemp("base")
    images, masks = _plain_folders(synthetic, root, 10)
    project = root / "p"
    init_project(project, images, masks, preset="demo", overrides=TINY)
    query(project, n=6)
    return project


@pytest.fixture
def open_batch(base_project, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(base_project, project, symlinks=True)
    folder = project / "rounds" / "001"
    batch = {"round": 1, "folder": str(folder), "manifest": str(folder / "manifest.csv")}
    return project, batch, _manifest(batch)


def test_ingest_validates_each_mask_and_keeps_the_rest_queued(open_batch, synthetic, tmp_path):
    project, batch, rows = open_batch
    folder = Path(batch["folder"]) / "masks"
    truth = _truth(synthetic)
    good = read_mask(truth[rows[0]["id"]])
    Image.fromarray(good.astype(np.uint8) * 255).save(folder / rows[0]["mask"].split("/")[-1])
    # at the working size (32 px) is fine too, and a _mask suffix
    small = np.asarray(Image.fromarray(good.astype(np.uint8) * 255).resize((32, 32), Image.NEAREST))
    Image.fromarray(small).save(folder / f"{rows[1]['id']}_mask.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(folder / f"{rows[2]['id']}.png")        # wrong size
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (48, 1))).save(folder / f"{rows[3]['id']}.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(folder / f"{rows[4]['id']}.png")        # empty
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(folder / "stranger.png")            # not in the batch
    outside = tmp_path / "outside.png"
    Image.fromarray(good.astype(np.uint8) * 255).save(outside)
    (folder / f"{rows[5]['id']}.png").symlink_to(outside)                                    # leads out
    proc = run_cli("ingest", project, "--json", check=False)
    assert proc.returncode == 2
    result = json.loads(proc.stdout)
    assert sorted(result["stored"]) == sorted([rows[0]["id"], rows[1]["id"]])
    problems = {Path(b["file"]).name: b["problem"] for b in result["invalid"]}
    assert "20x20" in problems[f"{rows[2]['id']}.png"] and "48x48" in problems[f"{rows[2]['id']}.png"]
    assert "not binary" in problems[f"{rows[3]['id']}.png"]
    assert "empty" in problems[f"{rows[4]['id']}.png"]
    assert "no image of the batch" in problems["stranger.png"]
    assert "leads out" in problems[f"{rows[5]['id']}.png"]
    assert sorted(result["queued"]) == sorted(r["id"] for r in rows[2:])
    # the empty mask is a real answer once the expert says so; the same masks again change nothing
    (folder / f"{rows[3]['id']}.png").unlink()
    (folder / f"{rows[5]['id']}.png").unlink()
    (folder / f"{rows[2]['id']}.png").unlink()
    (folder / "stranger.png").unlink()
    again = ingest(project, allow_empty=True)
    assert again["stored"] == [rows[4]["id"]] and sorted(again["unchanged"]) == sorted([rows[0]["id"], rows[1]["id"]])
    with RunStore.open_readonly(project) as store:
        assert not store.mask(rows[4]["id"]).any()
        assert np.array_equal(store.mask(rows[0]["id"]), good)
        assert store.mask(rows[1]["id"]).shape == (32, 32)
        before = store.counts()
    # a corrected mask replaces the earlier one, and the change is recorded
    corrected = good.copy()
    corrected[:8] = True
    Image.fromarray(corrected.astype(np.uint8) * 255).save(folder / rows[0]["mask"].split("/")[-1])
    assert ingest(project)["replaced"] == [rows[0]["id"]]
    with RunStore.open_readonly(project) as store:
        assert np.array_equal(store.mask(rows[0]["id"]), corrected)
        assert [a["action"] for a in store.annotations(rows[0]["id"])] == ["stored", "unchanged", "replaced"]
        assert store.counts() == before  # a correction moves no label


def test_second_writer_is_refused_with_the_holder_named(open_batch):
    project, _, _ = open_batch
    with Project(project, command="serve"):
        proc = run_cli("ingest", project, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        assert f"in use by process {os.getpid()} (alseg serve)" in proc.stderr
        with pytest.raises(AlsegError, match="in use by process"):
            query(project)
        assert run_json("status", project)["queued"] == 6  # readers need no lock
    assert run_cli("ingest", project).returncode == 0  # released with the handle


def test_lock_dies_with_its_process(open_batch):
    project, _, _ = open_batch
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from alseg.project import Project; "
                               f"p = Project({str(project)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "in use by process" in run_cli("ingest", project, check=False).stderr
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("ingest", project).returncode == 0


def test_run_refuses_a_project_and_query_refuses_a_run(open_batch, tmp_path):
    project, _, _ = open_batch
    proc = run_cli("run", "--resume", project, check=False)
    assert proc.returncode == 2 and "alseg query" in proc.stderr
    with pytest.raises(AlsegError, match="not a project"):
        sim = tmp_path / "sim"
        from alseg.active.loop import start_run
        from alseg.config import build_config

        start_run(build_config("demo", overrides={**TINY, "data": {**TINY["data"], "path": str(LGG)}}), sim)
        query(sim)
