"""The decoded-pixel cache: exact pixels, reuse, rebuild on change, grey images."""
import os

import numpy as np
from PIL import Image

from alseg.data import load_cached, open_dataset
from alseg.data.imageio import read_image, read_mask
from conftest import ISIC, LGG


def test_lgg_pairs_decode_exactly_at_native_size(cache_dir):
    ds = open_dataset(LGG)
    data = load_cached(ds, 256)
    assert data.images.shape == (1073, 256, 256, 3) and data.channels == 3
    assert int(data.positive.sum()) == 360
    for i in (0, 500, 1072):
        s = ds.samples[i]
        assert np.array_equal(data.images[i], read_image(s.image))
        assert np.array_equal(data.masks[i] > 0, read_mask(s.mask))
    assert data.groups[0] == ds.samples[0].group


def test_isic_resized_pairs_match_pillow_and_stay_binary():
    ds = open_dataset(ISIC)
    data = load_cached(ds, 64)
    assert data.images.shape == (2600, 64, 64, 3) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) <= {0, 1}
    assert int(data.has_mask.sum()) == 2000 and not data.masks[~data.has_mask].any()
    s = ds.samples[3]
    with Image.open(s.image) as im:
        expected = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))
    assert np.abs(data.images[3].astype(int) - expected.astype(int)).max() <= 1
    with Image.open(s.mask) as m:
        expected_mask = np.asarray(m.resize((64, 64), Image.NEAREST)) > 127
    assert np.array_equal(data.masks[3] > 0, expected_mask)


def _write_folder(root, n=4, size=(30, 20), grey=False):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(root / "images" / f"im{i}.png")
        m = np.zeros((size[1], size[0]), np.uint8)
        m[2:8, 3:9] = 255
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")


def test_cache_reused_then_rebuilt_when_an_input_changes(tmp_path):
    _write_folder(tmp_path / "ds")
    cache = tmp_path / "cache"
    first = load_cached(open_dataset(tmp_path / "ds"), 16, cache_dir=cache)
    stamp = (first.path / "images.npy").stat().st_mtime_ns
    again = load_cached(open_dataset(tmp_path / "ds"), 16, cache_dir=cache)
    assert again.path == first.path and (again.path / "images.npy").stat().st_mtime_ns == stamp
    img = tmp_path / "ds" / "images" / "im0.png"
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(img)
    os.utime(img, ns=(stamp + 10**9, stamp + 10**9))
    changed = load_cached(open_dataset(tmp_path / "ds"), 16, cache_dir=cache)
    assert changed.path != first.path
    assert (changed.images[0] == 7).all()
    other_size = load_cached(open_dataset(tmp_path / "ds"), 8, cache_dir=cache)
    assert other_size.images.shape == (4, 8, 8, 3)


def test_grey_images_are_one_channel_and_can_be_widened(tmp_path):
    _write_folder(tmp_path / "g", grey=True)
    grey = load_cached(open_dataset(tmp_path / "g"), 16, cache_dir=tmp_path / "c")
    assert grey.channels == 1 and grey.images.shape == (4, 16, 16, 1)
    rgb = load_cached(open_dataset(tmp_path / "g"), 16, channels=3, cache_dir=tmp_path / "c")
    assert rgb.images.shape == (4, 16, 16, 3)
    assert np.array_equal(rgb.images[..., 0], rgb.images[..., 2])
