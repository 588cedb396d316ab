"""Export of a project's masks to PNG, COCO, CVAT and Label Studio, and reading them back.

Two projects: the review fixture's (tests/annotate_fixtures.py: 12 initial masks, an open batch
with known predicted masks) with three of its batch images labelled by the expert, one of them
non-square; and a small one whose images' names are unsafe in file names (spaces, '#', non-ASCII,
two that clean to the same name), its masks all initial, one non-square.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alseg.annotate import coco, cvat, exchange, labelstudio
from alseg.annotate.exchange import FORMATS, export_project, masks_from_exchange
from alseg.data.imageio import read_mask
from alseg.data.sources import open_dataset
from alseg.errors import AlsegError
from alseg.store import RunStore
from annotate_fixtures import build_project, copy_project, png, predicted

EXPERT_LABELLED = 3  # batch items the expert labels in the fixture project (the first is non-square)
UNSAFE_NAMES = ["case #1 (a)", "läsion ü", "a b", "a_b", "A.B", "plain"]  # "a b" and "a_b" clean alike
ANSWER_FILE = {"coco": "annotations.json", "cvat": "annotations.zip", "labelstudio": "tasks.json"}


# --- projects -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def labelled_project(tmp_path_factory):
    """(project, {id: expected mask}, {queued id: its predicted mask}, batch): 12 initial masks and 3
    the expert drew."""
    from alseg.project import Project

    template, truth = build_project(tmp_path_factory)
    project = copy_project(template, tmp_path_factory.mktemp("exchange") / "project")
    with Project(project, command="test") as p:
        batch = p.batch()
        items = sorted(batch.items, key=lambda it: (it.width, it.height) == (64, 64))  # a non-square one first
        assert (items[0].width, items[0].height) != (64, 64)
        labelled = items[:EXPERT_LABELLED]
        for it in labelled:
            assert p.submit(it.id, png(truth[it.id]))["outcome"] == "stored"
        predictions = {it.id: predicted(batch, it) for it in batch.items if it not in labelled}
    expected = {it.id: truth[it.id] for it in labelled}
    with RunStore.open_readonly(project) as store:
        samples = {s.id: s for s in open_dataset(store.data_info()["path"], "folder").samples}
        for id in store.sample_ids(state="labelled"):
            if store.origins([id])[id] == "initial":
                expected[id] = read_mask(samples[id].mask)
    assert len(expected) == 12 + EXPERT_LABELLED
    return project, expected, predictions, batch


@pytest.fixture(scope="session")
def unsafe_project(tmp_path_factory):
    """(project, {id: mask}) over images whose names need cleaning; every mask initial."""
    from alseg.data.synthetic import make_synthetic
    from alseg.project import init_project

    root = tmp_path_factory.mktemp("unsafe")
    src = make_synthetic(root / "synthetic", n=10, size=64)
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    expected = {}
    for k, path in enumerate(sorted((src / "images").iterdir())):
        name = UNSAFE_NAMES[k] if k < len(UNSAFE_NAMES) else path.stem
        image, mask = Image.open(path), Image.open(src / "masks" / path.name)
        if k == 0:
            image, mask = image.resize((80, 56), Image.BILINEAR), mask.resize((80, 56), Image.NEAREST)
        if k < 8:  # the last two are the pool
            mask.save(masks / f"{name}.png")
            expected[name] = np.asarray(mask.convert("L")) >= 128
        image.save(images / f"{name}.png")
    project = root / "project"
    init_project(project, images, masks, preset="demo", pretrain=False,
                 overrides={"data": {"size": 32}, "model": {"width": 4}})
    return project, expected


@pytest.fixture(scope="session")
def exports(labelled_project, unsafe_project, tmp_path_factory):
    """Every format of both projects, exported once: {(project key, fmt): (out, result)}."""
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for key, project in (("labelled", labelled_project[0]), ("unsafe", unsafe_project[0])):
        for fmt in FORMATS:
            out = root / f"{key}-{fmt}"
            done[key, fmt] = (out, export_project(project, fmt, out))
    return done


def _names(out: Path) -> dict[str, str]:
    """{id: name} from a png export's manifest."""
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        return {r["id"]: Path(r["mask"]).stem for r in csv.DictReader(fh)}


def _answer(out: Path, fmt: str) -> Path:
    return out / ANSWER_FILE[fmt] if fmt in ANSWER_FILE else out


# --- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["labelled", "unsafe"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_gives_every_expert_mask_back(exports, labelled_project, unsafe_project, key, fmt):
    expected = (labelled_project if key == "labelled" else unsafe_project)[1]
    out, result = exports[key, fmt]
    names = _names(exports[key, "png"][0])  # every format names an id alike
    assert result["masks"] == len(expected) and sorted(names) == sorted(expected)
    back = masks_from_exchange(_answer(out, fmt))
    assert sorted(back) == sorted(names.values())
    for id, mask in expected.items():
        got = back[names[id]]
        assert got.dtype == bool and got.shape == mask.shape, id
        assert np.array_equal(got, mask), id
    assert masks_from_exchange(out).keys() == back.keys()  # the export folder reads as its file


def test_names_are_safe_unique_and_those_of_the_batch(exports, labelled_project):
    names = _names(exports["unsafe", "png"][0])
    assert all(n and all(c.isascii() and (c.isalnum() or c in "._-") for c in n) for n in names.values())
    assert len({n.lower() for n in names.values()}) == len(names)
    assert {names["a b"], names["a_b"]} == {"a_b", "a_b-2"}  # two ids, two names
    out = exports["unsafe", "png"][0]
    for id, name in names.items():  # the image goes with its mask, one name each, at its size
        image = Image.open(out / "images" / f"{name}.png")
        assert image.size == Image.open(out / "masks" / f"{name}.png").size
    _, _, _, batch = labelled_project
    batch_names = {it.id: Path(it.image).stem for it in batch.items}
    labelled_names = _names(exports["labelled", "png"][0])
    assert all(labelled_names[i] == batch_names[i] for i in labelled_names if i in batch_names)
    assert sum(i in batch_names for i in labelled_names) == EXPERT_LABELLED


def test_png_export_layout(exports, labelled_project):
    out, result = exports["labelled", "png"]
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(exchange.MANIFEST_COLUMNS)
    experts = [r for r in rows if r["origin"] == "expert"]
    assert len(experts) == EXPERT_LABELLED
    assert all(r["round"] == str(labelled_project[3].round) and r["annotator"] for r in experts)
    assert all(r["origin"] == "initial" and r["round"] == "" for r in rows if r not in experts)
    for r in rows:
        values = np.unique(np.asarray(Image.open(out / r["mask"])))
        assert set(values.tolist()) <= {0, 255}
    assert result["predictions"] == 0 and result["notes"]  # says that the batch's predictions stay out


# --- COCO ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2
def test_coco_is_rle_per_component_and_decodes_with_pycocotools(exports, labelled_project):
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    out, _ = exports["labelled", "coco"]
    doc = json.loads((out / "annotations.json").read_text())
    assert doc["categories"] == [{"id": 1, "name": "lesion", "supercategory": "lesion"}]
    expected = labelled_project[1]
    by_image = {im["id"]: im for im in doc["images"]}
    assert len(by_image) == len(expected)
    union = {im_id: np.zeros((im["height"], im["width"]), bool) for im_id, im in by_image.items()}
    counts = {im_id: 0 for im_id in by_image}
    for ann in doc["annotations"]:
        seg = ann["segmentation"]
        assert isinstance(seg["counts"], str) and ann["iscrowd"] == 0 and ann["category_id"] == 1
        part = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        ys, xs = np.nonzero(part)
        assert ann["area"] == part.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert not (union[ann["image_id"]] & part).any()  # components do not overlap
        union[ann["image_id"]] |= part
        counts[ann["image_id"]] += 1
    for im_id, im in by_image.items():
        mask = expected[im["alseg_id"]]
        assert np.array_equal(union[im_id], mask)
        assert counts[im_id] == ndimage.label(mask, structure=np.ones((3, 3)))[1]
        assert (out / "images" / im["file_name"]).is_file()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under NumPy 2
def test_coco_predictions_carry_the_batch_masks_with_scores(exports, labelled_project):
    from pycocotools import mask as mask_utils

    out, result = exports["labelled", "coco"]
    predictions = labelled_project[2]
    doc = json.loads((out / "predictions.json").read_text())
    assert result["predictions"] == len(predictions) == len(doc["images"])
    for im in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        assert all(isinstance(a["score"], float) and "alseg_variance" in a for a in anns)
        mask = np.zeros((im["height"], im["width"]), bool)
        for a in anns:
            mask |= mask_utils.decode({"size": a["segmentation"]["size"],
                                       "counts": a["segmentation"]["counts"].encode()}).astype(bool)
        assert np.array_equal(mask, predictions[im["alseg_id"]])


# --- CVAT ---------------------------------------------------------------------------------------
def test_cvat_zip_has_the_layout_and_colours_cvat_imports(exports, labelled_project):
    out, result = exports["labelled", "cvat"]
    names = _names(exports["labelled", "png"][0])
    expected = labelled_project[1]
    with zipfile.ZipFile(out / "annotations.zip") as zf:
        files = set(zf.namelist())
        assert files == ({"labelmap.txt", "ImageSets/Segmentation/default.txt"}
                         | {f"SegmentationClass/{n}.png" for n in names.values()}
                         | {f"SegmentationObject/{n}.png" for n in names.values()})
        labelmap = zf.read("labelmap.txt").decode()
        assert labelmap.splitlines()[1:] == ["background:0,0,0::", "lesion:128,0,0::"]
        assert sorted(zf.read("ImageSets/Segmentation/default.txt").decode().split()) == sorted(names.values())
        for id, name in names.items():
            cls = np.asarray(Image.open(io.BytesIO(zf.read(f"SegmentationClass/{name}.png"))))
            obj = np.asarray(Image.open(io.BytesIO(zf.read(f"SegmentationObject/{name}.png"))))
            assert cls.shape == (*expected[id].shape, 3)
            assert np.array_equal(np.all(cls == (128, 0, 0), axis=2), expected[id])
            assert np.array_equal(np.all(cls == 0, axis=2), ~expected[id])
            assert np.array_equal(obj.any(axis=2), expected[id])
    # images to make the task from: the labelled ones and the open batch's still to label
    stems = {p.stem for p in (out / "images").iterdir()}
    batch = labelled_project[3]
    assert stems == set(names.values()) | {Path(it.image).stem for it in batch.items}
    assert result["to_label"] == len(batch.items) - EXPERT_LABELLED and result["notes"]


def test_voc_colours_are_pascal_vocs():
    assert [cvat.voc_colour(k) for k in range(5)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]


def test_cvat_objects_are_components():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 1:3] = mask[6:9, 7:11] = True
    obj = np.asarray(Image.open(io.BytesIO(cvat.object_png(mask))))
    colours = {tuple(c) for c in obj[mask]}
    assert colours == {(128, 0, 0), (0, 128, 0)}


# --- Label Studio -------------------------------------------------------------------------------
def test_label_studio_rle_matches_its_converters_documented_example():
    # label-studio-converter's tests/test_brush.py: encode_rle of this array gives these bytes
    values = [1, 1, 1, 1, 2, 3, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4, 4, 4]
    packed = [0, 0, 0, 18, 57, 27, 252, 96, 32, 1, 0, 6, 0, 40, 0, 192, 3, 128, 17, 56, 32]
    assert labelstudio.encode_rle(values) == packed
    assert labelstudio.decode_rle(packed).tolist() == values


def test_label_studio_rle_round_trips_long_runs_and_literals():
    rng = np.random.default_rng(1)
    noisy = rng.random((37, 53)) > 0.5  # many short runs
    wide = np.zeros((400, 300), bool)
    wide[5:390] = True  # a run over 65,536 values, split across chunks
    for mask in (noisy, wide, np.zeros((3, 4), bool)):
        h, w = mask.shape
        assert np.array_equal(labelstudio.rle_to_mask(labelstudio.mask_to_rle(mask), w, h), mask)
    literals = rng.integers(0, 256, 500)  # single values: literal chunks
    assert labelstudio.decode_rle(labelstudio.encode_rle(literals)).tolist() == literals.tolist()


def test_label_studio_tasks_hold_masks_and_predictions(exports, labelled_project):
    out, result = exports["labelled", "labelstudio"]
    _, expected, predictions, batch = labelled_project
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == len(expected) + len(predictions) == result["images"]
    assert result["predictions"] == len(predictions) and result["to_label"] == len(predictions)
    assert "<BrushLabels" in (out / "labeling_config.xml").read_text()
    for t in tasks:
        url = t["data"]["image"]
        assert url.startswith(f"/data/local-files/?d={out.name}/images/")
        assert (out / "images" / url.rsplit("/", 1)[1]).is_file()
        id = t["data"]["alseg_id"]
        if id in expected:
            (region,) = t["annotations"][0]["result"]
            want = expected[id]
            assert "predictions" not in t
        else:
            (region,) = t["predictions"][0]["result"]
            want = predictions[id]
            assert "annotations" not in t and t["predictions"][0]["model_version"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["lesion"]
        assert (region["original_width"], region["original_height"]) == want.shape[::-1]
        got = labelstudio.rle_to_mask(region["value"]["rle"], *want.shape[::-1])
        assert np.array_equal(got, want)
    assert masks_from_exchange(out / "tasks.json").keys() == {labelstudio.image_name(t["data"]["image"])
                                                               for t in tasks if t["data"]["alseg_id"] in expected}


def _task(url, results, **annotation):
    return {"data": {"image": url}, "annotations": [{"result": results, **annotation}]}


def test_label_studio_import_reads_polygons_picks_the_annotation_and_names_uploads(tmp_path):
    square = {"type": "polygonlabels", "original_width": 20, "original_height": 10,
              "value": {"points": [[25, 20], [75, 20], [75, 80], [25, 80]], "polygonlabels": ["lesion"]}}
    brush = np.zeros((10, 20), bool)
    brush[0, :3] = True
    brush_region = labelstudio.brush_region("x", brush)
    tasks = [
        _task("/data/upload/3/1a2b3c4d-scan_7.png", [square]),
        {"data": {"image": "/data/local-files/?d=exp/images/other%201.png"},
         "annotations": [{"result": [square], "updated_at": "2024-01-02T00:00:00"},
                         {"result": [brush_region], "updated_at": "2024-03-01T00:00:00"},
                         {"result": [square], "updated_at": "2024-05-01T00:00:00", "was_cancelled": True}]},
        {"data": {"image": "https://host/x/never.png"}, "annotations": []},  # not labelled: left out
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    back = masks_from_exchange(path)
    assert sorted(back) == ["other 1", "scan_7"]
    poly = back["scan_7"]
    assert poly.shape == (10, 20) and poly[2:8, 5:15].all() and not poly[:, :4].any() and not poly[9].any()
    assert np.array_equal(back["other 1"], brush)  # the latest annotation not cancelled


# --- export folder rules ------------------------------------------------------------------------
def test_export_refuses_a_foreign_folder_and_replaces_its_own(labelled_project, tmp_path):
    project = labelled_project[0]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(AlsegError, match="not empty"):
        export_project(project, "png", foreign)
    assert (foreign / "thesis.docx").read_text() == "precious"
    out = tmp_path / "out"
    export_project(project, "cvat", out)
    (out / "stale.txt").write_text("from before")
    export_project(project, "cvat", out)  # the same format: replaced whole
    assert not (out / "stale.txt").exists() and (out / "annotations.zip").is_file()
    with pytest.raises(AlsegError, match="cvat export"):
        export_project(project, "coco", out)
    with pytest.raises(AlsegError, match="unknown export format"):
        export_project(project, "yolo", tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no temporaries left


def test_a_crash_leaves_no_half_export(labelled_project, tmp_path, monkeypatch):
    project = labelled_project[0]
    out = tmp_path / "out"
    export_project(project, "cvat", out)
    before = hashlib.sha256((out / "annotations.zip").read_bytes()).hexdigest()

    def crash(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cvat, "write_zip", crash)
    with pytest.raises(KeyboardInterrupt):
        export_project(project, "cvat", out)
    with pytest.raises(KeyboardInterrupt):
        export_project(project, "cvat", tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the earlier export, whole; no temporaries
    assert hashlib.sha256((out / "annotations.zip").read_bytes()).hexdigest() == before


def test_export_reads_only_and_works_beside_the_writer(labelled_project, tmp_path):
    from alseg.project import Project

    project = labelled_project[0]
    db = Path(project) / "run.db"
    before = db.read_bytes()
    with Project(project, command="test"):  # the review server holds the writer lock
        result = export_project(project, "png", tmp_path / "out", predictions=False)
    assert result["masks"] == len(labelled_project[1])
    assert db.read_bytes() == before


# --- hostile input ------------------------------------------------------------------------------
def _zip(path: Path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _one_error(path, match):
    with pytest.raises(AlsegError, match=match) as info:
        masks_from_exchange(path)
    assert info.value.path == str(path)


def test_hostile_files_give_one_error(tmp_path, monkeypatch):
    mask_png = cvat.class_png(np.ones((4, 4), bool))
    _one_error(_zip(tmp_path / "slip.zip", {"SegmentationClass/../../evil.png": mask_png}), "zip slip")
    _one_error(_zip(tmp_path / "abs.zip", {"/etc/SegmentationClass/x.png": mask_png}), "zip slip")
    _one_error(_zip(tmp_path / "win.zip", {"SegmentationClass\\..\\x.png": mask_png}), "zip slip")
    (tmp_path / "fake.zip").write_bytes(b"this is no zip at all")
    _one_error(tmp_path / "fake.zip", "not a zip")
    (tmp_path / "cut.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    _one_error(tmp_path / "cut.zip", "zip")
    _one_error(_zip(tmp_path / "bomb.zip", {"SegmentationClass/x.png": b"\x00" * (3 << 20)}), "zip bomb")
    _one_error(_zip(tmp_path / "empty.zip", {"readme.txt": b"hi"}), "no SegmentationClass")
    _one_error(_zip(tmp_path / "junk.zip", {"SegmentationClass/x.png": b"not a png"}), "not a readable image")
    two = "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:1,2,3::\ndog:4,5,6::\n"
    _one_error(_zip(tmp_path / "labels.zip", {"labelmap.txt": two.encode(), "SegmentationClass/x.png": mask_png}),
               "several|2 labels")
    (tmp_path / "text.json").write_text("not json {")
    _one_error(tmp_path / "text.json", "not JSON")
    (tmp_path / "other.json").write_text(json.dumps({"some": "thing"}))
    _one_error(tmp_path / "other.json", "unknown format")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    _one_error(tmp_path / "deep.json", "not JSON")

    rle = labelstudio.mask_to_rle(np.ones((10, 10), bool))
    region = {"type": "brushlabels", "original_width": 11, "original_height": 10,
              "value": {"format": "rle", "rle": rle, "brushlabels": ["lesion"]}}
    (tmp_path / "ls-length.json").write_text(json.dumps([_task("/data/x/a.png", [region])]))
    _one_error(tmp_path / "ls-length.json", "RLE length mismatch")
    cut = {**region, "original_width": 10, "value": {**region["value"], "rle": rle[:9]}}
    (tmp_path / "ls-cut.json").write_text(json.dumps([_task("/data/x/a.png", [cut])]))
    _one_error(tmp_path / "ls-cut.json", "truncated|ends")
    nosize = {k: v for k, v in region.items() if k != "original_width"}
    (tmp_path / "ls-size.json").write_text(json.dumps([_task("/data/x/a.png", [nosize])]))
    _one_error(tmp_path / "ls-size.json", "no image size")
    (tmp_path / "ls-min.json").write_text(json.dumps([{"image": "/x.png", "tag": [region["value"]]}]))
    _one_error(tmp_path / "ls-min.json", "JSON-MIN")

    ten = {"size": [10, 10], "counts": coco.encode_mask(np.ones((10, 10), bool))["counts"]}
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 12, "height": 10}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": {**ten, "size": [10, 12]}}],
           "categories": [{"id": 1, "name": "lesion"}]}
    (tmp_path / "coco-length.json").write_text(json.dumps(doc))
    _one_error(tmp_path / "coco-length.json", "RLE length mismatch")
    doc["annotations"][0]["segmentation"] = {"size": [10, 12], "counts": [0, 200]}
    (tmp_path / "coco-list.json").write_text(json.dumps(doc))
    _one_error(tmp_path / "coco-list.json", "RLE length mismatch")
    doc["images"][0].pop("width")
    (tmp_path / "coco-size.json").write_text(json.dumps(doc))
    _one_error(tmp_path / "coco-size.json", "no size")

    monkeypatch.setattr(exchange, "MAX_ENTRIES", 2)
    many = {f"SegmentationClass/{k}.png": mask_png for k in range(3)}
    _one_error(_zip(tmp_path / "many.zip", many), "more than")
    (tmp_path / "many.json").write_text(json.dumps([_task(f"/x/{k}.png", []) for k in range(3)]))
    _one_error(tmp_path / "many.json", "more than")


def test_coco_rle_string_counts_are_read_as_pycocotools_writes_them():
    from pycocotools import mask as mask_utils

    mask = np.random.default_rng(2).random((23, 31)) > 0.7
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = coco.rle_counts(rle["counts"].decode(), "x")
    flat = np.concatenate([np.full(c, k % 2, bool) for k, c in enumerate(counts)])
    assert np.array_equal(flat.reshape(31, 23).T, mask)  # column-major runs, starting with background
