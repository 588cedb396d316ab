"""Make docs/figures/review-page.png: the review page on a real ISIC 2017 project.

    .venv/bin/python docs/figures/make_review_page.py [--out docs/figures/review-page.png]

Builds a small project in a temporary folder over 240 ISIC training images in
``../shared/data/isic`` (120 of their masks as the lab's starting set, read in place through
symbolic links), trains a small model (64 px, width 8, 30 epochs: a few minutes on 2 CPU cores),
queries a batch of 8, serves it on 127.0.0.1 and photographs the page in headless Chromium on
the batch's first image, with the uncertainty overlay on.
Needs Debian's chromium and chromedriver (``make setup``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ISIC = ROOT.parent / "shared" / "data" / "isic"


def _project(work: Path) -> Path:
    from alseg.data import open_dataset
    from alseg.project import init_project, query

    images, masks = work / "images", work / "masks"
    images.mkdir()
    masks.mkdir()
    for k, s in enumerate(open_dataset(ISIC).samples[:240]):
        (images / s.image.name).symlink_to(s.image)
        if k % 2 == 0:
            (masks / s.mask.name).symlink_to(s.mask)
    project = work / "project"
    init_project(project, images, masks, preset="quick-isic",
                 overrides={"data": {"size": 64}, "model": {"width": 8}, "train": {"epochs": 30},
                            "active": {"mc_passes": 20}})
    query(project, n=8)
    return project


def _shoot(project: Path, out: Path) -> None:
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from alseg.annotate.server import create_app
    from alseg.project import Project

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handle = Project(project, command="serve")
    server = uvicorn.Server(uvicorn.Config(create_app(handle), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return document.querySelectorAll('#items li').length") == 8)
        time.sleep(1.5)  # images and overlays drawn
        driver.find_element("tag name", "body").send_keys("u")  # the uncertainty overlay on
        time.sleep(1.0)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(10)
        handle.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "review-page.png")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alseg-review-figure-"))
    try:
        _shoot(_project(work), args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(args.out)


if __name__ == "__main__":
    main()
