"""A lab project's report: the validation learning curve, titles that name the split, and the
expert's effort per round as the store recorded it (issue 29).

The project is the review fixture's (tests/annotate_fixtures.py: 12 initial masks, a batch of 8
open), copied, labelled through :class:`alseg.project.Project` with known seconds, and taken one
round further with a tiny model, so that the report has rounds 0 and 1.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from annotate_fixtures import build_project, copy_project, png

SECONDS = [11.0, 12.5, 13.0, 14.0, 15.5, 16.0, 17.0, 18.5]  # the owner's wall time on each batch image
ACTIVE = [5.0, 6.0, 1.0, 7.5, 8.0, 9.0, 4.5, 10.0]  # the part the page saw them drawing
STROKES = [3, 4, 0, 5, 2, 6, 1, 7]
FIRST_TRY, VIEWED, SECOND = 4.0, 3.0, 21.0  # a wrong first mask, corrected; viewing; a second reading
ACCEPTED = 2  # the batch item whose predicted mask the expert takes as it is


def figure_about(path) -> dict:
    """What a report PNG says it draws (titles, labels, legend, points per line)."""
    with Image.open(path) as im:
        return json.loads(im.text["Description"])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project after round 1, its report, and what the test fed in: the final masks, the
    predicted masks and the second reading."""
    from alseg.project import Project, query
    from alseg.report import make_report

    from annotate_fixtures import predicted

    template, truth = build_project(tmp_path_factory)
    project = copy_project(template, tmp_path_factory.mktemp("project-report") / "project")
    with Project(project, command="test") as p:
        batch = p.batch()
        items = batch.items
        heads = {it.id: predicted(batch, it) for it in items}
        final = {it.id: heads[it.id] if k == ACCEPTED else truth[it.id] for k, it in enumerate(items)}
        first = items[0].id
        p.submit(first, png(np.roll(truth[first], 9, axis=0)), seconds=FIRST_TRY)
        for k, it in enumerate(items):
            p.submit(it.id, png(final[it.id]), seconds=SECONDS[k], replace=True,
                     effort={"active_seconds": ACTIVE[k], "strokes": STROKES[k], "clicks": 2 * STROKES[k]})
        p.record_time(items[1].id, VIEWED, "view")
        second = np.roll(truth[items[3].id], 2, axis=1)
        p.submit(items[3].id, png(second), seconds=SECOND, annotator="second")
    query(project)  # trains round 1 on the batch, exports round 2's
    make_report(project, images=2, device="cpu")
    fed = {"ids": [it.id for it in items], "final": final, "heads": heads, "second": (items[3].id, second)}
    return project, fed


def test_a_projects_learning_curve_is_validation_dice_per_round_and_says_so(project):
    from alseg.active.loop import status

    path, _ = project
    report = path / "report"
    rounds = status(path)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    about = figure_about(report / "learning-curve.png")
    assert "validation" in about["title"] and "test" not in about["title"].lower()
    (ax,) = about["axes"]
    val_images = rounds[-1]["model"]["val_images"]
    assert val_images > 0
    # one point per finished round, solid, and no test line
    assert ax["lines"] == {f"validation Dice ({val_images} images)": {"points": 2, "linestyle": "-"}}
    assert ax["xlabel"] == "expert-labelled training images" and "Dice" in ax["ylabel"]
    page = (report / "index.html").read_text()
    assert "No test split" in page and "test Dice mean" not in page  # no empty test columns
    with open(report / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["val_dice"]) for r in rows] == pytest.approx([r["val_dice"] for r in rounds])


def test_a_projects_figures_name_the_split_they_show(project):
    path, _ = project
    report = path / "report"
    assert figure_about(report / "predictions-initial.png")["title"].startswith(
        "Predictions on validation images, round 0")
    assert figure_about(report / "predictions-final.png")["title"].startswith("Predictions on validation images, round 1")
    for name in ("training-initial.png", "training-active.png", "histogram-round-01.png"):
        about = figure_about(report / name)
        assert about["title"] and all(a["xlabel"] and a["ylabel"] for a in about["axes"] if a["lines"]), name
    assert "pool" in figure_about(report / "histogram-round-01.png")["title"]
    assert any(label.startswith("validation Dice (") for a in figure_about(report / "training-initial.png")["axes"]
               for label in a["legend"])


def test_the_effort_table_holds_what_the_expert_did(project):
    from alseg.store import RunStore

    path, fed = project
    report = path / "report"
    with open(report / "effort.csv") as fh:
        rows = list(csv.DictReader(fh))
    batch = [r for r in rows if r["round"] == "1"]
    assert rows == batch  # round 0 was the lab's own masks: no effort recorded

    def total(key: str) -> float:
        return sum(float(r[key]) for r in batch)

    ids = fed["ids"]
    assert total("images") == len(ids)
    assert total("versions") == len(ids) + 2  # one correction and one second reading
    assert total("seconds") == pytest.approx(sum(SECONDS) + FIRST_TRY + VIEWED + SECOND)
    assert total("active_seconds") == pytest.approx(sum(ACTIVE))
    assert total("strokes") == sum(STROKES) and total("clicks") == 2 * sum(STROKES)
    changed = {i: int(np.count_nonzero(fed["final"][i] != fed["heads"][i])) for i in ids}
    assert changed[ids[ACCEPTED]] == 0 and all(changed[i] > 0 for i in ids if i != ids[ACCEPTED])
    assert total("changed_prediction_sum") == sum(changed.values())  # the final masks, not the first try
    assert total("accepted_as_is") == 1 and total("compared_with_prediction") == len(ids)
    with RunStore.open_readonly(path) as store:
        reasons = store.selection_reasons(1)
        by_round = store.effort_by_round()
    assert {r["reason"] for r in batch} == {reasons[i] for i in ids}  # one row per selection reason
    assert [(r["reason"], int(r["images"]), float(r["seconds"])) for r in batch] == [
        (r["reason"], r["images"], r["seconds"]) for r in by_round]
    page = (report / "index.html").read_text()
    assert "<h2>The expert's effort</h2>" in page and 'href="effort.csv"' in page
    minutes = (sum(SECONDS) + FIRST_TRY + VIEWED + SECOND) / 60
    assert f"<th>{minutes:.1f}</th>" in page  # the table's total row
    about = figure_about(report / "expert-effort.png")
    assert [a["ylabel"] for a in about["axes"]] == ["expert minutes", "images", "thousand pixels"]
    minutes_axis, images_axis, _ = about["axes"]
    assert minutes_axis["lines"]["active minutes (drawing, all reasons)"]["points"] == 1
    assert {"mask versions stored (corrections count)", "accepted as predicted"} <= set(images_axis["lines"])


def test_the_report_shows_how_far_two_annotators_agree(project):
    path, fed = project
    id, second = fed["second"]
    page = (path / "report" / "index.html").read_text()
    expected = dice(fed["final"][id], second)
    assert 0 < expected < 1
    assert "<h3>Annotator agreement</h3>" in page
    assert f"1 image was labelled by two annotators; the mean Dice between the owner's mask and the second " \
           f"reading is <b>{expected:.4f}</b>" in page
