"""alseg predict: masks at original size, uncertainty maps, scores.csv; bad files skipped, never silently."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from alseg import AlsegError, predict_folder
from alseg.data.cache import fit_image
from alseg.predict import _to_original, uncertainty_rgb
from conftest import ISIC, run_cli

ISIC_IMAGES = ISIC / "ISIC-2017_Training_Data"
IDS = ("ISIC_0000000", "ISIC_0000001", "ISIC_0000002")


@pytest.fixture
def folder(tmp_path):
    """A plain folder: 3 real ISIC jpgs, a non-square grey PNG (50x30) and a corrupt bad.png."""
    root = tmp_path / "images"
    root.mkdir()
    for sid in IDS:
        shutil.copy(ISIC_IMAGES / f"{sid}.jpg", root)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50), np.uint8)).save(root / "small.png")
    (root / "bad.png").write_bytes(np.random.default_rng(1).integers(0, 256, 300, np.uint8).tobytes())
    return root


def _rows(out):
    with (out / "scores.csv").open(newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def _size(path):
    with Image.open(path) as im:
        return im.size


def test_cli_writes_masks_maps_and_scores_and_reports_the_bad_file(ckpt, folder, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("predict", ckpt, "--images", folder, "--out", out, "--mc", "4",
                   env_extra={"ALSEG_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0
    assert "bad.png" in proc.stdout + proc.stderr
    sizes = {sid: _size(ISIC_IMAGES / f"{sid}.jpg") for sid in IDS} | {"small": (50, 30)}
    for sid, wh in sizes.items():
        with Image.open(out / "masks" / f"{sid}.png") as im:
            assert im.mode == "L" and im.size == wh
            assert set(np.unique(np.asarray(im))) <= {0, 255}
        with Image.open(out / "uncertainty" / f"{sid}.png") as im:
            assert im.mode == "RGB" and im.size == wh
    assert not (out / "masks" / "bad.png").exists() and not (out / "uncertainty" / "bad.png").exists()
    rows = _rows(out)
    assert len(rows) == 5 and set(rows) == set(sizes) | {"bad"}
    assert rows["bad"]["status"].startswith("skipped:") and rows["bad"]["variance"] == ""
    for sid, (w, h) in sizes.items():
        r = rows[sid]
        assert r["status"] == "ok" and (int(r["width"]), int(r["height"])) == (w, h)
        assert float(r["variance"]) >= 0 and float(r["entropy"]) >= 0 and float(r["bald"]) >= 0
        assert 0 <= float(r["foreground_fraction"]) <= 1


def test_isic_layout_is_recognised(ckpt, tmp_path):
    data = tmp_path / "isic" / "ISIC-2017_Training_Data"
    data.mkdir(parents=True)
    for sid in IDS[:2]:
        shutil.copy(ISIC_IMAGES / f"{sid}.jpg", data)
    out = tmp_path / "out"
    result = json.loads(run_cli("predict", ckpt, "--images", tmp_path / "isic", "--out", out, "--mc", "2",
                                "--json").stdout)
    assert result == {"images": 2, "skipped": [], "out": str(out), "mc": 2}
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{sid}.png" for sid in IDS[:2]]
    assert set(_rows(out)) == set(IDS[:2])


def test_mc_zero_is_deterministic_masks_without_uncertainty(ckpt, folder, tmp_path):
    out = tmp_path / "out"
    result = predict_folder(ckpt, folder, out, mc=0, device="cpu")
    assert result["images"] == 4 and [s["file"] for s in result["skipped"]] == [str(folder / "bad.png")]
    assert len(list((out / "masks").glob("*.png"))) == 4
    assert not (out / "uncertainty").exists()
    rows = _rows(out)
    assert all(r["variance"] == r["entropy"] == r["bald"] == "" for r in rows.values())
    assert rows["small"]["status"] == "ok" and rows["bad"]["status"].startswith("skipped:")


def test_only_bad_files_exit_2_with_one_error_line(ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png at all")
    (bad / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    proc = run_cli("predict", ckpt, "--images", bad, "--out", out, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alseg: error:")]
    assert len(errors) == 1 and str(bad) in errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_same_seed_gives_identical_outputs(ckpt, folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    predict_folder(ckpt, folder, a, mc=3, device="cpu")
    predict_folder(ckpt, folder, b, mc=3, device="cpu")
    assert (a / "scores.csv").read_bytes() == (b / "scores.csv").read_bytes()
    for sid in (*IDS, "small"):
        assert (a / "uncertainty" / f"{sid}.png").read_bytes() == (b / "uncertainty" / f"{sid}.png").read_bytes()


def test_refuses_mc_one_non_empty_out_and_empty_folder(ckpt, folder, tmp_path):
    with pytest.raises(AlsegError, match="at least 2"):
        predict_folder(ckpt, folder, tmp_path / "o", mc=1)
    used = tmp_path / "used"
    used.mkdir()
    (used / "scores.csv").write_text("id\n")
    with pytest.raises(AlsegError, match="not empty"):
        predict_folder(ckpt, folder, used, mc=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AlsegError, match="no images found"):
        predict_folder(ckpt, tmp_path / "empty", tmp_path / "o", mc=0)


def test_maps_return_to_original_size_and_fixed_colour_scale():
    prob = np.zeros((32, 32), np.float32)
    prob[:, :16] = 1.0  # left half foreground at working size
    mask = _to_original(prob, 50, 30) > 0.5
    assert mask.shape == (30, 50) and mask[:, :23].all() and not mask[:, 27:].any()
    rgb = uncertainty_rgb(np.array([[0.0, 0.25, 1.0]], np.float32))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[0, 1], rgb[0, 2])  # clipped at the fixed maximum 0.25
    assert not np.array_equal(rgb[0, 0], rgb[0, 1])
    grey = np.random.default_rng(0).integers(0, 256, (30, 50, 1), np.uint8)
    assert fit_image(grey, 32, 3).shape == (32, 32, 3) and fit_image(grey, 30, 1).shape == (30, 30, 1)
