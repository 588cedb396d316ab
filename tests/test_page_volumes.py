"""The review page for volumes: the slice scroller over a volume's slices (the batch's marked), its
neighbours shown for context through ``/api/image`` with the mask in progress kept, and a submit
that stores the mask of that one slice; ``/api/volume/{id}`` and what it refuses. A project of
photos (no volumes) shows the page as before, without a scroller.

The volume project is three LGG patients as NIfTI volumes (conftest's ``lgg_nifti``, 64 px, 20
slices each): two with masks (the lab's), the third the pool, from which a tiny model (width 4)
chose a batch of 4 slices. Built once per session and copied for each test that writes.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotate_fixtures import ThreadServer, artifacts_dir, copy_project, png
from alseg.annotate.server import create_app
from alseg.project import Project
from test_browser import WAIT, Page, driver, template  # noqa: F401 (fixtures)
from volume_fixtures import PATIENTS

VOLUME_BATCH = 4
POOL = PATIENTS[2]  # the patient without masks: the batch's slices are his
SLICES = 20


@pytest.fixture(scope="session")
def volume_template(lgg_nifti, tmp_path_factory) -> Path:
    """A project over NIfTI volumes with an open batch of slices of one volume; never written by tests."""
    from alseg.project import init_project, query

    root = tmp_path_factory.mktemp("volume-project")
    data = root / "volumes"
    data.mkdir()
    for patient in PATIENTS:
        shutil.copy(lgg_nifti["flat"] / f"{patient}.nii.gz", data)
        if patient != POOL:
            shutil.copy(lgg_nifti["flat"] / f"{patient}_mask.nii.gz", data)
    overrides = {"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 1, "min_epoch_steps": 20},
                 "active": {"round_epochs": 1, "mc_passes": 2}}
    init_project(root / "project", data, preset="demo", overrides=overrides, pretrain=False)
    query(root / "project", n=VOLUME_BATCH)
    return root / "project"


@pytest.fixture
def volume_project(volume_template, tmp_path):
    """A copy of the volume project, opened as the server opens it."""
    p = Project(copy_project(volume_template, tmp_path / "project"), command="serve")
    yield p
    p.close()


def _dataset(p: Project):
    from alseg.data.sources import open_dataset

    info = p.store.data_info()
    return open_dataset(info["path"], info["format"])


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _shown_pixels(sample) -> np.ndarray:
    """The slice as the page shows it: RGB for three channels (the LGG volumes have three)."""
    from alseg.data.samples import sample_image

    pixels = sample_image(sample)
    return pixels if pixels.shape[2] == 3 else pixels[:, :, 0]


# ------------------------------------------------------------------ the API
def test_volume_api_lists_the_slices_in_order_and_serves_neighbours(volume_project):
    from fastapi.testclient import TestClient

    p = volume_project
    batch = p.batch()
    dataset = _dataset(p)
    samples = {s.id: s for s in dataset.samples}
    order = [s.id for s in dataset.samples if s.group == POOL]
    assert len(order) == SLICES and {it.id for it in batch.items} <= set(order)
    with TestClient(create_app(p)) as c:
        items = c.get("/api/batch").json()["items"]
        assert all(it["urls"]["volume"] for it in items)
        for it in items:
            vol = c.get(it["urls"]["volume"]).json()
            assert vol["group"] == POOL and vol["id"] == it["id"] and vol["round"] == batch.round
            assert [s["id"] for s in vol["slices"]] == order  # in slice order
            assert [s["index"] for s in vol["slices"]] == list(range(SLICES))
            assert vol["slices"][vol["current"]]["id"] == it["id"]
            assert {s["id"] for s in vol["slices"] if s["in_batch"]} == {x.id for x in batch.items}
            assert not any(s["labelled"] for s in vol["slices"])  # the pool: nothing labelled yet
            assert set(vol["slices"][0]) == {"id", "index", "in_batch", "labelled", "url"}
        # a slice of a patient the lab labelled: a volume too, every slice labelled, none in the batch
        other = next(s.id for s in dataset.samples if s.group == PATIENTS[0] and s.slice == 7)
        vol = c.get(f"/api/volume/{other}").json()
        assert vol["group"] == PATIENTS[0] and vol["slices"][vol["current"]]["index"] == 7
        assert all(s["labelled"] and not s["in_batch"] for s in vol["slices"])

        # a neighbour no round chose: its pixels, decoded from the dataset as export would show them
        vol = c.get(items[0]["urls"]["volume"]).json()
        neighbour = next(s for s in vol["slices"] if not s["in_batch"])
        assert neighbour["url"] == "/api/image/" + neighbour["id"].replace("/", "%2F")
        res = c.get(neighbour["url"])
        assert res.status_code == 200 and res.headers["content-type"] == "image/png"
        assert np.array_equal(_decode(res.content), _shown_pixels(samples[neighbour["id"]]))
        # a batch slice's url is its batch file, the very bytes the batch holds
        in_batch = next(s for s in vol["slices"] if s["in_batch"])
        item = batch.item(in_batch["id"])
        assert c.get(in_batch["url"]).content == (batch.folder / item.image).read_bytes()
        # a round names a batch: the neighbour is not in it
        assert c.get(neighbour["url"] + f"?round={batch.round}").status_code == 404
        assert c.get(neighbour["url"] + "?max_side=7").status_code == 422  # not an offered preview size

        # refusals: unknown ids, paths, another dataset's names; nothing outside the project is served
        volume_file = str(Path(p.store.data_info()["path"]) / f"{POOL}.nii.gz")
        for bad in ("nope", f"{POOL}/z999", f"{POOL}", "../../run.db", "%2e%2e%2f%2e%2e%2frun.db",
                    volume_file.lstrip("/"), "TCGA_OTHER/z000"):
            for kind in ("volume", "image"):
                res = c.get(f"/api/{kind}/{bad}")
                assert res.status_code == 404 and "error" in res.json(), (kind, bad, res.status_code)
        assert c.get(f"/api/volume/{volume_file}").status_code == 404

    # display-sized previews of a neighbour, when the server offers a size below the slice's
    with TestClient(create_app(p, preview_sides=(32,))) as c:
        res = c.get(neighbour["url"] + "?max_side=32")
        assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(res.content)).size == (32, 32)

    # with annotators every request needs a token: the new routes too
    from alseg.annotate.auth import Annotators

    annotators = Annotators()
    token = annotators.add("dana")
    with TestClient(create_app(p, annotators=annotators)) as c:
        for path in (items[0]["urls"]["volume"], neighbour["url"]):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200, path


def test_a_submit_stores_that_slice_s_mask_only(volume_project):
    from fastapi.testclient import TestClient

    p = volume_project
    batch = p.batch()
    item = batch.items[0]
    before = set(p.store.mask_ids())
    mask = np.zeros((item.height, item.width), bool)
    mask[20:30, 10:40] = True
    with TestClient(create_app(p)) as c:
        res = c.put(f"/api/mask/{item.id.replace('/', '%2F')}?round={batch.round}&seconds=3", content=png(mask))
        assert res.status_code == 200, res.text
        assert set(p.store.mask_ids()) - before == {item.id}
        assert np.array_equal(p.stored_mask(item.id), mask)
        vol = c.get(f"/api/volume/{item.id}").json()
        assert [s["id"] for s in vol["slices"] if s["labelled"]] == [item.id]
        # a slice the expert only looked at cannot be given a mask: it is in no batch
        neighbour = next(s["id"] for s in vol["slices"] if not s["in_batch"])
        res = c.put(f"/api/mask/{neighbour}", content=png(mask))
        assert res.status_code == 404 and p.stored_mask(neighbour) is None
    assert set(p.store.mask_ids()) - before == {item.id}


def test_photos_have_no_volume(template, tmp_path):
    from fastapi.testclient import TestClient

    p = Project(copy_project(template[0], tmp_path / "project"), command="serve")
    try:
        with TestClient(create_app(p)) as c:
            items = c.get("/api/batch").json()["items"]
            assert items and all(it["urls"]["volume"] is None for it in items)
            vol = c.get(f"/api/volume/{items[0]['id']}").json()
            assert vol["group"] is None and vol["slices"] == [] and vol["current"] is None
            # a pool image of a project without volumes is still served by no route
            pool = sorted(p.store.sample_ids(state="pool"))[0]
            assert c.get(f"/api/image/{pool}").status_code == 404
            assert c.get(f"/api/volume/{pool}").status_code == 404
    finally:
        p.close()


# ------------------------------------------------------------------ the page
@contextlib.contextmanager
def _served(driver, project: Project, tmp_path):
    with ThreadServer(create_app(project)) as server:
        pg = Page(driver, project, server.url, artifacts_dir(tmp_path))
        driver.get(server.url + "/")
        first = next(it for it in pg.batch.items if it.id not in project.labelled(pg.batch.round))
        pg.wait_loaded(first.id)
        yield pg
        logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                and "Failed to load resource" not in e.get("message", "")]
        assert not logs, f"errors in the page: {logs}"
        driver.execute_script("window.onbeforeunload = null;")
        driver.get("about:blank")


def _mask_sum(pg: Page) -> int:
    return pg.d.execute_script("return state.mask ? state.mask.reduce((a, b) => a + b, 0) : -1;")


def _image_pixels(pg: Page) -> np.ndarray:
    """What #image shows, read back through a canvas at its natural size (RGB)."""
    w, h, data = pg.d.execute_script("""
        const img = document.getElementById('image'), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        return [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];""")
    return np.asarray(data, np.uint8).reshape(h, w, 4)[:, :, :3]


def _drag_on_stage(pg: Page, item, points):
    """Drag through ``points`` (image pixels) over the stage, whatever covers it."""
    from selenium.webdriver.common.action_chains import ActionChains

    stage = pg.el("stage")
    w, h = pg.d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", stage)
    offsets = [(round((x + 0.5) * w / item.width - w / 2), round((y + 0.5) * h / item.height - h / 2)) for x, y in points]
    chain = ActionChains(pg.d, duration=20).move_to_element_with_offset(stage, *offsets[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(offsets, offsets[1:]):
        chain.move_by_offset(x1 - x0, y1 - y0)
    chain.release().perform()


def _shown(pg: Page) -> str | None:
    return pg.el("image").get_attribute("data-shown-id")


def _ticks(pg: Page) -> list[dict]:
    return pg.d.execute_script("""return Array.from(document.querySelectorAll('#slice-strip .tick')).map(t =>
        ({id: t.dataset.id, batch: t.classList.contains('batch'), current: t.classList.contains('current'),
          shown: t.classList.contains('shown')}));""")


def test_the_scroller_shows_neighbours_keeps_the_mask_and_submits_the_slice(driver, volume_project, tmp_path):
    p = volume_project
    dataset = _dataset(p)
    samples = {s.id: s for s in dataset.samples}
    order = [s.id for s in dataset.samples if s.group == POOL]
    with _served(driver, p, tmp_path) as pg:
        item = pg.item(pg.loaded())
        pg.wait(lambda: pg.el("volume-bar").get_attribute("data-volume-of") == item.id, "the slice scroller")
        assert pg.el("volume-bar").is_displayed() and POOL in pg.text("volume-name")
        ticks = _ticks(pg)
        assert [t["id"] for t in ticks] == order  # every slice, in slice order
        assert {t["id"] for t in ticks if t["batch"]} == {it.id for it in pg.batch.items}
        assert [t["id"] for t in ticks if t["current"]] == [item.id] == [t["id"] for t in ticks if t["shown"]]
        k = order.index(item.id)
        assert int(pg.el("slice-range").get_attribute("value")) == k
        assert np.array_equal(_image_pixels(pg), _shown_pixels(samples[item.id]))

        # a stroke in progress on the slice
        assert _mask_sum(pg) == 0  # the tiny model earned no head start: an empty mask
        pg.drag(item, [(10, 20), (40, 20)])
        pg.wait(lambda: not pg.el("undo").get_property("disabled"), "the stroke is undoable")
        drawn = _mask_sum(pg)
        assert drawn > 0

        # a neighbour, by key: its pixels replace the slice's, the mask is hidden and kept
        from selenium.webdriver.common.keys import Keys

        d = 1 if k + 1 < len(order) else -1
        pg.key(Keys.PAGE_DOWN if d == 1 else Keys.PAGE_UP)
        neighbour = order[k + d]
        pg.wait(lambda: _shown(pg) == neighbour, f"the neighbour {neighbour} shown")
        assert pg.el("image").get_attribute("src").endswith("/api/image/" + neighbour.replace("/", "%2F"))
        assert np.array_equal(_image_pixels(pg), _shown_pixels(samples[neighbour]))
        assert not np.array_equal(_shown_pixels(samples[neighbour]), _shown_pixels(samples[item.id]))
        assert "context" in pg.el("stage").get_attribute("class")
        assert pg.d.execute_script("return getComputedStyle(document.getElementById('mask')).visibility") == "hidden"
        assert pg.el("context-note").is_displayed() and "context" in pg.text("context-note")
        assert [t["id"] for t in _ticks(pg) if t["shown"]] == [neighbour]
        pg.shot("volume-neighbour")
        assert pg.el("submit").get_property("disabled") and pg.el("undo").get_property("disabled")
        # window/level applies to the neighbour as to the slice: the one filter on #image
        pg.d.execute_script("setWindow(40, 200);")
        assert "filtered" in pg.el("image").get_attribute("class")
        assert "url" in pg.d.execute_script("return getComputedStyle(document.getElementById('image')).filter")
        # nothing can be drawn on a neighbour, and the mask in progress is untouched
        _drag_on_stage(pg, item, [(10, 40), (40, 40)])
        assert _mask_sum(pg) == drawn and pg.loaded() == item.id
        zoom = pg.d.execute_script("return state.zoom;")

        # Alt+wheel goes on through the slices (one per notch), from the neighbour shown
        further = order[k + 2 * d] if 0 <= k + 2 * d < len(order) else None
        if further is not None:
            pg.d.execute_script("""document.getElementById('viewport').dispatchEvent(new WheelEvent('wheel',
                {deltaY: arguments[0], altKey: true, bubbles: true, cancelable: true}));""", 100 * d)
            pg.wait(lambda: _shown(pg) == further, f"the slice {further} by Alt+wheel")
            assert pg.d.execute_script("return state.zoom;") == zoom  # Alt+wheel does not zoom

        # back to the slice: its pixels, the stroke as it was, still undoable; then submit it
        pg.key(Keys.HOME)
        pg.wait(lambda: _shown(pg) == item.id, "the slice itself again")
        assert np.array_equal(_image_pixels(pg), _shown_pixels(samples[item.id]))
        assert "context" not in (pg.el("stage").get_attribute("class") or "")
        assert _mask_sum(pg) == drawn and not pg.el("undo").get_property("disabled")
        pg.shot("volume-slice")
        assert not pg.el("context-note").is_displayed()
        before = set(p.store.mask_ids())
        pg.key(Keys.ENTER)
        stored = pg.stored(item.id)
        assert set(p.store.mask_ids()) - before == {item.id}  # that slice's mask, no other
        assert stored.sum() == drawn and stored[20, 15:35].all()

        # the page went on to the next slice to label; clicking a marked slice of the batch opens it
        pg.wait(lambda: pg.loaded() != item.id, "the next slice to label")
        target = next(it for it in pg.batch.items if it.id not in (item.id, pg.loaded()))
        pg.wait(lambda: pg.el("volume-bar").get_attribute("data-volume-of") == pg.loaded(), "the scroller again")
        labelled = pg.d.execute_script("""return Array.from(document.querySelectorAll('#slice-strip .tick.labelled'))
            .map(t => t.dataset.id);""")
        assert labelled == [item.id]
        pg.d.find_element("css selector", f"#slice-strip .tick[data-index='{order.index(target.id)}']").click()
        pg.wait_loaded(target.id)
        pg.wait(lambda: pg.el("volume-bar").get_attribute("data-volume-of") == target.id, "the target's scroller")
        assert [t["id"] for t in _ticks(pg) if t["current"]] == [target.id]
    assert set(p.store.mask_ids()) - before == {item.id}


def test_photos_show_no_scroller(driver, template, tmp_path):
    p = Project(copy_project(template[0], tmp_path / "project"), command="serve")
    try:
        with _served(driver, p, tmp_path) as pg:
            item = pg.item(pg.loaded())
            assert not pg.el("volume-bar").is_displayed() and _ticks(pg) == []
            assert _shown(pg) == item.id
            from selenium.webdriver.common.keys import Keys

            pg.key(Keys.PAGE_DOWN)
            pg.d.execute_script("""document.getElementById('viewport').dispatchEvent(new WheelEvent('wheel',
                {deltaY: 100, altKey: true, bubbles: true, cancelable: true}));""")
            assert _shown(pg) == item.id and pg.loaded() == item.id
            assert "context" not in (pg.el("stage").get_attribute("class") or "")
            assert not pg.el("context-note").is_displayed() and not pg.el("submit").get_property("disabled")
            used = pg.d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"
                                       ".filter(n => n.includes('/api/volume'));")
            assert used == []  # the page never asks for volumes of photos
    finally:
        p.close()
