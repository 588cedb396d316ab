"""The expert's commands around the page: export to other tools and back, undo, effort CSV, serve's help."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from annotate_fixtures import copy_project, png

from alseg.cli import main
from alseg.project import Project
from alseg.store import RunStore


def _run(capsys, *args) -> tuple[int, dict | str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    try:
        return code, json.loads(captured.out)
    except ValueError:
        return code, captured.out + captured.err


@pytest.fixture
def labelled(template, tmp_path):
    """A copy whose batch has three masks: two from the truth, one shifted (to be corrected)."""
    project, truth = template
    path = copy_project(project, tmp_path / "p")
    ids = sorted(truth)[:3]
    with Project(path, command="test") as p:
        for k, id in enumerate(ids):
            mask = np.roll(truth[id], 4, axis=0) if k == 2 else truth[id]
            p.submit(id, png(mask), seconds=5.0, effort={"active_seconds": 4.0, "strokes": k, "clicks": 1})
    return path, truth, ids


@pytest.mark.parametrize("fmt", ["coco", "cvat", "labelstudio"])
def test_masks_corrected_in_another_tool_come_back_through_ingest(labelled, tmp_path, capsys, fmt):
    path, truth, ids = labelled
    out = tmp_path / f"export-{fmt}"
    code, result = _run(capsys, "export", path, "--format", fmt, "--out", out, "--json")
    assert code == 0, result
    assert result["masks"] >= 3
    exported = {"coco": out / "annotations.json", "cvat": out / "annotations.zip",
                "labelstudio": out / "tasks.json"}[fmt]
    # the same masks back: nothing changes
    code, result = _run(capsys, "ingest", path, exported, "--json")
    assert code == 0, result["invalid"]
    assert not result["invalid"] and not result["replaced"] and set(ids) <= set(result["unchanged"])
    with RunStore.open_readonly(path) as store:  # the lab's first masks came back unchanged too
        initial = store.labelled_ids(origins=("initial",))
    assert set(initial) <= set(result["unchanged"])


def test_export_png_folder_round_trip_corrects_and_undo_restores(labelled, tmp_path, capsys):
    path, truth, ids = labelled
    out = tmp_path / "png"
    code, result = _run(capsys, "export", path, "--format", "png", "--out", out, "--json")
    assert code == 0, result
    with (out / "manifest.csv").open(newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    wrong = ids[2]
    from PIL import Image

    Image.fromarray(truth[wrong].astype(np.uint8) * 255).save(out / rows[wrong]["mask"])  # corrected
    first = next(r for r in rows.values() if r["origin"] == "initial")
    Image.fromarray(np.zeros((3, 3), np.uint8) + 255).resize(Image.open(out / first["mask"]).size).save(
        out / first["mask"])  # a lab's first mask changed: it trains from the lab's file, so that is refused
    code, result = _run(capsys, "ingest", path, out, "--json")
    assert code == 2
    assert result["replaced"] == [wrong]
    assert [bad["problem"] for bad in result["invalid"]] == [
        f"differs from one of the lab's first masks, which trains from its own file: correct "
        f"{_initial_file(path, first['id'])} instead"]
    with RunStore.open_readonly(path) as store:
        assert np.array_equal(store.mask(wrong), truth[wrong])
    code, result = _run(capsys, "undo", path, wrong, "--json")
    assert code == 0, result
    with RunStore.open_readonly(path) as store:
        assert np.array_equal(store.mask(wrong), np.roll(truth[wrong], 4, axis=0))  # the earlier version again


def _initial_file(path, id):
    from alseg.annotate.exchange import initial_masks

    with RunStore.open_readonly(path) as store:
        return next(sample.mask for sample in initial_masks(store).values() if sample.id == id)


def test_effort_csv_and_status_show_what_the_expert_did(labelled, tmp_path, capsys):
    path, _, ids = labelled
    csv_path = tmp_path / "effort.csv"
    code, result = _run(capsys, "export", path, "--format", "effort", "--out", csv_path, "--json")
    assert code == 0 and result["rows"] >= 3
    with csv_path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["id"] in ids]
    assert len(rows) == 3 and {float(r["active_seconds"]) for r in rows} == {4.0}
    code, text = _run(capsys, "status", path)
    assert code == 0 and "expert effort: 3 masks stored for 3 images" in text


def test_ingest_of_a_round_that_has_no_batch_is_one_line(labelled, tmp_path, capsys):
    path, _, _ = labelled
    code, text = _run(capsys, "ingest", path, "--round", "7")
    assert code == 2 and text.count("\n") == 1 and "round 7" in text


def test_serve_help_says_what_binding_off_this_machine_means(capsys):
    code, text = _run(capsys, "serve", "--help")
    assert code == 0
    flat = " ".join(text.split())
    for words in ("every request needs a token", "alseg token PROJECT NAME", "--token-file", "reverse proxy"):
        assert words in flat, words
