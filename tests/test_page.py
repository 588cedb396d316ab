"""The review page as the expert's workplace, in real headless Chromium: confirmations, undo of a
submit, leaving with edits, zoom and pan, past rounds, tokens, thumbnails and the overlay on
demand, polygon and clear, window/level, a finished batch leading to the next one, a large image
shown from its preview until zoomed in, undo steps that keep only the box they changed, masks
inflated by the page itself (any deflate blocks, PNG filters, widths) and freed when left.

Shares the driver and the project template with ``test_browser.py``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from annotate_fixtures import BATCH, ThreadServer, artifacts_dir, copy_project
from alseg.annotate.server import create_app
from alseg.project import Project
from test_browser import WAIT, Page, _background_row, _empty_box, driver, template  # noqa: F401 (fixtures)


@contextlib.contextmanager
def _served(driver, template, tmp_path, query: str = "", prepare=None, **app_options):
    """A copy of the template project (changed by ``prepare(project_dir)``) served with ``app_options``;
    the page opened at ``/?query``."""
    project_dir = copy_project(template[0], tmp_path / "project")
    if prepare is not None:
        prepare(project_dir)
    p = Project(project_dir, command="serve")
    try:
        options = {key: (value(p) if callable(value) else value) for key, value in app_options.items()}
        with ThreadServer(create_app(p, **options)) as server:
            pg = Page(driver, p, server.url, artifacts_dir(tmp_path))
            driver.get(server.url + "/" + query)
            pg.wait_loaded(pg.batch.items[0].id)
            yield pg
            logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                    and "Failed to load resource" not in e.get("message", "")]
            assert not logs, f"errors in the page: {logs}"
            driver.execute_script("window.onbeforeunload = null;")
            _leave(driver)
    finally:
        if "turnover" in app_options:
            options["turnover"].close()
        p.close()


def _leave(driver):
    """Go to about:blank, answering a leave-page question if one comes."""
    from selenium.common.exceptions import UnexpectedAlertPresentException

    try:
        driver.get("about:blank")
    except UnexpectedAlertPresentException:
        driver.get("about:blank")


@pytest.fixture
def page(driver, template, tmp_path):
    with _served(driver, template, tmp_path) as pg:
        yield pg


def _alert(pg: Page, timeout: float = WAIT):
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(pg.d, timeout, poll_frequency=0.05).until(EC.alert_is_present())


def _stroke(pg: Page, item, length: int = 12) -> tuple[int, int]:
    """Paint a horizontal stroke where the prediction is background; returns its (row, start column)."""
    y, x = _background_row(pg.predicted(item), length)
    pg.drag(item, [(x, y), (x + length, y)])
    pg.wait(lambda: not pg.el("undo").get_property("disabled"), "the stroke is undoable")
    return y, x


def _screen_to_image(pg: Page, sx: float, sy: float) -> tuple[float, float]:
    return tuple(pg.d.execute_script("""
        const r = document.getElementById('mask').getBoundingClientRect(), c = document.getElementById('mask');
        return [(arguments[0] - r.left) * c.width / r.width, (arguments[1] - r.top) * c.height / r.height];""",
                                     sx, sy))


def _rect(pg: Page, id: str) -> dict:
    return pg.d.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                               "return {x: r.left, y: r.top, w: r.width, h: r.height};", id)


def _resources(pg: Page, part: str) -> list[str]:
    return pg.d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"
                               ".filter(n => n.includes(arguments[0]));", part)


# ------------------------------------------------------------------ replacing and undoing a submit
def test_a_replace_asks_first_and_undo_submit_restores(page):
    item = page.batch.items[0]
    pred = page.predicted(item)
    page.click("accept")
    page.progress(1)
    assert np.array_equal(page.stored(item.id), pred)
    page.select(0)  # back to the labelled image: its stored mask is shown
    assert "the stored mask" in page.text("item-info")
    y, x = _stroke(page, item)
    page.click("submit")
    alert = _alert(page)
    assert "replace" in alert.text.lower()
    alert.dismiss()  # no: nothing changes
    page.wait(lambda: "kept the stored mask" in page.text("message"), "the refusal to replace")
    assert np.array_equal(page.p.stored_mask(item.id), pred)
    page.click("submit")
    _alert(page).accept()  # yes: the edited mask replaces the stored one
    page.wait(lambda: "replaced" in page.text("message"), "the replacement")
    stored = page.p.stored_mask(item.id)
    assert stored[y, x:x + 13].all() and not pred[y, x:x + 13].any()
    # the one key on a labelled image asks as well
    page.wait_loaded(page.batch.items[1].id)  # the page moved on to the next image to label
    page.select(0)
    page.key("a")
    _alert(page).dismiss()
    page.wait(lambda: "kept the stored mask" in page.text("message"), "the refusal to replace by a key")
    assert np.array_equal(page.p.stored_mask(item.id), stored)
    # undo the last submit: the accepted prediction is current again, and shown
    page.click("undo-submit")
    page.wait(lambda: "previous version" in page.text("message"), "the undo of the submit")
    assert np.array_equal(page.p.stored_mask(item.id), pred)
    page.wait_loaded(item.id)
    drawn = page.d.execute_script("""
        const c = document.getElementById('mask');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;""")
    assert drawn == int(pred.sum())
    page.click("undo-submit")  # and once more: no mask at all, the image is queued again
    page.progress(0)
    assert page.p.stored_mask(item.id) is None


def _leaving_asks(pg: Page) -> bool:
    """Whether the page's beforeunload handler asks to stay (WebDriver itself answers real leave prompts)."""
    return pg.d.execute_script("const e = new Event('beforeunload', {cancelable: true});"
                               "window.dispatchEvent(e); return e.defaultPrevented;")


def test_leaving_with_unsubmitted_edits_asks(page):
    assert not _leaving_asks(page)
    first = page.batch.items[0]
    _stroke(page, first)
    assert _leaving_asks(page)
    page.select(1)  # the edit becomes a draft of an image not on screen; it still counts
    assert _leaving_asks(page)
    page.select(0)
    assert "unsubmitted edits" in page.text("item-info")
    page.click("submit")
    page.progress(1)
    page.wait_loaded(page.batch.items[1].id)
    assert not _leaving_asks(page)  # everything is stored


# ------------------------------------------------------------------ zoom, pan, clear, polygon, display
def test_zoom_keeps_the_point_under_the_cursor_and_space_drag_pans(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.keys import Keys

    r = _rect(page, "mask")
    sx, sy = round(r["x"] + 0.3 * r["w"]), round(r["y"] + 0.4 * r["h"])
    before = _screen_to_image(page, sx, sy)
    zoom = page.text("zoom-value")
    ActionChains(page.d).scroll_from_origin(ScrollOrigin.from_viewport(sx, sy), 0, -300).perform()
    page.wait(lambda: page.text("zoom-value") != zoom, "the wheel zooms")
    assert _rect(page, "mask")["w"] > r["w"] * 1.2
    after = _screen_to_image(page, sx, sy)
    assert abs(after[0] - before[0]) < 0.5 and abs(after[1] - before[1]) < 0.5, (before, after)
    # space + drag moves the image by the drag
    r = _rect(page, "mask")
    vp = page.el("viewport")
    chain = ActionChains(page.d, duration=20).key_down(Keys.SPACE).move_to_element(vp).click_and_hold()
    chain.move_by_offset(40, 25).release().key_up(Keys.SPACE).perform()
    page.wait(lambda: abs(_rect(page, "mask")["x"] - r["x"] - 40) < 1.5, "the drag pans")
    assert abs(_rect(page, "mask")["y"] - r["y"] - 25) < 1.5
    assert page.el("undo").get_property("disabled")  # panning painted nothing
    page.key("0")
    page.wait(lambda: page.text("zoom-value") == zoom, "fit again")


def test_clear_and_polygon_are_undoable_and_stored(page):
    item = page.batch.items[0]
    pred = page.predicted(item)
    page.key("c")
    page.wait(lambda: "mask 0 px" in page.text("item-info"), "the mask cleared")
    page.key("z")
    page.wait(lambda: f"mask {int(pred.sum())} px" in page.text("item-info"), "the clear undone")
    y, x = _empty_box(pred, 12)
    page.key("l")
    page.wait(lambda: "active" in page.el("tool-polygon").get_attribute("class"), "polygon tool")
    for point in [(x, y), (x + 12, y), (x + 12, y + 12), (x, y + 12)]:
        page.drag(item, [point])  # a click each
    page.drag(item, [(x, y)])  # on the first point again: closed and filled
    page.wait(lambda: not page.el("undo").get_property("disabled"), "the polygon filled")
    page.click("submit")
    page.progress(1)
    stored = page.stored(item.id)
    assert stored[y + 1:y + 12, x + 1:x + 12].all()  # the inside of the square
    outside = np.ones_like(pred)
    outside[y - 1:y + 14, x - 1:x + 14] = False
    assert np.array_equal(stored[outside], pred[outside])  # nothing else changed


def test_window_and_channel_change_only_the_display(page):
    def shown() -> np.ndarray:
        import io

        from PIL import Image

        png = page.el("image").screenshot_as_png
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)

    page.d.execute_script("document.getElementById('mask').style.visibility = 'hidden';")  # the image alone
    plain = shown()
    page.d.execute_script("""
        const lo = document.getElementById('win-lo'), ch = document.getElementById('channel');
        lo.value = '100'; lo.dispatchEvent(new Event('input'));
        ch.value = '0'; ch.dispatchEvent(new Event('change'));""")
    page.wait(lambda: page.text("window-value") == "100–255", "the window set")
    windowed = shown()
    expect = np.clip((plain[:, :, 0] - 100) * 255 / 155, 0, 255)
    assert np.abs(windowed[:, :, 0] - expect).mean() < 6  # grey from the first channel, windowed
    assert np.abs(windowed[:, :, 0] - windowed[:, :, 2]).max() < 3
    page.click("win-reset")
    page.wait(lambda: "filtered" not in page.el("image").get_attribute("class"), "the display reset")
    assert np.abs(shown() - plain).mean() < 1
    assert page.p.stored_mask(page.batch.items[0].id) is None  # display only


# ------------------------------------------------------------------ large images: what is fetched
def test_list_shows_thumbnails_and_the_overlay_is_fetched_only_when_shown(page):
    sources = [img.get_attribute("src") for img in page.d.find_elements("css selector", "#items img")]
    assert len(sources) == BATCH and all("/api/thumb/" in s for s in sources)
    assert not _resources(page, "/api/image/" + page.batch.items[1].id)  # only the open image, full size
    assert not _resources(page, "/api/uncertainty/")
    assert not page.el("uncertainty-scale").is_displayed()
    page.key("u")
    page.wait(lambda: page.el("uncertainty").is_displayed(), "the overlay shown")
    page.wait(lambda: _resources(page, "/api/uncertainty/" + page.batch.items[0].id), "the overlay fetched")
    assert page.el("uncertainty-scale").is_displayed()
    scale = page.batch.items[0].uncertainty_scale
    assert page.text("scale-hi") == f"{scale:.3g}" or float(page.text("scale-hi")) == pytest.approx(scale, rel=1e-2)
    page.key("u")
    page.select(1)  # hidden again: the next image's overlay is not fetched
    assert not _resources(page, "/api/uncertainty/" + page.batch.items[1].id)


def test_long_ids_are_shown_whole(page):
    names = page.d.find_elements("css selector", "#items .name")
    for el, it in zip(names, page.batch.items):
        assert el.text.replace("\n", "") == it.id
        assert page.d.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth + 1;", el)
    assert page.text("item-info").startswith(page.batch.items[0].id)


# ------------------------------------------------------------------ tokens
def test_a_token_is_required_and_names_the_annotator(driver, template, tmp_path):
    from alseg.annotate.auth import Annotators

    annotators = Annotators()
    token = annotators.add("alice")
    with _served(driver, template, tmp_path, f"?token={token}", annotators=annotators) as pg:
        for path in ("/api/batch", "/", f"/api/image/{pg.batch.items[0].id}"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(pg.url + path, timeout=10)
            assert err.value.code == 401, path
        request = urllib.request.Request(pg.url + "/api/batch", headers={"Authorization": f"Bearer {token}"})
        assert json.load(urllib.request.urlopen(request, timeout=10))["annotator"] == "alice"
        assert "token" not in pg.d.current_url  # taken out of the address bar
        assert pg.text("annotator") == "signed in as alice"
        item = pg.batch.items[0]
        pg.click("accept")
        pg.progress(1)
        history = pg.p.history(item.id)
        assert [h["annotator"] for h in history if h["current"]] == ["alice"]
        pg.d.refresh()  # the token lives on in the tab, without the address
        pg.wait(lambda: pg.text("annotator") == "signed in as alice", "the page after a reload")


# ------------------------------------------------------------------ the next batch, and a past round
def test_a_completed_batch_leads_to_the_next_and_past_rounds_stay_correctable(driver, template, tmp_path):
    from alseg.annotate.turnover import Turnover

    with _served(driver, template, tmp_path, turnover=lambda p: Turnover(p.dir.root, p._fd, log=lambda t: None)) as pg:
        items = pg.batch.items
        for it in items[1:]:  # the rest of the batch, as if labelled earlier
            mask = pg.predicted(it)
            if not mask.any():
                mask = np.zeros_like(mask)
                mask[5:15, 5:20] = True
            pg.p.submit(it.id, _png(mask), seconds=1.0)
        assert not pg.el("next-panel").is_displayed()
        pg.click("accept")  # the last image: the batch is complete
        pg.progress(BATCH)
        pg.wait(lambda: pg.el("next-batch").is_displayed() and pg.el("next-batch").is_enabled(), "Next batch")
        pg.click("next-batch")
        pg.wait(lambda: "next round" in pg.text("job") or "round 2" in pg.text("round"), "the job shown", 30)
        pg.wait(lambda: pg.text("round").startswith("round 2"), "the next batch loaded", 300)
        assert pg.text("progress") == f"0 of {len(pg.p.batch().items)} labelled"
        # round 1 from the rounds list: its image is corrected, after a confirmation
        from selenium.webdriver.support.ui import Select

        Select(pg.el("round-select")).select_by_value("1")
        pg.wait(lambda: pg.text("round").startswith("round 1"), "round 1 reopened")
        pg.batch = pg.p.batch(1)
        first = pg.batch.items[0]
        pg.wait_loaded(first.id)
        assert pg.text("progress") == f"{BATCH} of {BATCH} labelled"
        y, x = _stroke(pg, first)
        pg.click("submit")
        _alert(pg).accept()
        pg.wait(lambda: "replaced" in pg.text("message"), "the correction stored")
        assert pg.p.stored_mask(first.id)[y, x:x + 13].all()
        assert [h["round"] for h in pg.p.history(first.id) if h["current"]] == [1]


def _png(mask: np.ndarray) -> bytes:
    from annotate_fixtures import png

    return png(mask)


# ------------------------------------------------------------------ a large image: preview, full size, undo boxes
LARGE = (2400, 1600)  # width, height of the first image in the large-image test; its previews: 1024 px


def _large_first_image(project_dir: Path) -> None:
    """The open batch's first image becomes a 2400x1600 JPEG with a predicted lesion at (1500, 1000),
    r 300 (the store's record of the batch and its manifest say so); no uncertainty overlay."""
    from PIL import Image

    from annotate_fixtures import png

    w, h = LARGE
    with Project(project_dir, command="test") as p:
        batch = p.batch()
        it = batch.items[0]
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 150 + yy // 150) % 2) * 100 + 80], axis=2)
        (batch.folder / it.image).unlink()
        image = f"images/{Path(it.image).stem}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(batch.folder / image, quality=90)
        (batch.folder / it.predicted).write_bytes(png((xx - 1500) ** 2 + (yy - 1000) ** 2 < 300 ** 2))
        change = {"image": image, "width": w, "height": h, "uncertainty": None}
        recorded = p.store.batch_record(batch.round)
        for row in recorded:
            if row["id"] == it.id:
                row.update(change)
        p.store.record_batch(batch.round, recorded)
        manifest = batch.folder / "manifest.csv"
        with manifest.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames, list(reader)
        for row in rows:
            if row["id"] == it.id:
                row.update({k: "" if v is None else str(v) for k, v in change.items()})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        manifest.write_text(out.getvalue(), encoding="utf-8")


def _shown(pg: Page) -> dict:
    """What #image holds (loaded or not) and the stage's width on screen (CSS px = device px here)."""
    return pg.d.execute_script("""
        const i = document.getElementById('image'), r = document.getElementById('stage').getBoundingClientRect();
        return {complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, src: i.getAttribute('src'),
                stage: r.width, dpr: window.devicePixelRatio};""")


def _drag_on_stage(pg: Page, item, points) -> None:
    """Drag through ``points`` (image px) whatever the zoom (Page.drag needs several screen px per image px)."""
    from selenium.webdriver.common.action_chains import ActionChains

    stage = pg.el("stage")
    w, h = pg.d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", stage)
    offsets = [(round((x + 0.5) * w / item.width - w / 2), round((y + 0.5) * h / item.height - h / 2))
               for x, y in points]
    chain = ActionChains(pg.d, duration=20)
    chain.move_to_element_with_offset(stage, *offsets[0]).click_and_hold()
    last = offsets[0]
    for off in offsets[1:]:
        chain.move_by_offset(off[0] - last[0], off[1] - last[1])
        last = off
    chain.release().perform()


def test_a_large_image_shows_its_preview_until_zoomed_in_and_strokes_land_at_full_resolution(driver, template,
                                                                                            tmp_path):
    with _served(driver, template, tmp_path, prepare=_large_first_image, preview_sides=(1024,)) as pg:
        item = pg.batch.items[0]
        assert (item.width, item.height) == LARGE
        shown = _shown(pg)
        assert shown["dpr"] == 1 and shown["stage"] * shown["dpr"] <= 1024  # fitted: no more screen px than the preview's
        assert shown["complete"] and (shown["width"], shown["height"]) == (1024, 683)
        assert "max_side=1024" in shown["src"]
        full = lambda: [n for n in _resources(pg, f"/api/image/{item.id}") if "max_side" not in n]
        assert not full()  # the 2400x1600 image was never fetched
        # a stroke with a 9 px brush drawn on the preview, in the background left of the lesion
        pg.d.execute_script("const b = document.getElementById('brush-size'); b.value = '9';"
                            "b.dispatchEvent(new Event('input'));")
        _drag_on_stage(pg, item, [(300, 400), (600, 400), (900, 400)])
        pg.wait(lambda: not pg.el("undo").get_property("disabled"), "the stroke")
        # its undo step keeps the stroke's box of the mask, not the 3.8 MP mask
        steps = pg.d.execute_script("return state.undo.map(s => [s.x0, s.y0, s.x1, s.y1, s.data.length]);")
        assert len(steps) == 1
        x0, y0, x1, y1, size = steps[0]
        assert size == (x1 - x0) * (y1 - y0) < 0.01 * item.width * item.height
        assert x0 <= 300 - 3 and x1 >= 900 + 3 and y0 <= 400 - 3 and y1 >= 400 + 3
        # zoomed in past the preview's resolution: the full image replaces it; zoomed out, the preview again
        while _shown(pg)["stage"] <= 1024:
            pg.key("+")
        pg.wait(lambda: (lambda s: s["complete"] and s["width"] == 2400)(_shown(pg)), "the full image shown")
        assert "max_side" not in _shown(pg)["src"] and full()
        pg.key("0")
        pg.wait(lambda: (lambda s: s["complete"] and s["width"] == 1024)(_shown(pg)), "the preview shown again")
        assert "max_side=1024" in _shown(pg)["src"]
        pg.click("submit")
        stored = pg.stored(item.id)
    pred = pg.predicted(item)
    assert stored.shape == (LARGE[1], LARGE[0])
    changed = stored ^ pred
    ys, xs = np.nonzero(changed)
    # at the full image's pixels (the preview's would be 2.34x nearer the corner), give or take a screen pixel
    assert stored[398:403, 305:896].all()
    assert 393 <= ys.min() and ys.max() <= 407 and 292 <= xs.min() and xs.max() <= 908
    assert 0.8 * 9 * 600 < changed.sum() < 1.2 * 9 * 610
    assert not (pred & ~stored).any()  # the lesion untouched


def test_undo_steps_keep_only_their_box_and_restore_each_edit_exactly(page):
    item = page.batch.items[0]
    pred = page.predicted(item)
    assert pred.any()

    def mask() -> np.ndarray:
        flat = page.d.execute_script("return Array.from(state.mask);")
        return np.array(flat, bool).reshape(item.height, item.width)

    def steps() -> list:
        return page.d.execute_script("return state.undo.map(s => [s.x0, s.y0, s.x1, s.y1, s.data.length]);")

    def box(changed: np.ndarray) -> list[int]:
        ys, xs = np.nonzero(changed)
        return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]

    masks = [mask()]
    assert np.array_equal(masks[0], pred)
    ys, xs = np.nonzero(pred)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    assert pred[cy, cx]
    page.key("f")  # a fill inside the lesion erases it: its step is the lesion's box, exactly
    page.drag(item, [(cx, cy)])
    page.wait(lambda: len(steps()) == 1, "the fill")
    masks.append(mask())
    assert steps()[-1][:4] == box(masks[-2] ^ masks[-1]) and not masks[-1][cy, cx]
    page.key("b")
    _stroke(page, item)
    page.wait(lambda: len(steps()) == 2, "the stroke")
    masks.append(mask())
    x0, y0, x1, y1, _ = steps()[-1]
    bx0, by0, bx1, by1 = box(masks[-2] ^ masks[-1])  # a stroke's box: its dabs' squares, within a brush of it
    brush = int(page.el("brush-size").get_attribute("value"))
    assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1
    assert x0 >= bx0 - brush and y0 >= by0 - brush and x1 <= bx1 + brush and y1 <= by1 + brush
    page.key("c")  # clear: the box of what was set
    page.wait(lambda: len(steps()) == 3, "the clear")
    masks.append(mask())
    assert not masks[-1].any() and steps()[-1][:4] == box(masks[-2])
    page.key("l")  # a polygon
    y, x = 10, 10
    for point in [(x, y), (x + 12, y), (x + 12, y + 12), (x, y + 12), (x, y)]:
        page.drag(item, [point])
    page.wait(lambda: len(steps()) == 4, "the polygon")
    masks.append(mask())
    assert masks[-1][y + 1:y + 12, x + 1:x + 12].all()
    for x0, y0, x1, y1, size in steps():
        assert size == (x1 - x0) * (y1 - y0) < item.width * item.height
    for k in range(len(masks) - 1, 0, -1):  # each undo brings back the mask before its edit
        page.key("z")
        page.wait(lambda: np.array_equal(mask(), masks[k - 1]), f"undo to step {k - 1}")
    assert page.el("undo").get_property("disabled")
    for k in range(1, len(masks)):  # and each redo the one after
        page.key("y")
        page.wait(lambda: np.array_equal(mask(), masks[k]), f"redo to step {k}")
    page.click("submit")
    assert np.array_equal(page.stored(item.id), masks[-1])


# ------------------------------------------------------------------ masks inflated by the page itself
def _filtered_png(pixels: np.ndarray, filters: list[int], level: int, strategy: int, idat_parts: int = 2) -> bytes:
    """A PNG of ``pixels`` (h x w x channels, uint8) whose rows take PNG filter ``filters[y % len]``,
    its zlib stream made at ``level`` with ``strategy`` and split over ``idat_parts`` IDAT chunks."""
    import struct
    import zlib

    h, w, c = pixels.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw, prev = bytearray(), np.zeros(w * c, int)
    for y in range(h):
        row = pixels[y].reshape(-1).astype(int)
        a = np.concatenate([np.zeros(c, int), row[:-c]])  # the byte one pixel to the left
        up_left = np.concatenate([np.zeros(c, int), prev[:-c]])
        f = filters[y % len(filters)]
        if f == 4:
            p = a + prev - up_left
            pa, pb, pc = np.abs(p - a), np.abs(p - prev), np.abs(p - up_left)
            predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, prev, up_left))
        else:
            predictor = [np.zeros_like(row), a, prev, (a + prev) // 2][f]
        raw.append(f)
        raw += ((row - predictor) & 255).astype(np.uint8).tobytes()
        prev = row
    deflate = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    stream = deflate.compress(bytes(raw)) + deflate.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    cut = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + b"".join(chunk(b"IDAT", stream[cut[k]:cut[k + 1]]) for k in range(idat_parts)) + chunk(b"IEND", b""))


def _decode_in_page(pg: Page, data: bytes, w: int, h: int):
    """The page's own decoding of a PNG (``decodeMaskPng``): the mask as h x w bools, None when it
    declines the file, or the message of what it threw."""
    import base64

    got = pg.d.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (ch) => ch.charCodeAt(0));
        try {
          const mask = decodeMaskPng(bytes, arguments[1], arguments[2]);
          return mask === null ? null : {mask: mask.join("")};
        } catch (e) { return {error: e.message}; }""", base64.b64encode(data).decode(), w, h)
    if got is None or "error" in got:
        return got and got["error"]
    return np.frombuffer(got["mask"].encode(), np.uint8).reshape(h, w) == ord("1")


def test_masks_are_decoded_exactly_whatever_the_deflate_blocks_filters_and_width(page):
    import zlib

    rng = np.random.default_rng(7)
    cases = [  # (w, h, channels, level, strategy): widths not a multiple of 8, stored/fixed/dynamic blocks
        (13, 7, 1, 0, zlib.Z_DEFAULT_STRATEGY), (1, 1, 1, 9, zlib.Z_DEFAULT_STRATEGY), (61, 9, 4, 1, zlib.Z_FIXED),
        (37, 11, 2, 6, zlib.Z_HUFFMAN_ONLY), (29, 5, 3, 9, zlib.Z_RLE),
        # larger than the inflate's window and its 256 kB piece: matches reach across both
        (1021, 700, 1, 9, zlib.Z_DEFAULT_STRATEGY), (517, 300, 1, 0, zlib.Z_DEFAULT_STRATEGY),
    ]
    for w, h, c, level, strategy in cases:
        yy, xx = np.mgrid[0:h, 0:w]
        first = np.where((xx - w / 3) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2, 255, 0)
        near = rng.random((h, w)) < 0.02  # values either side of the 128 threshold
        first[near] = rng.integers(120, 136, int(near.sum()))
        pixels = np.concatenate([first[:, :, None], rng.integers(0, 256, (h, w, c - 1))], axis=2).astype(np.uint8)
        data = _filtered_png(pixels, [0, 1, 2, 3, 4, 4, 3, 1], level, strategy)
        got = _decode_in_page(page, data, w, h)
        assert isinstance(got, np.ndarray), (w, h, c, level, strategy, got)
        assert np.array_equal(got, pixels[:, :, 0] >= 128), (w, h, c, level, strategy)
        assert got[-1].any() or not (pixels[-1, :, 0] >= 128).any()  # the last row too
    data = _filtered_png(np.full((4, 10, 1), 255, np.uint8), [0], 6, zlib.Z_DEFAULT_STRATEGY, idat_parts=1)
    assert _decode_in_page(page, data, 11, 4) is None  # another size: left to the canvas
    stream_end = data.index(b"IEND") - 4
    cut = data[:stream_end - 10]  # the IDAT cut short: refused, not a partial mask
    assert isinstance(_decode_in_page(page, cut, 10, 4), str)
    assert np.array_equal(_decode_in_page(page, data, 10, 4), np.ones((4, 10), bool))


def test_a_mask_is_freed_when_left_unless_a_draft_or_a_submit_holds_it(page):
    item = page.batch.items[0]
    pred = page.predicted(item)
    size = item.width * item.height
    page.d.execute_script("window.first = state.mask;")
    y, x = _stroke(page, item)
    page.select(1)  # the edit is a draft now: its mask is kept whole
    assert page.d.execute_script("return window.first.length;") == size
    page.d.execute_script("window.second = state.mask;")
    page.select(0)
    assert "unsubmitted edits" in page.text("item-info")
    assert page.d.execute_script("return [window.first === state.mask, window.second.length];") == [True, 0]
    page.click("submit")  # encoded from the mask itself, which is freed only once the next image is chosen
    stored = page.stored(item.id)
    page.wait_loaded(page.batch.items[1].id)
    assert page.d.execute_script("return window.first.length;") == 0
    brush = int(page.el("brush-size").get_attribute("value"))
    outside = np.ones_like(pred)
    outside[y - brush:y + brush + 1, x - brush:x + 13 + brush] = False
    assert stored[y, x:x + 13].all() and (stored >= pred).all()  # the stroke added, nothing lost
    assert np.array_equal(stored[outside], pred[outside])
