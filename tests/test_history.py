"""Mask history, corrections of any round, undo, several annotators and the expert's effort (issue 29).

Every test works on a copy of one small project with an open batch of 8 (tests/annotate_fixtures.py)
whose predicted masks are known (the true mask shifted by 3 px; the last item's is empty), so the
pixels an annotation changed can be counted here independently of the store.
"""
from __future__ import annotations

import csv
import sqlite3

import numpy as np
import pytest
from PIL import Image

from annotate_fixtures import BATCH, png, predicted
from alseg.active.loop import ActiveRun, status
from alseg.annotate.effort import EVENT_COLUMNS, effort_rows
from alseg.annotate.ingest import NeedsConfirm
from alseg.data.cache import mask_to_size
from alseg.errors import AlsegError
from alseg.metrics import dice_per_image
from alseg.project import Project, export_effort, ingest, query, undo
from alseg.store import RunStore


def _changed(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(a != b))


def _nearest(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) >= 128


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(dice_per_image(a[None], b[None])[0])


def _edited(mask: np.ndarray, rows: slice = slice(0, 6)) -> np.ndarray:
    out = mask.copy()
    out[rows] = ~out[rows]
    return out


# ------------------------------------------------------------------ replace asks first; every version kept
def test_replace_asks_first_then_replaces_and_keeps_the_old_version(project):
    path, truth = project
    with Project(path, command="test") as p:
        batch = p.batch()
        item = batch.items[0]
        true, other = truth[item.id], _edited(truth[item.id])
        pred = predicted(batch, item)
        first = p.submit(item.id, png(true), annotator="alice")
        assert (first["outcome"], first["version"], first["changed_previous"]) == ("stored", 1, None)
        assert first["changed_prediction"] == _changed(true, pred) > 0 and first["accepted"] is False
        assert (first["round"], first["labelled"], first["total"]) == (batch.round, 1, BATCH)
        assert p.submit(item.id, png(true), annotator="alice")["outcome"] == "unchanged"  # no question

        with pytest.raises(NeedsConfirm, match=r"already labelled \(version 1, by alice, .*\); replace it\?") as asked:
            p.submit(item.id, png(other), annotator="alice")
        assert asked.value.current["version"] == 1
        assert np.array_equal(p.stored_mask(item.id), true)  # nothing changed by asking

        second = p.submit(item.id, png(other), annotator="alice", replace=True)
        assert (second["outcome"], second["version"]) == ("replaced", 2)
        assert second["changed_previous"] == _changed(other, true)
        assert np.array_equal(p.stored_mask(item.id), other)
        assert np.array_equal(p.stored_mask(item.id, version=1), true)
        assert p.stored_mask(item.id, version=3) is None
        history = p.history(item.id)
        assert [(h["version"], h["action"], h["annotator"], h["role"], h["current"]) for h in history] == [
            (1, "stored", "alice", "owner", False), (2, "replaced", "alice", "owner", True)]
        assert history[0]["sha256"] != history[1]["sha256"]

        # the prediction taken as it is counts as accepted; a working-size mask is compared at its size
        accepted = p.submit(batch.items[1].id, png(predicted(batch, batch.items[1])))
        assert (accepted["changed_prediction"], accepted["accepted"]) == (0, True)
        wide = next(it for it in batch.items if (it.width, it.height) != (64, 64))
        small = _nearest(truth[wide.id], 32, 32)
        sent = p.submit(wide.id, png(small))
        assert sent["changed_prediction"] == _changed(small, _nearest(predicted(batch, wide), 32, 32))


# ------------------------------------------------------------------ undo
def test_undo_restores_the_previous_mask_and_training_uses_it(project):
    path, truth = project
    with Project(path, command="test") as p:
        item = p.batch().items[0]
        true, other = truth[item.id], _edited(truth[item.id])
        p.submit(item.id, png(true))
        p.submit(item.id, png(other), replace=True)
        done = p.undo(item.id)
        assert (done["outcome"], done["version"], done["restored_version"]) == ("restored", 3, 1)
        assert np.array_equal(p.stored_mask(item.id), true)
        history = p.history(item.id)
        assert [(h["action"], h["source"], h["current"]) for h in history] == [
            ("stored", "page", False), ("replaced", "page", False), ("undo", "undo", True)]
        assert history[2]["changed_previous"] == _changed(true, other)
        run = ActiveRun(p.store, p.config)
        assert np.array_equal(run.training_masks([item.id])[0], mask_to_size(true, p.size))
        # another annotator has nothing of theirs to undo on local's image
        with pytest.raises(AlsegError, match="nothing earlier to restore"):
            p.undo(item.id, annotator="bob")


def test_undo_of_a_first_submit_in_the_open_batch_requeues_it(project):
    path, truth = project
    with Project(path, command="test") as p:
        batch = p.batch()
        items = batch.items
        with pytest.raises(AlsegError, match="nothing earlier to restore"):
            p.undo(items[0].id)  # nothing stored yet
        for it in items:
            p.submit(it.id, png(truth[it.id]), annotator="alice")
        assert p.store.round_status(batch.round) == "labelled" and p.rounds()[-1]["open"] is False
        result = p.undo(items[0].id, annotator="alice")
        assert (result["outcome"], result["state"], result["queued"]) == ("requeued", "queued", [items[0].id])
        assert p.stored_mask(items[0].id) is None and not result["complete"]
        assert p.store.round_status(batch.round) == "awaiting"
        assert p.rounds()[-1] == {"round": batch.round, "total": BATCH, "labelled": BATCH - 1, "open": True}
        # nobody owns it now: the next annotator's mask is the one that trains
        again = p.submit(items[0].id, png(truth[items[0].id]), annotator="bob")
        assert again["outcome"] == "stored" and p.store.owner(items[0].id) == "bob" and again["complete"]
    # the module-level undo (the CLI's) holds the lock itself
    assert undo(path, items[1].id, annotator="alice")["outcome"] == "requeued"


# ------------------------------------------------------------------ a past round, corrected by files
def test_a_past_round_image_corrected_by_files_is_what_trains(project):
    path, truth = project
    with Project(path, command="test") as p:
        first = p.batch()
        for k, it in enumerate(first.items):
            p.submit(it.id, png(truth[it.id]), seconds=10.0, effort={"active_seconds": 4.0 + k, "strokes": k})
    query(path, n=4)  # trains round 1's model, exports round 2's batch
    with Project(path, command="test") as p:
        second = p.batch()
        assert second.round == first.round + 1
        assert [r["open"] for r in p.rounds()] == [False, True]
        old = first.items[2]
        assert p.item(old.id)[0].round == first.round and p.item(second.items[0].id)[0].round == second.round
        with pytest.raises(AlsegError):
            p.item(old.id, round=second.round)
        # the page asks before replacing a past round's mask too
        with pytest.raises(NeedsConfirm):
            p.submit(old.id, png(_edited(truth[old.id])))
    corrected = _edited(truth[old.id], slice(10, 20))
    Image.fromarray(corrected.astype(np.uint8) * 255).save(second.folder / "masks" / f"{old.id}_mask.png")
    result = ingest(path)
    assert result["replaced"] == [old.id] and result["rounds"] == {old.id: first.round}
    assert result["round"] == second.round and len(result["queued"]) == 4  # the open batch's progress
    with Project(path, command="test") as p:
        assert np.array_equal(p.stored_mask(old.id), corrected)
        assert [h["source"] for h in p.history(old.id)] == ["page", "files"]
        run = ActiveRun(p.store, p.config)
        assert np.array_equal(run.training_masks([old.id])[0], mask_to_size(corrected, p.size))
        # a closed round's image goes back one version, never back to the queue
        assert p.undo(old.id)["outcome"] == "restored"
        assert np.array_equal(p.stored_mask(old.id), truth[old.id])
        with pytest.raises(AlsegError, match="nothing earlier to restore"):
            p.undo(old.id)
    # ingest by round: the names are matched against that round's batch only
    other = first.items[3]
    folder = path / "fixes"
    folder.mkdir()
    Image.fromarray(corrected.astype(np.uint8) * 255).save(folder / f"{second.items[0].id}.png")
    Image.fromarray(_edited(truth[other.id]).astype(np.uint8) * 255).save(folder / f"{other.id}.png")
    by_round = ingest(path, folder, round=first.round)
    assert by_round["replaced"] == [other.id]
    assert [b["problem"] for b in by_round["invalid"]] == ["names no image of the batch (see manifest.csv)"]
    # the finished round's row carries the active seconds sent with its masks
    row = next(r for r in status(path)["rounds"] if r["round"] == first.round)
    assert row["expert_active_seconds"] == pytest.approx(sum(4.0 + k for k in range(BATCH)))
    assert row["expert_seconds"] == pytest.approx(10.0 * BATCH)


# ------------------------------------------------------------------ several annotators
def test_a_second_annotator_is_kept_beside_and_agreement_is_their_dice(project):
    path, truth = project
    with Project(path, command="test") as p:
        items = [it for it in p.batch().items if (it.width, it.height) == (64, 64)][:2]
        a, b = items
        p.submit(a.id, png(truth[a.id]), annotator="alice")
        bobs = _edited(truth[a.id], slice(20, 30))
        second = p.submit(a.id, png(bobs), annotator="bob")  # no question asked
        assert second["outcome"] == "second" and second["version"] == 2
        assert np.array_equal(p.stored_mask(a.id), truth[a.id])  # the owner's mask trains
        assert [(h["annotator"], h["role"], h["current"]) for h in p.history(a.id)] == [
            ("alice", "owner", True), ("bob", "second", True)]
        # bob's reading at the working size is compared at the owner's size (nearest)
        small = _nearest(_edited(truth[b.id], slice(30, 40)), 32, 32)
        p.submit(b.id, png(truth[b.id]), annotator="alice")
        p.submit(b.id, png(small), annotator="carol")
        expected = {a.id: _dice(truth[a.id], bobs), b.id: _dice(truth[b.id], _nearest(small, 64, 64))}
        assert 0 < expected[a.id] < 1 and 0 < expected[b.id] < 1
        got = p.status()["agreement"]
        assert {r["id"]: r["dice"] for r in got["images"]} == pytest.approx(expected)
        assert got["mean_dice"] == pytest.approx(np.mean(list(expected.values()))) and got["count"] == 2
        assert {r["id"]: r["second_annotator"] for r in got["images"]} == {a.id: "bob", b.id: "carol"}
        # bob replacing his own reading is asked; the owner correcting hers changes the agreement
        with pytest.raises(NeedsConfirm, match="by bob"):
            p.submit(a.id, png(truth[a.id]), annotator="bob")
        p.submit(a.id, png(bobs), annotator="alice", replace=True)
        assert p.status()["agreement"]["images"][[r["id"] for r in got["images"]].index(a.id)]["dice"] == 1.0
        # a second reading undone is withdrawn; the owner's mask stays
        assert p.undo(a.id, annotator="bob")["outcome"] == "withdrawn"
        assert np.array_equal(p.stored_mask(a.id), bobs)
        assert [r["id"] for r in p.status()["agreement"]["images"]] == [b.id]


# ------------------------------------------------------------------ effort
def test_effort_is_computed_per_event_and_per_round_and_written_as_csv(project, tmp_path):
    path, truth = project
    with Project(path, command="test") as p:
        batch = p.batch()
        it0, it1, empty = batch.items[0], batch.items[1], batch.items[-1]
        p.record_time(it0.id, 3.0, "view", active_seconds=1.0)
        p.submit(it0.id, png(truth[it0.id]), seconds=12.0, effort={"active_seconds": 8.5, "strokes": 3, "clicks": 7})
        fixed = _edited(truth[it0.id])
        p.submit(it0.id, png(fixed), seconds=5.0, effort={"strokes": 1}, replace=True)
        p.submit(it1.id, png(predicted(batch, it1)), seconds=2.0, effort={"clicks": 1})
        p.submit(empty.id, png(truth[empty.id]))  # its prediction is empty: every foreground pixel is a change
        for bad in ({"strokes": -1}, {"strokes": 1.5}, {"active_seconds": float("nan")}, {"keys": 3}):
            with pytest.raises(AlsegError, match="effort"):
                p.submit(batch.items[2].id, png(truth[batch.items[2].id]), effort=bad)
        rows = effort_rows(p.store)
        assert len(rows) == len(p.store.annotations()) == 5  # the refused submits left nothing
        assert [(r["action"], r["version"]) for r in rows] == [("view", None), ("stored", 1), ("replaced", 2),
                                                               ("stored", 1), ("stored", 1)]
        by_id = {}
        for r in rows:
            by_id.setdefault(r["id"], []).append(r)
        view, first, second = by_id[it0.id]
        assert (view["action"], view["version"], view["active_seconds"], view["seconds"]) == ("view", None, 1.0, 3.0)
        assert (first["strokes"], first["clicks"], first["active_seconds"], first["changed_previous"]) == (3, 7, 8.5, None)
        assert first["changed_prediction"] == _changed(truth[it0.id], predicted(batch, it0))
        assert second["changed_previous"] == _changed(fixed, truth[it0.id])
        assert second["changed_prediction"] == _changed(fixed, predicted(batch, it0))
        assert by_id[it1.id][0]["accepted"] is True
        assert by_id[empty.id][0]["changed_prediction"] == int(truth[empty.id].sum())
        reasons = p.store.selection_reasons(batch.round)
        assert all(r["reason"] == reasons[r["id"]] and r["round"] == batch.round for r in rows)

        summary = p.store.effort_by_round()
        finals = [_changed(fixed, predicted(batch, it0)), 0, int(truth[empty.id].sum())]
        totals = p.status()["effort"]["totals"]
        assert (totals["images"], totals["versions"], totals["seconds"], totals["active_seconds"]) == (3, 4, 22.0, 9.5)
        assert (totals["strokes"], totals["clicks"], totals["accepted_as_is"]) == (4, 8, 1)
        assert totals["pixels_changed_from_prediction"] == sum(finals)
        assert totals["median_pixels_changed_from_prediction"] == float(np.median(finals))
        assert sum(r["images"] for r in summary) == 3 and {r["round"] for r in summary} == {batch.round}
        assert p.status()["effort"]["rounds"] == summary
    out = tmp_path / "effort.csv"
    assert export_effort(path, out) == {"path": str(out), "rows": 5}
    with out.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == EVENT_COLUMNS and len(table) == 5
    assert [r["action"] for r in table] == [r["action"] for r in rows]
    assert table[1]["strokes"] == "3" and table[0]["version"] == "" and table[3]["accepted"] in ("0", "1")


# ------------------------------------------------------------------ schema 3
def _downgrade_to_schema_3(db) -> None:
    """What alseg wrote before schema 4: no blobs, no owner, annotations without the effort columns."""
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE mask_blobs")
        conn.execute("CREATE TABLE a3 AS SELECT id, round, action, sha256, previous_sha256, source, seconds, at "
                     "FROM annotations")
        conn.execute("DROP TABLE annotations")
        conn.execute("ALTER TABLE a3 RENAME TO annotations")
        conn.execute("ALTER TABLE masks DROP COLUMN annotator")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")


def test_a_schema_3_store_reads_as_it_was_and_is_migrated_when_written(project):
    path, truth = project
    with Project(path, command="test") as p:
        items = p.batch().items
        a, b = items[0], items[1]
        p.submit(a.id, png(_edited(truth[a.id])))
        p.submit(a.id, png(truth[a.id]), replace=True)  # the first version will be lost: schema 3 kept none
        p.submit(b.id, png(truth[b.id]))
    _downgrade_to_schema_3(path / "run.db")
    with RunStore.open_readonly(path) as store:
        assert store._get("schema_version") == 3
        assert [(h["version"], h["annotator"], h["role"], h["current"]) for h in store.history(a.id)] == [
            (1, "local", "owner", False), (2, "local", "owner", True)]
        assert store.agreement()["count"] == 0 and len(store.effort_events()) == 3
    got = status(path)  # read-only, on schema 3
    assert got["effort"]["totals"]["versions"] == 3 and got["agreement"]["images"] == []
    with RunStore.open_readonly(path) as store:
        assert store._get("schema_version") == 3  # reading never migrates
    with Project(path, command="test") as p:
        assert p.store._get("schema_version") == 4
        cols = {r[1] for r in p.store.conn.execute("PRAGMA table_info(annotations)")}
        assert {"annotator", "active_seconds", "strokes", "clicks", "changed_previous", "changed_prediction",
                "accepted", "role"} <= cols
        assert p.store.conn.execute("SELECT COUNT(*) FROM mask_blobs").fetchone()[0] == 2  # the current masks
        assert np.array_equal(p.stored_mask(a.id, version=2), truth[a.id])
        assert p.stored_mask(a.id, version=1) is None
        with pytest.raises(AlsegError, match="before alseg kept every version"):
            p.undo(a.id)
        # a mask stored before owners belongs to "local"; its next version can be undone back to it
        p.submit(b.id, png(_edited(truth[b.id])), replace=True)
        assert p.history(b.id)[-1]["changed_previous"] == _changed(_edited(truth[b.id]), truth[b.id])
        assert p.undo(b.id)["outcome"] == "restored"
        assert np.array_equal(p.stored_mask(b.id), truth[b.id])
