"""The review page on 24-megapixel photos: time until it is ready and the browser's memory (issue 29).

Builds a small project (synthetic images, a tiny model) whose open batch is then given four large
photo-like JPEGs (6000x4000 first, then 3000x2000, 6000x4000 and 4000x6000) with predicted masks
at their size, serves it with :func:`alseg.annotate.server.create_app` in a thread and drives
Debian's headless Chromium through Selenium, a fresh browser per repeat (median of ``--repeats``).

**Ready** (``ready_s``): milliseconds from the navigation's start (the page's time origin) until
all of these hold, measured inside the page by a script installed before the page's own: the
review page marked the first image loaded (``#stage[data-loaded-id]``: it sets that after the
image loaded and its predicted mask was decoded and drawn into the overlay), the image was
painted (Element Timing ``renderTime`` of ``#image``; ``img.decode()`` where Element Timing gives
nothing), and after that one animation frame ran and a zero-delay timer fired, i.e. the frame
holding image and mask was produced and the main thread takes input. ``wall_ready_s`` is the same
seen from this process (``driver.get`` to the flag, polled every 20 ms).

**Page memory** (``page_mb``): the proportional set size (PSS, ``/proc/PID/smaps_rollup``) of the
page's renderer process plus that of Chromium's GPU process (with ``--disable-gpu`` it holds the
software compositor's frame buffers and shared bitmaps that the page's drawing costs). Also
recorded: the renderer's RSS and peak RSS (VmHWM over the whole repeat), every Chromium
process's PSS, and the JS heap (CDP ``Performance.getMetrics`` ``JSHeapUsedSize``). Measured
twice per repeat: ``after_load`` (1.5 s after ready) and ``after_submit`` (one brush stroke on
the 6000x4000 image, submitted, the stroke checked in the stored mask, and the next image -- the
3000x2000 one -- ready, plus 1.5 s). Targets: ready under 2 s, page memory under 150 MB.

    .venv/bin/python benchmarks/page_load.py [--repeats 3] [--json] [--out benchmarks/results/cpu-page-load.json]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SIZES = [(6000, 4000), (3000, 2000), (6000, 4000), (4000, 6000)]  # width, height of the batch's images
READY_TARGET_S = 2.0
MEMORY_TARGET_MB = 150.0
SETTLE_S = 1.5
WAIT_S = 120

# Installed before the page's own scripts: records when the review page's first image is ready.
READY_PROBE = r"""
(() => {
  window.__alsegBench = {ready: null, loadedAt: null, paintAt: null, how: null, readyId: null};
  const bench = window.__alsegBench;
  const entries = [];
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) if (e.identifier === "alseg-image") entries.push(e);
    }).observe({type: "element", buffered: true});
  } catch (e) {}
  const frame = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  document.addEventListener("DOMContentLoaded", () => {
    const img = document.getElementById("image");
    if (img) img.setAttribute("elementtiming", "alseg-image");  // before app.js sets its src
    const stage = document.getElementById("stage");
    const watch = new MutationObserver(async () => {
      const id = stage.dataset.loadedId;
      if (!id || bench.readyId !== null) return;
      bench.readyId = id;
      bench.loadedAt = performance.now();
      await frame();
      let painted = entries.find((e) => e.renderTime > 0 || e.loadTime > 0);
      for (let k = 0; !painted && k < 50; k++) {  // Element Timing is reported a frame or two late
        await frame();
        painted = entries.find((e) => e.renderTime > 0 || e.loadTime > 0);
      }
      if (painted) { bench.paintAt = painted.renderTime || painted.loadTime; bench.how = "element-timing"; }
      else { await img.decode().catch(() => null); bench.paintAt = performance.now(); bench.how = "img.decode"; }
      await frame();
      bench.ready = performance.now();
    });
    watch.observe(stage, {attributes: true, attributeFilter: ["data-loaded-id"]});
  });
})();
"""


# ---------------------------------------------------------------- the project
def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth shading, blotches at several scales, a darker lesion, fine grain."""
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), np.float32)
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    xx = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    base = np.array([205, 165, 145], np.float32) + rng.normal(0, 10, 3).astype(np.float32)
    shade = 1 + 0.25 * (xx - 0.5) * rng.normal() + 0.2 * (yy - 0.5) * rng.normal()
    low = np.zeros((height, width), np.float32)
    for cells, amp in ((6, 18), (40, 10), (300, 6)):  # low-frequency structure, upsampled noise
        grid = rng.normal(0, amp, (max(2, cells * height // width), cells)).astype(np.float32)
        low += np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC))
    dist = lesion_distance(width, height, seed)
    soft = np.clip((1 - dist) / 0.08, 0, 1)
    for c in range(3):
        out[:, :, c] = base[c] * shade + low
    out *= (1 - 0.5 * soft)[:, :, None]
    out += rng.normal(0, 7, (height, width, 1)).astype(np.float32)  # grain
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def lesion_distance(width: int, height: int, seed: int) -> np.ndarray:
    """Distance to an irregular lesion's centre in units of its border radius (<1 inside)."""
    rng = np.random.default_rng(seed + 1000)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * rng.uniform(0.35, 0.65), width * rng.uniform(0.35, 0.65)
    r0 = min(width, height) * rng.uniform(0.18, 0.3)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r0 * (1 + sum(rng.uniform(0.03, 0.1) * np.sin(k * angle + rng.uniform(0, 6.28)) for k in range(2, 7)))
    return np.hypot(yy - cy, xx - cx) / radius


def predicted_mask(width: int, height: int, seed: int) -> np.ndarray:
    """The model's mask: the lesion a little off (as a real prediction is), 0/255."""
    return ((lesion_distance(width, height, seed) < 0.95) * 255).astype(np.uint8)


def build_project(root: Path) -> tuple[Path, list[dict]]:
    """A project with an open batch of ``len(SIZES)`` large photos; returns it and the batch's files."""
    from alseg.data.synthetic import make_synthetic
    from alseg.project import Project, init_project, query

    src = make_synthetic(root / "synthetic", n=36, size=32)
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for k, path in enumerate(sorted((src / "images").iterdir())):
        shutil.copy(path, images / path.name)
        if k < 12:
            shutil.copy(src / "masks" / path.name, masks / path.name)
    project = root / "project"
    overrides = {"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 1, "min_epoch_steps": 20},
                 "active": {"round_epochs": 1, "mc_passes": 2}, "pretrain": {"min_steps": 5, "max_steps": 5}}
    init_project(project, images, masks, preset="demo", overrides=overrides)
    query(project, n=len(SIZES))
    with Project(project, command="bench") as p:
        folder = p.batch().folder
    # the exported batch gets large photos: files replaced, sizes in the manifest updated
    manifest = folder / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    files = []
    for k, (row, (w, h)) in enumerate(zip(rows, SIZES)):
        stem = Path(row["image"]).stem
        for old in ("image", "predicted", "uncertainty"):
            if row[old]:
                (folder / row[old]).unlink(missing_ok=True)
        pixels = photo(w, h, k)
        row["image"] = f"images/{stem}.jpg"
        Image.fromarray(pixels).save(folder / row["image"], format="JPEG", quality=92)
        row["uncertainty"] = f"uncertainty/{stem}.jpg"
        Image.fromarray(pixels[::-1]).save(folder / row["uncertainty"], format="JPEG", quality=90)
        row["uncertainty_scale"] = "0.05"
        del pixels
        row["predicted"] = f"predicted/{stem}.png"
        Image.fromarray(predicted_mask(w, h, k)).save(folder / row["predicted"], format="PNG")
        row["width"], row["height"] = str(w), str(h)
        files.append({"id": row["id"], "width": w, "height": h,
                      "jpeg_mb": round((folder / row["image"]).stat().st_size / 2**20, 2),
                      "predicted_png_kb": round((folder / row["predicted"]).stat().st_size / 2**10, 1)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest.write_text(buf.getvalue(), encoding="utf-8")
    shutil.rmtree(folder / "thumbs", ignore_errors=True)
    with Project(project, command="bench") as p:  # the store's record of the batch is its truth: the same
        number = p.batch().round
        recorded = p.store.batch_record(number)
        if recorded is not None:
            by_id = {row["id"]: row for row in rows}
            for item in recorded:
                row = by_id[item["id"]]
                item.update(image=row["image"], predicted=row["predicted"], uncertainty=row["uncertainty"],
                            width=int(row["width"]), height=int(row["height"]), uncertainty_scale=0.05)
            p.store.record_batch(number, recorded)
    return project, files


# ---------------------------------------------------------------- the browser's processes
def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kind(pid: int) -> str | None:
    try:
        # a zygote's children rewrite their command line as one string: split on spaces too
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").split()
    except OSError:
        return None
    if not cmd or b"chrom" not in cmd[0]:
        return None
    for arg in cmd:
        if arg.startswith(b"--type="):
            kind = arg[7:].decode()
            if kind == "renderer" and b"--top-chrome-webui" in cmd:
                return "renderer:webui"  # the browser's own UI, not the page
            if kind == "utility":
                sub = [a for a in cmd if a.startswith(b"--utility-sub-type=")]
                return "utility:" + (sub[0].split(b".")[-1].decode() if sub else "?")
            return kind
    return "browser"


def _kb(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        for line in open(path):
            name, _, rest = line.partition(":")
            if name in fields:
                out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


def processes(driver_pid: int) -> list[dict]:
    rows = []
    for pid in _children(driver_pid):
        kind = _kind(pid)
        if kind is None:
            continue
        roll = _kb(f"/proc/{pid}/smaps_rollup", ("Rss", "Pss", "Pss_Anon"))
        status = _kb(f"/proc/{pid}/status", ("VmRSS", "VmHWM"))
        if not roll:
            continue
        rows.append({"pid": pid, "kind": kind, "pss_mb": roll.get("Pss", 0) / 1024,
                     "rss_mb": roll.get("Rss", 0) / 1024, "pss_anon_mb": roll.get("Pss_Anon", 0) / 1024,
                     "peak_rss_mb": status.get("VmHWM", 0) / 1024})
    return rows


def memory(driver, driver_pid: int) -> dict:
    procs = processes(driver_pid)
    renderers = [p for p in procs if p["kind"] == "renderer"]
    page = max(renderers, key=lambda p: p["rss_mb"])  # the review page's; others are spare/blank ones
    gpu = [p for p in procs if p["kind"] == "gpu-process"]
    gpu_pss = sum(p["pss_mb"] for p in gpu)
    metrics = {m["name"]: m["value"] for m in driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}
    heap = driver.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null;")
    return {
        "page_mb": round(page["pss_mb"] + gpu_pss, 1),
        "renderer_pss_mb": round(page["pss_mb"], 1), "renderer_rss_mb": round(page["rss_mb"], 1),
        "renderer_pss_anon_mb": round(page["pss_anon_mb"], 1), "renderer_peak_rss_mb": round(page["peak_rss_mb"], 1),
        "gpu_process_pss_mb": round(gpu_pss, 1),
        "all_chromium_pss_mb": round(sum(p["pss_mb"] for p in procs), 1),
        "js_heap_used_mb": round(metrics.get("JSHeapUsedSize", 0) / 2**20, 1),
        "js_heap_total_mb": round(metrics.get("JSHeapTotalSize", 0) / 2**20, 1),
        "performance_memory_used_mb": None if heap is None else round(heap / 2**20, 1),
        "processes": {p["kind"] + f"#{p['pid']}": round(p["pss_mb"], 1) for p in procs},
    }


# ---------------------------------------------------------------- one repeat
def start_driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--disable-gpu", "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
                "--enable-precise-memory-info"):
        options.add_argument(arg)
    service = Service(str(CHROMEDRIVER))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_window_size(1400, 900)
    return driver, service.process.pid


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}; message: {driver.find_element('id', 'message').text!r}")


def ready(driver, id: str) -> dict:
    return wait(driver, lambda: driver.execute_script(
        "const b = window.__alsegBench; return b && b.ready !== null && b.readyId === arguments[0] ? b : null;", id),
                f"{id} ready")


def reset_probe(driver) -> None:
    driver.execute_script("const b = window.__alsegBench; b.ready = null; b.readyId = null; b.paintAt = null;")


def stroke(driver, width: int, height: int) -> tuple[int, int, int]:
    """A horizontal brush stroke in the image's top-left background; returns (row, x0, x1) in image px."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "stage")
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];",
                                 canvas)
    scale = rect[0] / width
    y, x0, x1 = height // 10, width // 20, width // 5
    to = lambda x, yy: (round((x + 0.5) * scale - rect[0] / 2), round((yy + 0.5) * scale - rect[1] / 2))
    chain = ActionChains(driver, duration=20)
    start = to(x0, y)
    chain.move_to_element_with_offset(canvas, *start).click_and_hold()
    last = start
    for x in np.linspace(x0, x1, 8)[1:]:
        off = to(x, y)
        chain.move_by_offset(off[0] - last[0], off[1] - last[1])
        last = off
    chain.release().perform()
    return y, x0, x1


def one_repeat(project_dir: Path, files: list[dict]) -> dict:
    from alseg.annotate.server import create_app
    from alseg.project import Project
    from annotate_fixtures import ThreadServer

    work = Path(tempfile.mkdtemp(prefix="alseg-page-load-"))
    try:
        dest = work / "project"
        shutil.copytree(project_dir, dest, symlinks=True)
        (dest / "lock").unlink(missing_ok=True)
        p = Project(dest, command="serve")
        driver, driver_pid = start_driver()
        try:
            with ThreadServer(create_app(p)) as server:
                driver.execute_cdp_cmd("Performance.enable", {})
                driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": READY_PROBE})
                first, second = files[0], files[1]
                t0 = time.monotonic()
                driver.get(server.url + "/")
                bench = ready(driver, first["id"])
                wall = time.monotonic() - t0
                errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
                time.sleep(SETTLE_S)
                after_load = memory(driver, driver_pid)
                undo_before = driver.find_element("id", "undo").get_property("disabled")
                reset_probe(driver)
                y, x0, x1 = stroke(driver, first["width"], first["height"])
                wait(driver, lambda: not driver.find_element("id", "undo").get_property("disabled"), "the stroke")
                t1 = time.monotonic()
                driver.find_element("id", "submit").click()
                wait(driver, lambda: p.stored_mask(first["id"]) is not None, "the mask stored")
                stored = p.stored_mask(first["id"])
                bench2 = ready(driver, second["id"])
                submit_to_next = time.monotonic() - t1
                painted = int(stored[y, x0 + 2:x1 - 1].sum())
                time.sleep(SETTLE_S)
                after_submit = memory(driver, driver_pid)
                errors += [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        finally:
            driver.quit()
            p.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not undo_before is True:
        raise RuntimeError("the page had an edit before the stroke")
    if painted < (x1 - x0 - 3) * 0.99:
        raise RuntimeError(f"the stroke is not in the stored mask ({painted} of {x1 - x0 - 3} px)")
    return {"ready_s": round(bench["ready"] / 1000, 3), "wall_ready_s": round(wall, 3),
            "loaded_flag_s": round(bench["loadedAt"] / 1000, 3),
            "image_painted_s": None if bench["paintAt"] is None else round(bench["paintAt"] / 1000, 3),
            "painted_by": bench["how"], "submit_to_next_ready_s": round(submit_to_next, 3),
            "next_image_ready_after_submit_in_page_s": round(bench2["ready"] / 1000, 3),
            "stroke_px_stored": painted, "after_load": after_load, "after_submit": after_submit,
            "page_errors": [e.get("message", "")[:300] for e in errors]}


def median_of(runs: list[dict], *path: str) -> float:
    values = []
    for r in runs:
        v = r
        for key in path:
            v = v[key]
        values.append(v)
    return round(statistics.median(values), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--label", default=None, help="a note stored with the result (e.g. which page version)")
    ap.add_argument("--static", type=Path, default=None,
                    help="serve the page from this folder instead of alseg/annotate/static (e.g. an older app.js)")
    args = ap.parse_args()
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        sys.exit(f"needs Debian's chromium and chromedriver; missing: {', '.join(missing)}")
    from machine import machine_info

    if args.static is not None:
        import alseg.annotate.server as server

        server.STATIC = args.static.resolve()  # create_app mounts the folder named here

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    root = Path(tempfile.mkdtemp(prefix="alseg-page-project-"))
    try:
        t = time.monotonic()
        project, files = build_project(root)
        log(f"project built in {time.monotonic() - t:.0f} s: {files}")
        runs = []
        for k in range(args.repeats):
            runs.append(one_repeat(project, files))
            r = runs[-1]
            log(f"repeat {k + 1}: ready {r['ready_s']} s, page {r['after_load']['page_mb']} MB after load, "
                f"{r['after_submit']['page_mb']} MB after submit")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import selenium

    version = os.popen(f"{CHROMIUM} --version 2>/dev/null").read().strip()
    summary = {
        "ready_s": median_of(runs, "ready_s"), "wall_ready_s": median_of(runs, "wall_ready_s"),
        "page_mb_after_load": median_of(runs, "after_load", "page_mb"),
        "page_mb_after_submit": median_of(runs, "after_submit", "page_mb"),
        "renderer_peak_rss_mb": median_of(runs, "after_submit", "renderer_peak_rss_mb"),
        "js_heap_used_mb_after_load": median_of(runs, "after_load", "js_heap_used_mb"),
        "js_heap_used_mb_after_submit": median_of(runs, "after_submit", "js_heap_used_mb"),
        "submit_to_next_ready_s": median_of(runs, "submit_to_next_ready_s"),
    }
    summary["meets_ready_target"] = summary["ready_s"] < READY_TARGET_S
    summary["meets_memory_target"] = max(summary["page_mb_after_load"], summary["page_mb_after_submit"]) < MEMORY_TARGET_MB
    result = {
        "benchmark": "review page on a 6000x4000 photo (issue 29)", "label": args.label,
        "static": str(args.static) if args.static is not None else "alseg/annotate/static",
        "targets": {"ready_s": READY_TARGET_S, "page_mb": MEMORY_TARGET_MB},
        "definitions": {
            "ready_s": "navigation start -> #stage[data-loaded-id] set, #image painted (Element Timing), then one "
                       "animation frame and a zero-delay timer (in-page clock)",
            "page_mb": "PSS of the page's renderer process + PSS of the GPU process (/proc/PID/smaps_rollup)",
            "after_load": f"{SETTLE_S} s after ready, no forced GC",
            "after_submit": f"one brush stroke on the 6000x4000 image, submit, the next (3000x2000) image ready, "
                            f"{SETTLE_S} s",
        },
        "summary": summary, "images": files, "repeats": args.repeats, "runs": runs,
        "browser": {"chromium": version, "selenium": selenium.__version__,
                    "flags": "--headless=new --disable-gpu --window-size=1400,900 --force-device-scale-factor=1"},
        "machine": machine_info(),
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text if args.json else json.dumps({"summary": summary, "machine": result["machine"]}, indent=2))


if __name__ == "__main__":
    main()
