"""Data sources and summaries on the real ISIC 2017 and LGG copies, and the folder layout."""
import numpy as np
import pytest
from PIL import Image

from alseg.data import detect_format, open_dataset, summarize
from alseg.errors import AlsegError
from conftest import ISIC, LGG, run_json


def test_lgg_summary_counts_exactly():
    result = run_json("data", "summary", LGG)
    assert result == {"format": "lgg", "samples": 1073, "with_mask": 1073, "positive": 360, "groups": 31,
                      "image_sizes": {"256x256": 1073}}


def test_isic_summary_counts_exactly():
    assert summarize(open_dataset(ISIC)) == {"format": "isic2017", "samples": 2600, "with_mask": 2000,
                                             "positive": 2000, "groups": 0, "image_sizes": {"256x256": 2600}}


def test_lgg_slices_numeric_order_and_patient_groups():
    ds = open_dataset(LGG.parent)  # the folder above kaggle_3m is found too
    assert ds.format == "lgg"
    patient = "TCGA_CS_4942_19970222"
    slices = [s for s in ds.samples if s.group == patient]
    assert [s.id for s in slices] == [f"{patient}_{n}" for n in range(1, 21)]
    assert all(s.mask.name == f"{s.id}_mask.tif" for s in slices)
    assert not any(s.image.suffix in (".md", ".csv") for s in ds.samples)


def test_isic_official_subsets_and_unlabelled_test():
    ds = open_dataset(ISIC)
    subsets = {}
    for s in ds.samples:
        subsets.setdefault(s.subset, []).append(s)
    assert len(subsets["training"]) == 2000 and all(s.mask is not None for s in subsets["training"])
    assert len(subsets["test"]) == 600 and all(s.mask is None for s in subsets["test"])
    s = subsets["training"][0]
    assert s.mask.name == f"{s.id}_segmentation.png"


def test_isic_extras_ignored_and_validation_read(tmp_path):
    """Superpixel PNGs and CSVs of the official download are not samples; Validation is read."""
    for split in ("Training", "Validation"):
        (tmp_path / f"ISIC-2017_{split}_Data").mkdir()
        (tmp_path / f"ISIC-2017_{split}_Part1_GroundTruth").mkdir()
    for split, sid in (("Training", "ISIC_0000001"), ("Validation", "ISIC_0000009")):
        Image.new("RGB", (40, 30)).save(tmp_path / f"ISIC-2017_{split}_Data" / f"{sid}.jpg")
        Image.new("RGB", (40, 30)).save(tmp_path / f"ISIC-2017_{split}_Data" / f"{sid}_superpixels.png")
        Image.new("L", (40, 30)).save(tmp_path / f"ISIC-2017_{split}_Part1_GroundTruth" / f"{sid}_segmentation.png")
    (tmp_path / "ISIC-2017_Training_Data" / "ISIC-2017_Training_Data_metadata.csv").write_text("a,b\n")
    ds = open_dataset(tmp_path)
    assert [(s.id, s.subset) for s in ds.samples] == [("ISIC_0000001", "training"), ("ISIC_0000009", "validation")]
    assert summarize(ds)["image_sizes"] == {"40x30": 2}


def test_folder_layout_pairs_by_stem_and_masks_are_optional(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (20, 24), np.uint8)).save(tmp_path / "images" / f"{name}.png")
    mask = np.zeros((20, 24), np.uint8)
    mask[5:10, 5:10] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "masks" / "b_mask.png")
    (tmp_path / "groups.csv").write_text("image,group\na.png,p1\nb.png,p1\nc.png,p2\n")
    ds = open_dataset(tmp_path)
    assert detect_format(tmp_path) == "folder"
    assert [(s.id, s.mask.name if s.mask else None, s.group) for s in ds.samples] == [
        ("a", "a.png", "p1"), ("b", "b_mask.png", "p1"), ("c", None, "p2")]
    assert summarize(ds) == {"format": "folder", "samples": 3, "with_mask": 2, "positive": 1, "groups": 2,
                             "image_sizes": {"24x20": 3}}


def test_format_override_is_checked(tmp_path):
    with pytest.raises(AlsegError, match="unknown format"):
        open_dataset(ISIC, "png")
    with pytest.raises(AlsegError, match="no images/ folder"):
        open_dataset(ISIC, "folder")
