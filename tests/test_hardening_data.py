"""Hardening of the data path: channels from every image, damaged caches, groups.csv, silent drops,
the pixel limit for every format, predict on layouts and without half-written output, per-image CSV."""
from __future__ import annotations

import csv
import errno
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from alseg import predict_folder
from alseg.data import detect_format, load_cached, open_dataset
from alseg.data import cache as cache_mod
from alseg.data.cache import infer_channels
from alseg.data.imageio import read_header, read_image
from alseg.errors import AlsegError
from alseg.evaluate import write_per_image_csv
from conftest import LGG

PATIENT = "TCGA_CS_4942_19970222"  # 20 slices, each beside its _mask.tif


def _rgb(seed, h=20, w=24):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _grey(seed, h=20, w=24):
    return np.random.default_rng(seed).integers(0, 256, (h, w), np.uint8)


def _mask(h=20, w=24):
    m = np.zeros((h, w), np.uint8)
    m[4:10, 5:12] = 255
    return m


def _folder(root, images: dict, masks: bool = True):
    """A folder layout: ``images`` maps file name -> array; masks of the same stem when asked."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, arr in images.items():
        Image.fromarray(arr).save(root / "images" / name)
        if masks:
            Image.fromarray(_mask(*arr.shape[:2])).save(root / "masks" / f"{name.rsplit('.', 1)[0]}.png")
    return root


# ----------------------------------------------------------------------------- 1. channels


def test_one_grey_image_sorted_first_does_not_make_a_colour_dataset_grey(tmp_path):
    root = _folder(tmp_path / "ds", {"a_grey.png": _grey(0), "b.png": _rgb(1), "c.png": _rgb(2)})
    ds = open_dataset(root)
    assert ds.samples[0].id == "a_grey"
    assert infer_channels(ds) == 3
    data = load_cached(ds, 16, cache_dir=tmp_path / "cache")
    assert data.channels == 3 and data.images.shape == (3, 16, 16, 3)
    grey = data.images[0]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])


def test_all_grey_dataset_stays_one_channel_and_headers_agree_with_decoding(tmp_path):
    root = _folder(tmp_path / "ds", {"a.png": _grey(0), "b.png": _grey(1)})
    assert infer_channels(open_dataset(root)) == 1
    tifffile.imwrite(tmp_path / "planar.tif", np.zeros((3, 20, 24), np.uint8), photometric="rgb",
                     planarconfig="separate")
    tifffile.imwrite(tmp_path / "grey.tif", _grey(3))
    Image.fromarray(np.zeros((20, 24, 4), np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(_grey(4)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(_grey(5)).save(tmp_path / "grey.jpg")
    for name in ("planar.tif", "grey.tif", "rgba.png", "palette.png", "grey.jpg"):
        h, w, c = read_image(tmp_path / name).shape
        assert read_header(tmp_path / name) == (w, h, c), name


# ----------------------------------------------------------------------------- 2. damaged caches


def _cached(tmp_path):
    root = _folder(tmp_path / "ds", {f"im{i}.png": _rgb(i) for i in range(3)})
    cache = tmp_path / "cache"
    return root, cache, load_cached(open_dataset(root), 16, cache_dir=cache)


@pytest.mark.parametrize("damage", ["truncate-images", "truncate-masks", "garbage-meta", "meta-missing",
                                    "meta-other-fingerprint", "overwritten-same-size"])
def test_damaged_cache_is_rebuilt_and_noted(tmp_path, damage):
    root, cache, first = _cached(tmp_path)
    expected = np.array(first.images)
    folder = first.path
    del first
    if damage == "truncate-images":
        with open(folder / "images.npy", "r+b") as fh:
            fh.truncate(os.path.getsize(folder / "images.npy") // 2)
    elif damage == "truncate-masks":
        with open(folder / "masks.npy", "r+b") as fh:
            fh.truncate(40)  # inside the .npy header
    elif damage == "garbage-meta":
        (folder / "meta.json").write_bytes(b"\x00{garbage")
    elif damage == "meta-missing":
        (folder / "meta.json").unlink()
    elif damage == "overwritten-same-size":  # a few pixels changed in place: shapes and byte sizes still agree
        with open(folder / "images.npy", "r+b") as fh:
            fh.seek(-7, os.SEEK_END)
            fh.write(bytes(255 - b for b in np.asarray(expected).reshape(-1)[-7:]))
    else:
        text = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(text.replace('"fingerprint": "', '"fingerprint": "0'))
    notes: list[str] = []
    again = load_cached(open_dataset(root), 16, cache_dir=cache, note=notes.append)
    assert again.path == folder
    assert np.array_equal(np.asarray(again.images), expected)
    assert len(notes) == 1 and "damaged" in notes[0] and str(folder) in notes[0]
    notes.clear()
    load_cached(open_dataset(root), 16, cache_dir=cache, note=notes.append)  # now healthy: reused quietly
    assert notes == []
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]


def test_stale_partial_builds_are_removed_on_the_next_build(tmp_path):
    root = _folder(tmp_path / "ds", {"a.png": _rgb(0)})
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    host = cache_mod._host()
    dead = cache / f".building-{proc.pid}@{host}-abc"
    alive = cache / f".building-{os.getppid()}@{host}-def"  # our parent runs: its build may be in progress
    elsewhere = cache / f".building-{proc.pid}@another.host-ghi"  # cannot tell from here: left alone
    legacy_old, legacy_new = cache / ".building-old1", cache / ".building-new1"
    set_aside = cache / ".damaged-0123"  # a damaged cache whose removal was cut short
    for d in (dead, alive, elsewhere, legacy_old, legacy_new, set_aside):
        d.mkdir()
        (d / "images.npy").write_bytes(b"x" * 100)
    old = time.time() - 2 * cache_mod.LEGACY_BUILD_AGE_S
    os.utime(legacy_old, (old, old))
    notes: list[str] = []
    load_cached(open_dataset(root), 16, cache_dir=cache, note=notes.append)
    assert not dead.exists() and not legacy_old.exists() and not set_aside.exists()
    assert alive.exists() and elsewhere.exists() and legacy_new.exists()
    assert len(notes) == 2 and all("interrupted" in n for n in notes)
    assert not [p for p in cache.iterdir() if p.name.startswith(".building-") and str(os.getpid()) in p.name]


# ----------------------------------------------------------------------------- 3. groups.csv


def _grouped(tmp_path, content: bytes):
    root = _folder(tmp_path / "ds", {"a.png": _rgb(0), "b.png": _rgb(1)}, masks=False)
    (root / "groups.csv").write_bytes(content)
    return root


@pytest.mark.parametrize("content, words", [
    pytest.param("image,group\na.png,Zürich\nb.png,Genève\n".encode("latin-1"), ("not utf-8",), id="latin-1"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", ("not utf-8",), id="binary"),
    pytest.param(b"image,group\na.png,p1\n", ("no row", "b.png"), id="missing-row"),
    pytest.param(b"image,group\na.png,p1\nb.png,p2\na.png,p3\n", ("twice", "a.png"), id="duplicate"),
    pytest.param(b"image,group\na.png,p1\nb.png,  \n", ("empty group", "b.png"), id="empty-group"),
])
def test_bad_groups_csv_is_one_error_naming_it(tmp_path, content, words):
    root = _grouped(tmp_path, content)
    with pytest.raises(AlsegError) as err:
        open_dataset(root)
    assert err.value.path == str(root / "groups.csv")
    assert "\n" not in str(err.value)
    for w in words:
        assert w.lower() in err.value.problem.lower()


def test_groups_csv_with_utf8_bom_is_accepted(tmp_path):
    root = _grouped(tmp_path, "image,group\r\na.png,Zürich\r\nb.png,p2\r\n".encode("utf-8-sig"))
    assert [(s.id, s.group) for s in open_dataset(root).samples] == [("a", "Zürich"), ("b", "p2")]


# ----------------------------------------------------------------------------- 4. silent drops


@pytest.mark.parametrize("where", ["masks", "images"])
def test_dangling_symlink_is_an_error_not_a_missing_file(tmp_path, where):
    root = _folder(tmp_path / "ds", {"a.png": _rgb(0), "b.png": _rgb(1)})
    link = root / where / "b.png"
    link.unlink()
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(AlsegError, match="broken symbolic link") as err:
        open_dataset(root)
    assert err.value.path == str(link)


def test_dangling_symlink_to_an_lgg_mask_is_named(tmp_path):
    pdir = tmp_path / "kaggle_3m" / "P_1"
    pdir.mkdir(parents=True)
    tifffile.imwrite(pdir / "P_1_1.tif", _rgb(0))
    (pdir / "P_1_1_mask.tif").symlink_to(tmp_path / "gone.tif")
    with pytest.raises(AlsegError, match="broken symbolic link") as err:
        open_dataset(tmp_path)
    assert err.value.path == str(pdir / "P_1_1_mask.tif")


@pytest.mark.parametrize("twin", ["ISIC_0000001.JPG", "ISIC_0000001.jpeg"])
def test_isic_image_in_two_spellings_is_an_error_naming_both(tmp_path, twin):
    data = tmp_path / "ISIC-2017_Training_Data"
    data.mkdir()
    Image.fromarray(_rgb(0)).save(data / "ISIC_0000001.jpg", format="JPEG")
    Image.fromarray(_rgb(1)).save(data / twin, format="JPEG")
    with pytest.raises(AlsegError) as err:
        open_dataset(tmp_path)
    line = str(err.value)
    assert "ISIC_0000001.jpg" in line and twin in line and "two" in line


# ----------------------------------------------------------------------------- 5. pixel limit


def test_tiff_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.zeros((300, 200), np.uint8), compression="zlib")
    assert path.stat().st_size < 2000  # tiny file, 60 000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    decoded = []
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: decoded.append(1))
    for fn in (read_image, read_header):
        with pytest.raises(AlsegError, match=r"200 x 300 pixels, over the limit of 50000 \(decompression-bomb guard\)"):
            fn(path)
    assert decoded == []


@pytest.mark.parametrize("limit", [40_000, 20_000], ids=["between-1x-and-2x", "over-2x"])
def test_pillow_images_over_the_limit_are_refused_without_a_warning(tmp_path, monkeypatch, limit):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((240, 250), np.uint8)).save(path)  # 60 000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked DecompressionBombWarning would fail here
        for fn in (read_image, read_header):
            with pytest.raises(AlsegError, match=f"250 x 240 pixels, over the limit of {limit}"):
                fn(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # at the limit: fine
    assert read_image(path).shape == (240, 250, 1)


# ----------------------------------------------------------------------------- 6, 7. predict


def test_predict_on_an_lgg_patient_folder_predicts_slices_not_masks(ckpt, tmp_path):
    patient = LGG / PATIENT
    slices = sorted(p for p in patient.glob("*.tif") if not p.stem.endswith("_mask"))
    assert len(slices) == 20 and len(list(patient.glob("*_mask.tif"))) == 20
    assert detect_format(patient) == "lgg"
    assert {s.group for s in open_dataset(patient).samples} == {PATIENT}
    out = tmp_path / "out"
    result = predict_folder(ckpt, patient, out, mc=0, device="cpu")
    assert result["images"] == 20 and result["skipped"] == []
    written = sorted(p.stem for p in (out / "masks").iterdir())
    assert written == sorted(p.stem for p in slices)
    assert not any("_mask" in name for name in written)
    with (out / "scores.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 20


def _two_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(i, 40, 48)).save(folder / f"im{i}.png")
    return folder


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_midway_leaves_nothing_and_says_so(ckpt, tmp_path, monkeypatch, errno_):
    import alseg.predict as predict_mod

    folder = _two_images(tmp_path)
    real, calls = predict_mod.atomic_write_bytes, []

    def filling_up(path, data):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno_, os.strerror(errno_), str(path))
        real(path, data)

    monkeypatch.setattr(predict_mod, "atomic_write_bytes", filling_up)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(AlsegError) as err:
        predict_folder(ckpt, folder, out, mc=2, device="cpu")
    assert err.value.path == str(out) and "\n" not in str(err.value)
    assert "disk full" in err.value.problem and "nothing was written" in err.value.problem
    assert len(calls) >= 2
    assert not (tmp_path / "new").exists()  # neither OUT, its staging folder nor the parents made for it


def test_predict_publishes_into_an_existing_empty_folder_and_leaves_no_staging(ckpt, tmp_path):
    folder = _two_images(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert predict_folder(ckpt, folder, out, mc=0, device="cpu")["images"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["masks", "scores.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out"]


# ----------------------------------------------------------------------------- 8. per-image CSV


def test_per_image_csv_quotes_ids_and_is_written_atomically(tmp_path):
    ids = ["plain", "with,comma", 'with "quote"', "new\nline"]
    path = tmp_path / "sub" / "per_image.csv"
    write_per_image_csv(path, ids, np.array([1.0, 0.5, 0.25, 1 / 3]))
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows == [["id", "dice"], ["plain", "1.000000"], ["with,comma", "0.500000"],
                    ['with "quote"', "0.250000"], ["new\nline", "0.333333"]]
    assert [p.name for p in path.parent.iterdir()] == ["per_image.csv"]


# ----------------------------------------------------------------------------- EXIF orientation, file names

def _exif_photo(path, arr: np.ndarray, orientation: int) -> None:
    """Save ``arr`` as a JPEG whose pixels are stored as a camera would for ``orientation``."""
    from PIL import ImageOps

    stored = Image.fromarray(arr)
    # the inverse of what a viewer applies: the viewer's exif_transpose must give ``arr`` back
    inverse = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    stored = stored.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=100, subsampling=0, exif=exif)
    with Image.open(path) as check:  # what every viewer shows
        shown = np.asarray(ImageOps.exif_transpose(check))
    assert shown.shape == arr.shape


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_photo_is_read_as_viewers_show_it_and_fits_its_mask(tmp_path, orientation):
    h, w = 48, 80  # non-square: a sideways decode cannot pass the size check
    photo = np.zeros((h, w, 3), np.uint8)
    photo[10:30, 5:40] = 220  # a bright lesion where the mask says, as a viewer shows the photo
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    _exif_photo(root / "images" / "p.jpg", photo, orientation)
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 5:40] = 255
    Image.fromarray(mask).save(root / "masks" / "p.png")
    assert read_header(root / "images" / "p.jpg")[:2] == (w, h)
    decoded = read_image(root / "images" / "p.jpg")
    assert decoded.shape == (h, w, 3)
    assert decoded[10:30, 5:40].mean() > 200 and decoded[35:, 50:].mean() < 20
    cached = load_cached(open_dataset(root), 32, cache_dir=tmp_path / "cache")
    assert cached.orig_sizes == [(w, h)]
    img, m = np.asarray(cached.images[0]).mean(axis=2), np.asarray(cached.masks[0]) > 0
    assert img[m].mean() > 150 and img[~m].mean() < 60, "the mask does not sit on the lesion"


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path):
    root = _folder(tmp_path / "ds", {"a.png": _rgb(1)})
    bad = os.fsdecode(b"b\xff\xfe.png")
    Image.fromarray(_rgb(2)).save(root / "images" / bad)
    Image.fromarray(_mask()).save(root / "masks" / bad)
    with pytest.raises(AlsegError, match="not valid UTF-8") as info:
        open_dataset(root)
    str(info.value).encode("utf-8")  # the line prints on any terminal


def test_a_damaged_lgg_tiff_is_one_line_naming_it(tmp_path):
    import shutil

    src = LGG / PATIENT
    patient = tmp_path / "kaggle_3m" / PATIENT
    patient.mkdir(parents=True)
    for f in sorted(src.glob("*_mask.tif"))[:3]:  # three slices, each with its mask
        shutil.copy(f, patient / f.name)
        shutil.copy(src / f.name.replace("_mask", ""), patient / f.name.replace("_mask", ""))
    victim = next(p for p in sorted(patient.iterdir()) if not p.stem.endswith("_mask"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # a copy cut short
    dataset = open_dataset(tmp_path / "kaggle_3m")
    with pytest.raises(AlsegError) as info:
        load_cached(dataset, 32, cache_dir=tmp_path / "cache")
    assert info.value.path == str(victim) and "unreadable image" in info.value.problem
    assert not any((tmp_path / "cache").rglob("*.npy")), "a half-built cache was left behind"
