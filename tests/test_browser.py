"""The review page in real headless Chromium (Selenium): paint, undo, accept, fill, refusals.

Needs Debian's ``chromium`` and ``chromedriver`` (``make setup`` on CI installs them); without
them these tests fail, saying so. Selenium Manager is never asked to download a driver.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from annotate_fixtures import BATCH, ThreadServer, artifacts_dir, build_project, copy_project, png, predicted
from alseg.annotate.server import create_app
from alseg.project import Project

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[1]
WAIT = 60  # a hang guard only: every wait below ends as soon as its condition holds


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    return build_project(tmp_path_factory)


@pytest.fixture(scope="module")
def driver():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        pytest.fail(f"the browser tests need Debian's chromium and chromedriver; missing: {', '.join(missing)} "
                    "(apt-get install chromium chromium-driver)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--disable-gpu", "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_window_size(1400, 900)
    yield drv
    drv.quit()


class Page:
    def __init__(self, driver, project: Project, url: str, shots: Path):
        self.d, self.p, self.url, self.shots = driver, project, url, shots
        self.batch = project.batch()

    def timer_seconds(self) -> int:
        """The page's timer of this image's active time (m:ss), in seconds."""
        minutes, _, seconds = self.text("timer").partition(":")
        return int(minutes) * 60 + int(seconds) if minutes.isdigit() and seconds.isdigit() else -1

    def watch_requests(self) -> None:
        """Start a fresh record of the page's requests (the browser's resource timing entries)."""
        self.d.execute_script("performance.setResourceTimingBufferSize(5000); performance.clearResourceTimings();")

    def sent(self, path: str) -> list[dict]:
        """The query parameters of each request since :meth:`watch_requests` whose path holds ``path``."""
        from urllib.parse import parse_qsl, urlsplit

        names = self.d.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
        return [{k: float(v) if k.endswith("seconds") else v for k, v in parse_qsl(urlsplit(n).query)}
                for n in names if path in urlsplit(n).path]

    def wait_timer(self, seconds: int) -> None:
        """Until the page itself has counted ``seconds`` on this image: its own clock, whatever the load."""
        self.wait(lambda: self.timer_seconds() >= seconds, f"the timer at {seconds} s")

    def wait(self, condition, what: str, timeout: float = WAIT):
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(lambda d: condition())
        except Exception:
            self.shot(f"timeout-{what}")
            raise AssertionError(f"timed out waiting for {what}; message: {self.text('message')!r}")

    def el(self, id: str):
        return self.d.find_element("id", id)

    def text(self, id: str) -> str:
        return self.el(id).text

    def loaded(self) -> str | None:
        return self.el("stage").get_attribute("data-loaded-id")

    def wait_loaded(self, id: str | None = None) -> str:
        self.wait(lambda: self.loaded() and (id is None or self.loaded() == id), f"image {id or ''} loaded")
        return self.loaded()

    def item(self, id: str):
        return next(it for it in self.batch.items if it.id == id)

    def select(self, k: int):
        self.d.find_elements("css selector", "#items li button")[k].click()
        return self.item(self.wait_loaded(self.batch.items[k].id))

    def key(self, *keys):
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).send_keys(*keys).perform()

    def key_combo(self, modifiers, key):
        from selenium.webdriver.common.action_chains import ActionChains

        chain = ActionChains(self.d)
        for m in modifiers:
            chain.key_down(m)
        chain.send_keys(key)
        for m in reversed(modifiers):
            chain.key_up(m)
        chain.perform()

    def drag(self, item, points):
        """Drag the mouse through ``points`` (image pixel coordinates, centres) on the canvas."""
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = self.el("mask")
        rect = self.d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];",
                                     canvas)
        sx, sy = rect[0] / item.width, rect[1] / item.height
        assert sx > 3, "the image should be zoomed to fit, several screen pixels per image pixel"
        offsets = [(round((x + 0.5) * sx - rect[0] / 2), round((y + 0.5) * sy - rect[1] / 2)) for x, y in points]
        chain = ActionChains(self.d, duration=20)
        chain.move_to_element_with_offset(canvas, *offsets[0]).click_and_hold()
        last = offsets[0]
        for off in offsets[1:]:
            chain.move_by_offset(off[0] - last[0], off[1] - last[1])
            last = off
        chain.release().perform()

    def click(self, id: str):
        self.el(id).click()

    def progress(self, labelled: int):
        want = f"{labelled} of {BATCH} labelled"
        self.wait(lambda: self.text("progress") == want, want)

    def stored(self, id: str, timeout: float = WAIT):
        self.wait(lambda: self.p.stored_mask(id) is not None, f"mask of {id} stored", timeout)
        return self.p.stored_mask(id)

    def predicted(self, item) -> np.ndarray:
        return predicted(self.batch, item)

    def shot(self, name: str) -> Path:
        path = self.shots / f"review-{name}.png"
        self.d.save_screenshot(str(path))
        return path


@pytest.fixture
def page(driver, template, tmp_path):
    project_dir = copy_project(template[0], tmp_path / "project")
    p = Project(project_dir, command="serve")
    try:
        with ThreadServer(create_app(p)) as server:
            pg = Page(driver, p, server.url, artifacts_dir(tmp_path))
            driver.get(server.url + "/")
            pg.wait_loaded(pg.batch.items[0].id)
            yield pg
            logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                    and "Failed to load resource" not in e.get("message", "")]
            assert not logs, f"errors in the page: {logs}"
            driver.get("about:blank")
    finally:
        p.close()


def _background_row(pred: np.ndarray, length: int) -> tuple[int, int]:
    """A row and start column where ``length`` pixels (+-3 px around them) are background in the prediction."""
    h, w = pred.shape
    for y in range(6, h - 6):
        for x in range(4, w - length - 4):
            if not pred[y - 3:y + 4, x - 3:x + length + 3].any():
                return y, x
    raise AssertionError("no background stretch in the prediction")


def _empty_box(pred: np.ndarray, size: int) -> tuple[int, int]:
    h, w = pred.shape
    for y in range(3, h - size - 3):
        for x in range(3, w - size - 3):
            if not pred[y - 2:y + size + 3, x - 2:x + size + 3].any():
                return y, x
    raise AssertionError("no empty box in the prediction")


def test_page_opens_the_batch(page):
    first = page.batch.items[0]
    assert page.text("progress") == f"0 of {BATCH} labelled"
    assert "round 1" in page.text("round")
    # what the model has earned, from the store: its validation Dice beside a constant mask's, no warning
    health = page.p.status()["model"]
    assert health["useful"] and page.el("model-note").is_displayed()
    assert page.text("model-note").startswith(f"The model's validation Dice is {health['val_dice']:.3f} "
                                              f"(a constant mask scores {health['constant_dice']:.3f}).")
    names = [li.get_attribute("data-id") for li in page.d.find_elements("css selector", "#items li")]
    assert names == [it.id for it in page.batch.items]
    size = page.d.execute_script("const c = document.getElementById('mask'); return [c.width, c.height];")
    assert size == [first.width, first.height]
    for key in ("brush", "eraser", "fill", "undo", "redo", "zoom", "uncertainty", "accept", "submit", "skip",
                "next"):
        assert key in page.text("help").lower(), key
    # the prediction is drawn on the canvas: the overlay has as many opaque pixels as the mask
    drawn = page.d.execute_script("""
        const c = document.getElementById('mask');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;""")
    assert drawn == int(page.predicted(first).sum()) > 0
    # uncertainty overlay toggles with u, zoom with + and -
    assert not page.el("uncertainty").is_displayed()
    page.key("u")
    page.wait(lambda: page.el("uncertainty").is_displayed(), "uncertainty overlay shown")
    zoom = page.text("zoom-value")
    page.key("+")
    page.wait(lambda: page.text("zoom-value") != zoom, "zoom in")
    page.key("0")
    page.wait(lambda: page.text("zoom-value") == zoom, "zoom to fit")
    page.key("u")
    page.wait(lambda: not page.el("uncertainty").is_displayed(), "uncertainty overlay hidden")
    page.wait_timer(1)  # the timer runs
    page.shot("opened")  # the README's figure comes from docs/figures/make_review_page.py (real ISIC images)


def test_painted_stroke_is_submitted_with_the_time_spent(page):
    item = page.batch.items[0]
    pred = page.predicted(item)
    y, x = _background_row(pred, 20)
    page.wait_timer(1)  # expert time on this image, as the page counts it
    page.drag(item, [(x, y), (x + 10, y), (x + 20, y)])
    page.wait(lambda: "mask" in page.text("item-info") and not page.el("undo").get_property("disabled"), "undo on")
    page.shot("painted")
    page.watch_requests()
    page.click("submit")
    page.progress(1)
    stored = page.stored(item.id)
    assert stored.shape == pred.shape
    assert stored[y, x:x + 21].all() and not pred[y, x:x + 21].any()  # the stroke, where the model saw nothing
    assert (stored | ~pred).all()  # the prediction is kept
    changed = np.argwhere(stored != pred)
    assert abs(changed[:, 0] - y).max() <= 2  # only along the stroke
    assert "stored" in page.text("message")
    recorded = [a for a in page.p.store.annotations(item.id) if a["seconds"] is not None]
    # the submit carries the page's own count (its timer ran, so the count is not zero) to the store
    submits = [q for q in page.sent("/api/mask/") if "active_seconds" in q]
    assert len(submits) == 1 and submits[0]["active_seconds"] > 0, submits
    assert (recorded[-1]["seconds"], recorded[-1]["active_seconds"]) == \
        pytest.approx((submits[0]["seconds"], submits[0]["active_seconds"]))
    assert page.p.status()["expert_seconds"] == pytest.approx(sum(a["seconds"] for a in recorded))
    page.wait_loaded(page.batch.items[1].id)  # moved on to the next image


def test_accept_submits_the_prediction_unchanged(page):
    item = page.batch.items[1]
    page.select(1)
    page.click("accept")
    page.progress(1)
    assert np.array_equal(page.stored(item.id), page.predicted(item))
    assert page.d.find_elements("css selector", "#items li")[1].get_attribute("class").split().count("labelled") == 1


def test_undo_and_redo_by_keyboard(page):
    from selenium.webdriver.common.keys import Keys

    first, second = page.batch.items[0], page.batch.items[1]
    y, x = _background_row(page.predicted(first), 12)
    page.drag(first, [(x, y), (x + 12, y)])
    page.wait(lambda: not page.el("undo").get_property("disabled"), "undo possible")
    page.key("z")
    page.wait(lambda: page.el("undo").get_property("disabled"), "undone")
    page.key(Keys.ENTER)
    page.progress(1)
    assert np.array_equal(page.stored(first.id), page.predicted(first))  # the stroke was undone
    page.wait_loaded(second.id)
    pred = page.predicted(second)
    y, x = _background_row(pred, 12)
    page.drag(second, [(x, y), (x + 12, y)])
    page.wait(lambda: not page.el("undo").get_property("disabled"), "undo possible")
    page.key_combo([Keys.CONTROL], "z")
    page.wait(lambda: not page.el("redo").get_property("disabled"), "redo possible")
    page.key_combo([Keys.CONTROL, Keys.SHIFT], "z")
    page.wait(lambda: page.el("redo").get_property("disabled"), "redone")
    page.key(Keys.ENTER)
    page.progress(2)
    stored = page.stored(second.id)
    assert stored[y, x:x + 13].all() and (stored | ~pred).all()


def test_fill_a_closed_outline_and_erase(page):
    item = page.batch.items[0]
    pred = page.predicted(item)
    y, x = _empty_box(pred, 12)
    corners = [(x, y), (x + 12, y), (x + 12, y + 12), (x, y + 12), (x, y)]
    page.drag(item, corners)
    page.key("f")
    page.wait(lambda: "active" in page.el("tool-fill").get_attribute("class"), "fill tool")
    page.drag(item, [(x + 6, y + 6)])  # a click inside the outline
    page.key("e")  # erase a notch into the predicted lesion
    ys, xs = np.nonzero(pred)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    assert pred[cy, cx]
    page.drag(item, [(cx, cy)])
    page.shot("filled")
    page.click("submit")
    page.progress(1)
    stored = page.stored(item.id)
    assert stored[y:y + 13, x:x + 13].all()  # outline and its inside
    assert not stored[cy, cx]  # erased
    outside = np.ones_like(pred)
    outside[y - 2:y + 15, x - 2:x + 15] = False
    outside[cy - 3:cy + 4, cx - 3:cx + 4] = False
    assert np.array_equal(stored[outside], pred[outside])


def test_refusals_are_shown_on_the_page(page, tmp_path):
    item = page.batch.items[0]
    wrong = tmp_path / "wrong-size.png"
    wrong.write_bytes(png(np.ones((10, 12), bool)))
    page.el("upload-file").send_keys(str(wrong))
    want = f"mask is 12x10 but its image is {item.width}x{item.height}"
    page.wait(lambda: want in page.text("message"), "the refusal")
    assert "refused" in page.text("message") and "error" in page.el("message").get_attribute("class")
    page.shot("refused")
    assert page.p.stored_mask(item.id) is None and page.text("progress") == f"0 of {BATCH} labelled"
    # the item whose prediction is empty: accepting it is refused, 'nothing here' stores an empty mask
    last = page.select(BATCH - 1)
    assert not page.predicted(last).any()
    page.click("accept")
    page.wait(lambda: "mask is empty" in page.text("message"), "the empty-mask refusal")
    assert page.p.stored_mask(last.id) is None
    page.click("empty")
    page.progress(1)
    stored = page.stored(last.id)
    assert stored.shape == (last.height, last.width) and not stored.any()
    # a right-size file from disk is stored as sent
    good = np.zeros((item.height, item.width), bool)
    good[10:20, 15:40] = True
    path = tmp_path / "good.png"
    path.write_bytes(png(good))
    page.select(0)
    page.el("upload-file").send_keys(str(path))
    page.progress(2)
    assert np.array_equal(page.stored(item.id), good)


def test_skip_records_time_and_keeps_the_image_queued(page):
    item = page.batch.items[0]
    page.wait_timer(1)
    page.watch_requests()
    page.key("s")
    page.wait_loaded(page.batch.items[1].id)
    page.wait(lambda: any(a["action"] == "skip" for a in page.p.store.annotations(item.id)), "skip time recorded")
    skips = page.sent("/api/skip/")
    assert len(skips) == 1 and skips[0]["active_seconds"] > 0, skips  # the page's own count
    row = [a for a in page.p.store.annotations(item.id) if a["action"] == "skip"][-1]
    assert (row["seconds"], row["active_seconds"]) == pytest.approx((skips[0]["seconds"], skips[0]["active_seconds"]))
    assert item.id in page.p.store.queued(1) and page.p.stored_mask(item.id) is None
    page.key("p")  # back; n and arrows move too
    page.wait_loaded(item.id)
    assert page.text("progress") == f"0 of {BATCH} labelled"
