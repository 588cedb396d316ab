"""Bad input through the real CLI: one ``alseg: error:`` line on stderr, exit 2, nothing written.

Every test builds its own tiny dataset under ``tmp_path`` and runs ``python -m alseg`` as a
subprocess with ``ALSEG_CACHE_DIR`` pointing into ``tmp_path``. For each bad input we check:

* exit status 2;
* stderr is exactly one non-empty line, starting with ``alseg: error:``, naming the offending
  file and the problem, and holding no traceback;
* nothing was written: the ``--out`` run directory does not exist and no cache folder was
  completed (no ``meta.json`` anywhere under the cache dir, only hidden temp folders if any).

``alseg train`` is run with ``--json`` in most checks and once without it (the human mode,
where the effective config is echoed only after the data has been validated).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
from PIL import Image

SIZE = 32
TRAIN_ARGS = ["--epochs", "1", "--size", str(SIZE), "--width", "4"]


# ----------------------------------------------------------------------------- helpers


def run_alseg(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "ALSEG_CACHE_DIR", "XDG_CACHE_HOME"):
        env.pop(key, None)
    env["ALSEG_CACHE_DIR"] = str(tmp_path / "cache")
    env["COLUMNS"] = "80"  # narrower than the tmp paths in the messages: the line must not wrap
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, "-m", "alseg", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a rejected run, after the checks every rejection shares."""
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, detail
    assert proc.returncode == 2, detail
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    assert lines[0].startswith("alseg: error:"), detail
    return lines[0]


def assert_names(line: str, name: str, keywords: tuple[str, ...]) -> None:
    assert name in line, f"{name!r} not named in: {line}"
    for kw in keywords:
        assert kw.lower() in line.lower(), f"{kw!r} not in: {line}"


def assert_nothing_written(tmp_path: Path, run_dir: Path | None = None) -> None:
    if run_dir is not None:
        assert not run_dir.exists(), f"run directory {run_dir} was created"
    cache = tmp_path / "cache"
    if cache.exists():
        assert not list(cache.rglob("meta.json")), "a cache folder was completed"
        visible = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
        assert not visible, f"cache holds non-temp entries: {visible}"


def rgb(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def square_mask(size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[size // 4: size // 2, size // 4: size // 2] = 255
    return m


def folder_dataset(root: Path, n: int = 3) -> Path:
    """A valid ``folder`` layout with ``n`` RGB PNGs named good_<i> and their 0/255 masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rgb(i)).save(root / "images" / f"good_{i}.png")
        Image.fromarray(square_mask()).save(root / "masks" / f"good_{i}.png")
    return root


# ----------------------------------------------------------------------------- bad datasets


@dataclass
class Case:
    root: Path  # what --data gets
    name: str  # file (or folder) name the error must contain
    keywords: tuple[str, ...]  # words describing the problem, all required (case-insensitive)


def unreadable_png(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds")
    (root / "images" / "x_noise.png").write_bytes(np.random.default_rng(1).bytes(600))
    Image.fromarray(square_mask()).save(root / "masks" / "x_noise.png")
    return Case(root, "x_noise.png", ("unreadable",))


def truncated_jpeg(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds")
    path = root / "images" / "x_cut.jpg"
    Image.fromarray(rgb(7)).save(path, quality=95)
    data = path.read_bytes()
    assert data.find(b"\xff\xda") < len(data) // 2  # the cut falls in the scan data: header stays valid
    path.write_bytes(data[: len(data) // 2])
    Image.fromarray(square_mask()).save(root / "masks" / "x_cut.png")
    return Case(root, "x_cut.jpg", ("unreadable",))


def mask_wrong_size(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds")
    Image.fromarray(rgb(8)).save(root / "images" / "x_size.png")
    Image.fromarray(square_mask(SIZE // 2)).save(root / "masks" / "x_size.png")
    return Case(root, "x_size.png", ("mask", f"{SIZE}x{SIZE}"))


def label_map_mask(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds")
    Image.fromarray(rgb(9)).save(root / "images" / "x_labels.png")
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[4:12, 4:12] = 1
    labels[16:28, 16:28] = 2
    Image.fromarray(labels).save(root / "masks" / "x_labels.png")
    return Case(root, "x_labels.png", ("mask", "binary"))


def soft_mask(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds")
    Image.fromarray(rgb(10)).save(root / "images" / "x_soft.png")
    yy, xx = np.mgrid[:SIZE, :SIZE]
    blob = np.exp(-((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) / (2 * (SIZE / 5) ** 2))
    soft = np.round(blob / blob.max() * 255).astype(np.uint8)  # a probability map, 0..255
    assert np.count_nonzero((soft > 0) & (soft < 255)) > 0.5 * soft.size
    Image.fromarray(soft).save(root / "masks" / "x_soft.png")
    return Case(root, "x_soft.png", ("mask", "binary"))


def isic_missing_mask(tmp: Path) -> Case:
    root = tmp / "isic"
    data, truth = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part1_GroundTruth"
    data.mkdir(parents=True)
    truth.mkdir()
    for i in (1, 2):
        Image.fromarray(rgb(i)).save(data / f"ISIC_000000{i}.jpg")
    Image.fromarray(square_mask()).save(truth / "ISIC_0000001_segmentation.png")
    return Case(root, "ISIC_0000002.jpg", ("mask",))


def lgg_missing_mask(tmp: Path) -> Case:
    root = tmp / "lgg"
    patient = "TCGA_XX_0001_20000101"
    pdir = root / "kaggle_3m" / patient
    pdir.mkdir(parents=True)
    tifffile.imwrite(pdir / f"{patient}_1.tif", rgb(1))
    tifffile.imwrite(pdir / f"{patient}_1_mask.tif", square_mask())
    tifffile.imwrite(pdir / f"{patient}_2.tif", rgb(2))
    return Case(root, f"{patient}_2.tif", ("mask",))


def groups_csv_latin1(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds", n=2)
    (root / "groups.csv").write_bytes("image,group\ngood_0.png,Zürich\ngood_1.png,Genève\n".encode("latin-1"))
    return Case(root, "groups.csv", ("not utf-8",))


def groups_csv_missing_row(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds", n=2)
    (root / "groups.csv").write_text("image,group\ngood_0.png,p1\n")
    return Case(root, "groups.csv", ("good_1.png", "no row"))


def broken_mask_link(tmp: Path) -> Case:
    root = folder_dataset(tmp / "ds")
    link = root / "masks" / "good_1.png"
    link.unlink()
    link.symlink_to(tmp / "moved_away.png")
    return Case(root, "good_1.png", ("broken symbolic link",))


def isic_two_spellings(tmp: Path) -> Case:
    root = tmp / "isic"
    data = root / "ISIC-2017_Training_Data"
    data.mkdir(parents=True)
    Image.fromarray(rgb(1)).save(data / "ISIC_0000001.jpg", format="JPEG")
    Image.fromarray(rgb(2)).save(data / "ISIC_0000001.JPG", format="JPEG")
    return Case(root, "ISIC_0000001.JPG", ("ISIC_0000001.jpg", "two"))


def empty_folder(tmp: Path) -> Case:
    root = tmp / "empty_ds"
    root.mkdir()
    return Case(root, "empty_ds", ("unknown layout",))


def empty_images_folder(tmp: Path) -> Case:
    root = tmp / "no_pics_ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    return Case(root, "no_pics_ds", ("no images",))


def unknown_layout(tmp: Path) -> Case:
    root = tmp / "notes_only"
    root.mkdir()
    (root / "README.txt").write_text("not a dataset\n")
    return Case(root, "notes_only", ("unknown layout",))


def missing_path(tmp: Path) -> Case:
    return Case(tmp / "does_not_exist", "does_not_exist", ("no such",))


Builder = Callable[[Path], Case]

PIXEL_CASES = [  # bad pixels: checked by both `train` and `data summary`
    pytest.param(unreadable_png, id="unreadable-png"),
    pytest.param(truncated_jpeg, id="truncated-jpeg"),
    pytest.param(mask_wrong_size, id="mask-wrong-size"),
    pytest.param(label_map_mask, id="label-map-mask"),
    pytest.param(soft_mask, id="soft-mask"),
]
LAYOUT_CASES = [
    pytest.param(isic_missing_mask, id="isic-missing-mask"),
    pytest.param(lgg_missing_mask, id="lgg-missing-mask"),
    pytest.param(groups_csv_latin1, id="groups-csv-latin1"),
    pytest.param(groups_csv_missing_row, id="groups-csv-missing-row"),
    pytest.param(broken_mask_link, id="broken-mask-link"),
    pytest.param(isic_two_spellings, id="isic-two-spellings"),
    pytest.param(empty_folder, id="empty-folder"),
    pytest.param(empty_images_folder, id="folder-empty-images"),
    pytest.param(unknown_layout, id="unknown-layout"),
    pytest.param(missing_path, id="missing-path"),
]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("build", PIXEL_CASES + LAYOUT_CASES)
def test_train_rejects_bad_input(tmp_path: Path, build: Builder) -> None:
    case = build(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_alseg(tmp_path, "train", "--data", str(case.root), "--out", str(run_dir), *TRAIN_ARGS, "--json")
    assert_names(error_line(proc), case.name, case.keywords)
    assert proc.stdout.strip() == ""
    assert_nothing_written(tmp_path, run_dir)


@pytest.mark.parametrize("build", [
    pytest.param(unreadable_png, id="unreadable-png"),
    pytest.param(truncated_jpeg, id="truncated-jpeg"),
    pytest.param(mask_wrong_size, id="mask-wrong-size"),
    pytest.param(label_map_mask, id="label-map-mask"),
    pytest.param(soft_mask, id="soft-mask"),
])
def test_data_summary_rejects_bad_pixels(tmp_path: Path, build: Builder) -> None:
    case = build(tmp_path)
    proc = run_alseg(tmp_path, "data", "summary", str(case.root), "--json")
    assert_names(error_line(proc), case.name, case.keywords)
    assert proc.stdout.strip() == ""  # no partial JSON for scripts to misread
    assert_nothing_written(tmp_path)


def test_train_human_mode_error_is_one_line(tmp_path: Path) -> None:
    """Without --json the error is still the one line on stderr: nothing is echoed before validation."""
    case = label_map_mask(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_alseg(tmp_path, "train", "--data", str(case.root), "--out", str(run_dir), *TRAIN_ARGS)
    assert_names(error_line(proc), case.name, case.keywords)
    assert_nothing_written(tmp_path, run_dir)


def test_data_summary_accepts_antialiased_binary_mask(tmp_path: Path) -> None:
    """A 0/255 mask with under 1 % grey edge pixels is binary enough (binarised at 128)."""
    root = folder_dataset(tmp_path / "ds", n=2)
    mask = square_mask()
    edge = [(SIZE // 4 - 1, x) for x in range(SIZE // 4, SIZE // 4 + 8)]  # 8 of 1024 pixels: 0.78 %
    for k, (y, x) in enumerate(edge):
        mask[y, x] = 40 + 20 * k
    assert 0 < np.count_nonzero((mask > 0) & (mask < 255)) < 0.01 * mask.size
    Image.fromarray(rgb(5)).save(root / "images" / "aa.png")
    Image.fromarray(mask).save(root / "masks" / "aa.png")
    proc = run_alseg(tmp_path, "data", "summary", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower()
    summary = json.loads(proc.stdout)
    assert summary["samples"] == 3 and summary["with_mask"] == 3 and summary["positive"] == 3
    assert summary["image_sizes"] == {f"{SIZE}x{SIZE}": 3}


def test_evaluate_rejects_non_checkpoint(tmp_path: Path) -> None:
    root = folder_dataset(tmp_path / "ds", n=2)
    ckpt = tmp_path / "NOT_A_CHECKPOINT.pt"
    ckpt.write_bytes(np.random.default_rng(3).bytes(512))
    proc = run_alseg(tmp_path, "evaluate", str(ckpt), "--data", str(root))
    assert_names(error_line(proc), ckpt.name, ("checkpoint",))
    assert_nothing_written(tmp_path)


def test_merge_rejects_a_file_that_is_not_a_comparison(tmp_path: Path) -> None:
    bad = tmp_path / "NOT_A_STUDY.json"
    bad.write_text(json.dumps({"runs": {"ceal-s0": {"strategy": "ceal", "seed": 0}}}))
    out = tmp_path / "merged"
    proc = run_alseg(tmp_path, "merge", str(bad), "--out", str(out))
    assert_names(error_line(proc), bad.name, ("curve", "alseg compare"))
    assert not out.exists()
