"""Hardening of a project's files and store (issue 32: 2, 3, 4, 6, 8, 9, 10, 11, 12): names that could
mean two images, two files for one image, an edited or damaged manifest.csv, a leftover batch folder,
a FIFO among the masks, a full disk, a run.db of another version, init errors that named removed paths.

Most tests work on a copy of one small project with an open batch of 8 (tests/annotate_fixtures.py);
the name-collision tests on a project of their own whose pool holds ``a b.png`` and ``a_b.png``."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alseg.annotate.export import MANIFEST, batch_stems
from alseg.errors import AlsegError
from alseg.progress import Reporter
from alseg.project import Project, ingest, init_project, query
from alseg.store import SCHEMA_VERSION, RunStore
from annotate_fixtures import copy_project, png

TINY = {"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 1, "min_epoch_steps": 5},
        "active": {"round_epochs": 1, "mc_passes": 2}}


def _one_line(capsys, argv: list[str], *needles: str) -> str:
    from alseg.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("alseg: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for needle in needles:  # (notes printed before the error, as init's, are fine)
        assert needle in errors[0], errors[0]
    return errors[0]


def _rows(folder: Path) -> list[dict]:
    with (folder / MANIFEST).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(folder: Path, rows: list[dict]) -> None:
    with (folder / MANIFEST).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _queued(path: Path) -> list[str]:
    with RunStore.open_readonly(path) as store:
        return store.queued()


def _stored(path: Path, id: str):
    with RunStore.open_readonly(path) as store:
        return store.mask(id)


def _drop_batch_record(path: Path) -> None:
    """What a batch exported before the store recorded its items looks like."""
    with sqlite3.connect(path / "run.db") as conn:
        conn.execute("DELETE FROM round_facts WHERE name = 'batch'")


# ------------------------------------------------------------------ 2: names that could mean two images
@pytest.fixture(scope="module")
def collide(tmp_path_factory):
    """A project whose batch holds every pool image, among them ``a b`` and ``a_b``, with their true masks."""
    from alseg.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("collide")
    src = make_synthetic(root / "synthetic", n=18, size=64)
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    truth = {}
    for k, path in enumerate(sorted((src / "images").iterdir())):
        name = {12: "a b.png", 13: "a_b.png"}.get(k, path.name)
        shutil.copy(path, images / name)
        if k < 12:
            shutil.copy(src / "masks" / path.name, masks / name)
        else:
            truth[Path(name).stem] = np.asarray(Image.open(src / "masks" / path.name).convert("L")) >= 128
    project = root / "project"
    init_project(project, images, masks, preset="demo", overrides=TINY, pretrain=False)
    query(project, n=6)
    return project, truth


def test_batch_stems_never_equal_another_id():
    stems = batch_stems(["a b", "a_b", "A", "a", "a_b-2", "x/y", "x_y"])
    assert len({s.lower() for s in stems.values()}) == len(stems)
    assert stems["a_b"] == "a_b" and stems["a_b-2"] == "a_b-2" and stems["x_y"] == "x_y" and stems["A"] == "A"
    for id, stem in stems.items():
        assert stem == id or stem not in stems, (id, stem)


def test_a_mask_named_by_id_goes_to_that_id_not_to_the_image_whose_file_has_its_name(collide, tmp_path):
    path = copy_project(collide[0], tmp_path / "p")
    truth = collide[1]
    folder = path / "rounds" / "001"
    by_id = {r["id"]: r for r in _rows(folder)}
    assert {"a b", "a_b"} <= set(by_id)
    ids = set(by_id)
    for r in by_id.values():  # no exported file name is another image's id
        assert Path(r["mask"]).stem == r["id"] or Path(r["mask"]).stem not in ids
    (folder / "masks" / "a_b_mask.png").write_bytes(png(truth["a_b"]))  # named by its id, with the suffix
    (folder / "masks" / Path(by_id["a b"]["mask"]).name).write_bytes(png(truth["a b"]))  # as the manifest names it
    result = ingest(path)
    assert result["invalid"] == [] and sorted(result["stored"]) == ["a b", "a_b"]
    assert np.array_equal(_stored(path, "a_b"), truth["a_b"]) and np.array_equal(_stored(path, "a b"), truth["a b"])


def test_a_name_that_could_mean_two_images_is_refused(collide, tmp_path):
    """A batch exported before file names avoided ids: ``a b`` got ``a_b.png``, ``a_b`` got ``a_b-2.png``."""
    path = copy_project(collide[0], tmp_path / "p")
    truth = collide[1]
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    for r in rows:
        if r["id"] in ("a b", "a_b"):
            new = "a_b" if r["id"] == "a b" else "a_b-2"
            for key in ("image", "predicted", "uncertainty", "mask"):
                if r[key]:
                    old, r[key] = r[key], str(Path(r[key]).with_name(new + Path(r[key]).suffix))
                    if (folder / old).exists():
                        os.replace(folder / old, folder / (r[key] + ".tmp"))
    for tmp in folder.rglob("*.tmp"):
        os.replace(tmp, tmp.with_suffix(""))
    _write_rows(folder, rows)
    _drop_batch_record(path)
    (folder / "masks" / "a_b_mask.png").write_bytes(png(truth["a_b"]))  # a_b's id, or a b's file name?
    (folder / "masks" / "a_b.png").write_bytes(png(truth["a b"]))  # the manifest's own name: a b's
    result = ingest(path)
    assert [Path(bad["file"]).name for bad in result["invalid"]] == ["a_b_mask.png"]
    problem = result["invalid"][0]["problem"]
    assert "could be 'a b' or 'a_b'" in problem and "name it as manifest.csv does" in problem
    assert result["stored"] == ["a b"] and "a_b" in result["queued"]
    assert np.array_equal(_stored(path, "a b"), truth["a b"]) and _stored(path, "a_b") is None


# ------------------------------------------------------------------ 3: two files for one image
def test_two_files_for_one_image_are_both_refused(project):
    path, truth = project
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    first, second = rows[0], rows[1]
    stem = Path(first["mask"]).stem
    other = truth[first["id"]].copy()
    other[:6] = ~other[:6]
    (folder / "masks" / f"{stem}.png").write_bytes(png(truth[first["id"]]))
    (folder / "masks" / f"{stem}_mask.png").write_bytes(png(other))
    (folder / "masks" / Path(second["mask"]).name).write_bytes(png(truth[second["id"]]))
    result = ingest(path)
    assert result["stored"] == [second["id"]]
    assert sorted(Path(bad["file"]).name for bad in result["invalid"]) == [f"{stem}.png", f"{stem}_mask.png"]
    assert all("keep one" in bad["problem"] for bad in result["invalid"])
    assert _stored(path, first["id"]) is None and first["id"] in _queued(path)


# ------------------------------------------------------------------ 4: the manifest is not trusted
@pytest.mark.parametrize("recorded", [True, False], ids=["store-record", "exported-before-records"])
def test_an_edited_manifest_cannot_make_a_wrong_size_fit(project, recorded):
    path, truth = project
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    target = rows[0]
    true_size = (int(target["width"]), int(target["height"]))
    target["width"], target["height"] = "640", "480"
    _write_rows(folder, rows)
    if not recorded:
        _drop_batch_record(path)
    big = np.zeros((480, 640), bool)
    big[100:300, 200:400] = True
    (folder / "masks" / Path(target["mask"]).name).write_bytes(png(big))
    result = ingest(path)
    assert result["stored"] == [] and len(result["invalid"]) == 1
    assert f"but its image is {true_size[0]}x{true_size[1]}" in result["invalid"][0]["problem"]
    with Project(path, command="test") as p:
        assert (p.batch().item(target["id"]).width, p.batch().item(target["id"]).height) == true_size
        with pytest.raises(AlsegError, match="mask is 640x480"):
            p.submit(target["id"], png(big))
    assert _stored(path, target["id"]) is None
    if not recorded:  # the next query records the batch, its sizes from the images it was exported from
        query(path)
        with RunStore.open_readonly(path) as store:
            record = {r["id"]: r for r in store.batch_record(1)}
        assert len(record) == len(rows) and (record[target["id"]]["width"], record[target["id"]]["height"]) == true_size


def test_a_manifest_listing_other_images_than_the_store_is_damaged(project):
    path, _ = project
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    rows[0]["id"] = "not-in-this-batch"
    _write_rows(folder, rows)
    with pytest.raises(AlsegError, match=r"manifest.csv is damaged \(lists 'not-in-this-batch'"):
        ingest(path)


# ------------------------------------------------------------------ 6: disk full
class _FullDisk:
    """A sqlite3 connection whose statements matching ``when`` fail as a full disk makes them fail."""

    def __init__(self, conn, when, message):
        self._conn, self._when, self._message = conn, when, message

    def execute(self, sql, *args):
        if self._when(sql):
            raise sqlite3.OperationalError(self._message)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        if self._when(sql):
            raise sqlite3.OperationalError(self._message)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _fill_disk(monkeypatch, when, message: str = "database or disk is full") -> None:
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: _FullDisk(real(*a, **k), when, message))


def test_disk_full_during_ingest_is_one_line_and_keeps_what_was_stored(project, monkeypatch, capsys):
    path, truth = project
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    for r in rows:
        (folder / "masks" / Path(r["mask"]).name).write_bytes(png(truth[r["id"]]))
    seen = {"n": 0}

    def third_mask(sql: str) -> bool:
        if sql.startswith("INSERT INTO annotations"):
            seen["n"] += 1
            return seen["n"] == 3
        return False

    _fill_disk(monkeypatch, third_mask)
    line = _one_line(capsys, ["ingest", str(path)], "disk full", "nothing half-written was kept", "2 mask(s)")
    assert "alseg ingest" in line
    monkeypatch.undo()
    with RunStore.open_readonly(path) as store:
        assert len(store.mask_ids()) == 2 and len(store.queued()) == len(rows) - 2
        assert store.conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 2
    assert sorted(ingest(path)["stored"]) == sorted(r["id"] for r in rows[2:])


@pytest.mark.parametrize("statement", ["CREATE TABLE", "INSERT INTO samples"], ids=["schema", "start"])
def test_disk_full_during_init_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, statement):
    from alseg.data.synthetic import make_synthetic

    src = make_synthetic(tmp_path / "synthetic", n=14, size=64)
    _fill_disk(monkeypatch, lambda sql: sql.strip().startswith(statement))
    out = tmp_path / "project"
    args = ["init", str(out), "--images", str(src / "images"), "--masks", str(src / "masks"), "--preset", "demo",
            "--no-pretrain"]
    line = _one_line(capsys, args, "disk full", "nothing half-written was kept")
    assert "damaged" not in line and not out.exists()
    # what a full disk may also look like to SQLite: not "damaged", and named by the folder init tried to make
    _fill_disk(monkeypatch, lambda sql: sql.strip().startswith(statement), "disk I/O error")
    line = _one_line(capsys, args, f"{out}: ", "is the disk full?")
    assert "damaged" not in line and "run.db:" not in line and not out.exists()


# ------------------------------------------------------------------ 8: a FIFO among the masks
def test_a_fifo_in_the_masks_folder_is_refused_without_blocking(project):
    path, truth = project
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    fifo = folder / "masks" / Path(rows[0]["mask"]).name
    os.mkfifo(fifo)
    (folder / "masks" / Path(rows[1]["mask"]).name).write_bytes(png(truth[rows[1]["id"]]))
    got: dict = {}
    worker = threading.Thread(target=lambda: got.update(ingest(path)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the reader before failing, so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("ingest blocked on a FIFO")
    assert got["stored"] == [rows[1]["id"]]
    assert got["invalid"] == [{"file": str(fifo), "problem": "not a regular file"}]


# ------------------------------------------------------------------ 9 and 10: leftover or damaged batch folders
class _Notes(Reporter):
    def __init__(self):
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.mark.parametrize("with_masks", [True, False], ids=["with-masks", "empty"])
def test_a_batch_folder_without_manifest_is_set_aside_and_exported_again(project, with_masks):
    path, truth = project
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    (folder / MANIFEST).unlink()
    if with_masks:
        (folder / "masks" / Path(rows[0]["mask"]).name).write_bytes(png(truth[rows[0]["id"]]))
    notes = _Notes()
    result = query(path, reporter=notes)
    assert result["batch"]["round"] == 1 and result["batch"]["images"] == len(rows)
    assert [r["id"] for r in _rows(folder)] == [r["id"] for r in rows]
    aside = path / "rounds" / "001.aside-1"
    assert aside.is_dir() == with_masks
    assert len(notes.notes) == 1 and "no manifest.csv" in notes.notes[0]
    assert ("moved to" in notes.notes[0]) == with_masks and ("removed" in notes.notes[0]) != with_masks
    if with_masks:
        assert ingest(path, aside / "masks")["stored"] == [rows[0]["id"]]


GARBAGE = {
    "binary": b"\x00\xff\xfe garbage \x00\n\x01,\x02\n",
    "no-id-column": b"name,file\nx,y\n",
    "width-not-a-number": None,  # the real manifest with one width replaced
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_a_damaged_manifest_is_one_line_the_page_starts_and_query_exports_again(project, capsys, kind):
    path, truth = project
    folder = path / "rounds" / "001"
    rows = _rows(folder)
    if GARBAGE[kind] is None:
        damaged = [dict(r) for r in rows]
        damaged[2]["width"] = "wide"
        _write_rows(folder, damaged)
    else:
        (folder / MANIFEST).write_bytes(GARBAGE[kind])
    (folder / "masks" / Path(rows[0]["mask"]).name).write_bytes(png(truth[rows[0]["id"]]))
    with pytest.raises(AlsegError, match=r"manifest.csv is damaged \(.*\); run `alseg query` to export the batch"):
        ingest(path)
    _one_line(capsys, ["ingest", str(path)], "manifest.csv is damaged", "alseg query")
    with Project(path, command="test") as p:  # the review page still starts, and says what is wrong
        assert p.status()["open_round"] == 1
        with pytest.raises(AlsegError, match="manifest.csv is damaged"):
            p.batch()
        from fastapi.testclient import TestClient

        from alseg.annotate.server import create_app

        answer = TestClient(create_app(p)).get("/api/batch")
        assert answer.status_code == 409 and "manifest.csv is damaged" in answer.json()["error"]
    query(path)
    assert [r["id"] for r in _rows(folder)] == [r["id"] for r in rows]
    assert (path / "rounds" / "001.aside-1" / "masks" / Path(rows[0]["mask"]).name).is_file()
    (folder / "masks" / Path(rows[1]["mask"]).name).write_bytes(png(truth[rows[1]["id"]]))
    assert ingest(path)["stored"] == [rows[1]["id"]]


# ------------------------------------------------------------------ 11: a run.db of another version
@pytest.mark.parametrize("version", [None, 0, 1, '"4"', SCHEMA_VERSION + 1],
                         ids=["none", "zero", "one", "text", "newer"])
def test_a_run_db_of_another_version_is_refused_in_one_line(project, capsys, version):
    path, _ = project
    with sqlite3.connect(path / "run.db") as conn:  # every table there: only the version says it is foreign
        if version is None:
            conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
        else:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                         (version if isinstance(version, str) else json.dumps(version),))
    before = (path / "run.db").read_bytes()
    for open_it in (RunStore, RunStore.open_readonly):
        with pytest.raises(AlsegError, match="schema"):
            open_it(path)
    line = _one_line(capsys, ["status", str(path)], "run.db", "schema")
    if version == SCHEMA_VERSION + 1:
        assert "newer alseg" in line
    if version in (0, 1):
        assert "older alseg" in line
    _one_line(capsys, ["ingest", str(path)], "run.db", "schema")
    assert (path / "run.db").read_bytes() == before


# ------------------------------------------------------------------ 12: init errors name the user's files
def test_init_errors_name_the_users_file_not_the_removed_project(tmp_path):
    from alseg.data.synthetic import make_synthetic

    src = make_synthetic(tmp_path / "synthetic", n=14, size=64)
    (src / "images" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "project"
    with pytest.raises(AlsegError) as err:
        init_project(out, src / "images", src / "masks", preset="demo", overrides=TINY, pretrain=False)
    assert err.value.path == str((src / "images" / "broken.png").resolve())
    assert str(out) not in str(err.value) and not out.exists()
