"""NIfTI volumes as samples: three real LGG patients converted to NIfTI (nnU-Net's per-channel
files, and a flat folder of 4D images stored left-right flipped), read back slice by slice, and
the headers and masks that must be refused, each in one line."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from alseg.data import detect_format, load_cached, open_dataset, sample_header, sample_image, sample_mask, summarize
from alseg.data.imageio import read_image, read_mask
from alseg.data.volumes import clear_cache, parse_axis
from alseg.errors import AlsegError
from conftest import LGG

PATIENTS = ("TCGA_CS_4942_19970222", "TCGA_CS_5395_19981004", "TCGA_HT_7686_19950629")
STEP = 4  # 256 px slices kept every 4th pixel: 64 px, exactly reproducible from the TIFFs
FLAT_AFFINE = np.diag([-0.9, 0.9, 5.0, 1.0])  # stored x runs right to left: canonical RAS+ flips it


def _tiff_stack(patient: str) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, S, 3)`` uint8 image and ``(H, W, S)`` bool mask of one patient, slices in order."""
    folder = LGG / patient
    n = len([p for p in folder.glob("*_mask.tif")])
    images = [read_image(folder / f"{patient}_{k}.tif")[::STEP, ::STEP] for k in range(1, n + 1)]
    masks = [read_mask(folder / f"{patient}_{k}_mask.tif")[::STEP, ::STEP] for k in range(1, n + 1)]
    return np.stack(images, axis=2), np.stack(masks, axis=2)


@pytest.fixture(scope="session")
def lgg_nifti(tmp_path_factory) -> dict:
    """The three patients as nnU-Net (``imagesTr/P_000c.nii.gz`` + ``labelsTr/P.nii.gz``, identity
    affine) and as a flat folder (``P.nii.gz`` 4D + ``P_mask.nii.gz`` 0/255, flipped along x)."""
    root = tmp_path_factory.mktemp("lgg-nifti")
    nnunet, flat = root / "nnunet", root / "flat"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    flat.mkdir()
    truth = {}
    for patient in PATIENTS:
        image, mask = _tiff_stack(patient)
        truth[patient] = (image, mask)
        for c in range(3):
            nib.save(nib.Nifti1Image(image[..., c], np.eye(4)), nnunet / "imagesTr" / f"{patient}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), nnunet / "labelsTr" / f"{patient}.nii.gz")
        nib.save(nib.Nifti1Image(image[::-1], FLAT_AFFINE), flat / f"{patient}.nii.gz")
        nib.save(nib.Nifti1Image(mask[::-1].astype(np.uint8) * 255, FLAT_AFFINE), flat / f"{patient}_mask.nii.gz")
    return {"nnunet": nnunet, "flat": flat, "truth": truth}


def _normalised(volume: np.ndarray) -> np.ndarray:
    """What per-volume 0.5-99.5 percentile normalisation should give, computed here independently."""
    out = np.empty(volume.shape, np.uint8)
    for c in range(volume.shape[-1]):
        lo, hi = np.percentile(volume[..., c].astype(np.float64), [0.5, 99.5])
        out[..., c] = np.clip((volume[..., c] - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize("layout", ["nnunet", "flat"])
def test_every_slice_is_a_sample_grouped_by_patient(lgg_nifti, layout):
    ds = open_dataset(lgg_nifti[layout])
    assert detect_format(lgg_nifti[layout]) == "nifti" and ds.format == "nifti"
    truth = lgg_nifti["truth"]
    expected = [f"{p}/z{k:03d}" for p in sorted(PATIENTS) for k in range(truth[p][1].shape[2])]
    assert ds.ids == expected  # every slice, tumour-free ones included, sortable within a patient
    assert [s.group for s in ds.samples] == [i.split("/")[0] for i in expected]
    assert {s.subset for s in ds.samples} == ({"training"} if layout == "nnunet" else {None})
    assert [v.case for v in ds.volumes] == sorted(PATIENTS)
    for v in ds.volumes:
        assert v.shape == (64, 64, truth[v.case][1].shape[2]) and v.channels == 3 and v.axis == 2
    flat_info = ds.volumes[0]
    if layout == "flat":
        assert flat_info.spacing == pytest.approx((0.9, 0.9, 5.0)) and flat_info.orientation == ("L", "A", "S")
        assert flat_info.affine[0][0] == pytest.approx(0.9)  # canonical: x now runs left to right
    else:
        assert flat_info.spacing == (1.0, 1.0, 1.0) and flat_info.orientation == ("R", "A", "S")
        assert len(ds.samples[0].image_files) == 3 and ds.samples[0].image_files[2].name.endswith("_0002.nii.gz")


@pytest.mark.parametrize("layout", ["nnunet", "flat"])
def test_pixels_are_the_tiffs_normalised_per_volume(lgg_nifti, layout):
    clear_cache()
    ds = open_dataset(lgg_nifti[layout])
    for patient, (image, mask) in lgg_nifti["truth"].items():
        want = _normalised(image)
        for s in (s for s in ds.samples if s.group == patient):
            got = sample_image(s)
            assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
            assert sample_header(s) == (64, 64, 3)
            # up to rounding of float32 against float64 arithmetic
            assert np.abs(got.astype(int) - want[:, :, s.slice].astype(int)).max() <= 1, s.id
            np.testing.assert_array_equal(sample_mask(s), mask[:, :, s.slice])
    # per volume, not per slice: one raw value maps to one output value on every slice of a patient
    image = lgg_nifti["truth"][PATIENTS[0]][0]
    got = np.stack([sample_image(s) for s in ds.samples if s.group == PATIENTS[0]], axis=2)
    raw = image[..., 1]
    values, counts = np.unique(raw[raw > 0], return_counts=True)
    value = values[counts.argmax()]
    assert sum(bool((raw[..., z] == value).any()) for z in range(raw.shape[2])) > 1
    assert len(np.unique(got[..., 1][raw == value])) == 1


def test_both_pairings_and_orientations_give_the_same_samples(lgg_nifti):
    a, b = open_dataset(lgg_nifti["nnunet"]), open_dataset(lgg_nifti["flat"])
    assert a.ids == b.ids
    for sa, sb in zip(a.samples[::7], b.samples[::7]):
        np.testing.assert_array_equal(sample_image(sa), sample_image(sb))
        np.testing.assert_array_equal(sample_mask(sa), sample_mask(sb))


def test_chosen_axis_slices_the_other_way(lgg_nifti):
    by_z = open_dataset(lgg_nifti["flat"])
    by_y = open_dataset(lgg_nifti["flat"], volume_axis="coronal")
    patient = sorted(PATIENTS)[0]
    n = lgg_nifti["truth"][patient][1].shape[2]
    ys = [s for s in by_y.samples if s.group == patient]
    assert [s.id for s in ys] == [f"{patient}/y{k:03d}" for k in range(64)] and all(s.axis == 1 for s in ys)
    assert sample_header(ys[10]) == (n, 64, 3)  # rows x, columns z
    z_planes = np.stack([sample_image(s) for s in by_z.samples if s.group == patient], axis=2)  # (x, y, z, c)
    np.testing.assert_array_equal(sample_image(ys[10]), z_planes[:, 10])
    mask_z = np.stack([sample_mask(s) for s in by_z.samples if s.group == patient], axis=2)
    np.testing.assert_array_equal(sample_mask(ys[40]), mask_z[:, 40])
    assert parse_axis(0) == 0 and parse_axis("z") == 2 and parse_axis("auto") is None


def test_cache_and_summary_read_volumes(lgg_nifti, tmp_path):
    ds = open_dataset(lgg_nifti["nnunet"])
    truth = lgg_nifti["truth"]
    positives = [bool(truth[s.group][1][:, :, s.slice].any()) for s in ds.samples]
    notes = []
    data = load_cached(ds, 32, cache_dir=tmp_path, workers=2, note=notes.append)
    assert data.images.shape == (len(ds.samples), 32, 32, 3) and data.channels == 3
    assert data.ids == ds.ids and data.groups == [s.group for s in ds.samples]
    assert data.positive.tolist() == positives and any(positives) and not all(positives)
    assert data.orig_sizes == [(64, 64)] * len(ds.samples)
    assert load_cached(ds, 32, cache_dir=tmp_path).path == data.path and not notes  # reused, not rebuilt
    axial = open_dataset(lgg_nifti["nnunet"], volume_axis=0)
    assert load_cached(axial, 32, cache_dir=tmp_path).path != data.path  # another axis is another cache
    assert summarize(ds) == {"format": "nifti", "samples": len(ds.samples), "with_mask": len(ds.samples),
                             "positive": sum(positives), "groups": 3, "image_sizes": {"64x64": len(ds.samples)},
                             "volumes": 3, "channels": 3}


# ---------------------------------------------------------------- refusals, on tiny volumes

def _save(path: Path, data, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def _case(folder: Path, name="c1", shape=(8, 9, 5), mask_shape=None, mask_affine=None, mask=None) -> None:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    _save(folder / f"{name}.nii.gz", rng.integers(0, 1000, shape).astype(np.int16))
    m = mask if mask is not None else (rng.random(mask_shape or shape) > 0.7).astype(np.uint8)
    _save(folder / f"{name}_mask.nii.gz", m, mask_affine)


def _refused(match: str, fn, *args, **kwargs) -> AlsegError:
    with pytest.raises(AlsegError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    return info.value


def test_bad_headers_are_refused_in_one_line(tmp_path):
    _case(tmp_path)
    (tmp_path / "c2.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    err = _refused("unreadable NIfTI header", open_dataset, tmp_path)
    assert err.path.endswith("c2.nii.gz")

    bad = tmp_path / "bad"
    _case(bad)
    _save(bad / "c1_mask.nii", np.zeros((8, 9, 5), np.uint8))
    (bad / "c1_mask.nii.gz").unlink()
    header = bytearray((bad / "c1_mask.nii").read_bytes())
    header[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1 ...
    header[280:328] = bytes(48)  # ... with an all-zero sform: no orientation at all
    (bad / "c1_mask.nii").write_bytes(bytes(header))
    _refused("affine is degenerate", open_dataset, bad)


def test_mismatched_image_and_mask_are_refused(tmp_path):
    _case(tmp_path / "shape", mask_shape=(8, 9, 4))
    assert _refused(r"mask has shape \(8, 9, 4\) but its image c1.nii.gz has \(8, 9, 5\)", open_dataset,
                    tmp_path / "shape").path.endswith("c1_mask.nii.gz")
    shifted = np.eye(4)
    shifted[2, 3] = 2.5
    _case(tmp_path / "affine", mask_affine=shifted)
    _refused("another affine than its image", open_dataset, tmp_path / "affine")
    # the same grid stored in another order is not a mismatch: both are made RAS+ first
    flipped = np.diag([-1.0, 1, 1, 1])
    flipped[0, 3] = 7.0  # x index 0 of the flipped file is the last column of the image
    ok = tmp_path / "flipped"
    _case(ok, mask=np.zeros((8, 9, 5), np.uint8), mask_affine=flipped)
    assert len(open_dataset(ok).samples) == 5


def test_2d_files_posing_as_volumes_and_4d_masks_are_refused(tmp_path):
    flat2d = tmp_path / "flat2d"
    flat2d.mkdir()
    _save(flat2d / "c1.nii.gz", np.zeros((16, 16), np.uint8))
    _refused(r"a 2D image \(shape \(16, 16\)\), not a volume", open_dataset, flat2d)
    thin = tmp_path / "thin"
    _case(thin, shape=(16, 16, 1))
    _refused("one slice thick", open_dataset, thin)
    four = tmp_path / "four"
    _case(four, shape=(8, 9, 5))
    _save(four / "c1_mask.nii.gz", np.zeros((8, 9, 5, 2), np.uint8))
    _refused("a 4D mask", open_dataset, four)


def test_non_binary_masks_and_truncated_voxels_are_refused_when_read(tmp_path):
    labels = tmp_path / "labels"
    _case(labels, mask=(np.arange(8 * 9 * 5).reshape(8, 9, 5) % 3).astype(np.uint8))
    ds = open_dataset(labels)  # headers are fine; the values are read with the voxels
    _refused(r"mask is not binary \(values 0, 1, 2\)", summarize, ds)
    cut = tmp_path / "cut"
    cut.mkdir()
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.integers(0, 1000, (32, 32, 8)).astype(np.int16), np.eye(4)), cut / "c1.nii")
    data = (cut / "c1.nii").read_bytes()
    (cut / "c1.nii").write_bytes(data[: len(data) // 2])
    ds = open_dataset(cut)
    assert ds.samples[0].mask is None  # no c1_mask: an unlabelled case
    clear_cache()
    _refused("unreadable NIfTI data", sample_image, ds.samples[0])


def test_case_pairing_problems_are_refused(tmp_path):
    nn = tmp_path / "nn"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for c in (0, 2):
        _save(nn / "imagesTr" / f"p1_{c:04d}.nii.gz", np.zeros((8, 8, 4), np.int16))
    _save(nn / "labelsTr" / "p1.nii.gz", np.zeros((8, 8, 4), np.uint8))
    _refused("lacks its channel file p1_0001", open_dataset, nn)
    _save(nn / "imagesTr" / "p1_0001.nii.gz", np.zeros((8, 8, 3), np.int16))
    _refused("channel file has shape", open_dataset, nn)
    _save(nn / "imagesTr" / "p1_0001.nii.gz", np.zeros((8, 8, 4), np.int16))
    _save(nn / "labelsTr" / "p2.nii.gz", np.zeros((8, 8, 4), np.uint8))
    _refused("label has no image", open_dataset, nn)
    (nn / "labelsTr" / "p2.nii.gz").unlink()
    _save(nn / "imagesTr" / "p3_0000.nii.gz", np.zeros((8, 8, 4), np.int16))
    _refused("image has no label p3.nii.gz", open_dataset, nn)
    (nn / "imagesTr" / "p3_0000.nii.gz").unlink()
    ds = open_dataset(nn)
    assert ds.volumes[0].channels == 3 and sample_header(ds.samples[0]) == (8, 8, 3)
    _refused("volume axis 'w'", open_dataset, nn, volume_axis="w")
    _refused("applies to NIfTI volumes", open_dataset, LGG, volume_axis=2)
    flat = tmp_path / "flat"
    _case(flat)
    (flat / "c1.nii.gz").rename(flat / "c9.nii.gz")
    _refused("mask has no image", open_dataset, flat)


def test_a_project_over_nifti_volumes_exports_slices_and_takes_their_masks(lgg_nifti, tmp_path):
    """The lab's side on volumes: a batch of slices (ids CASE/zNNN) exported as pictures, labelled by
    files named as the manifest says, and every mask out again through an export."""
    import csv

    from PIL import Image

    from alseg.annotate.exchange import export_project
    from alseg.project import ingest, init_project, query

    import shutil

    data = tmp_path / "volumes"  # two patients with masks, the third's slices are the pool
    shutil.copytree(lgg_nifti["flat"], data)
    pool_patient = PATIENTS[2]
    (data / f"{pool_patient}_mask.nii.gz").unlink()
    project = tmp_path / "p"
    init_project(project, data, preset="demo", pretrain=False,
                 overrides={"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 1, "min_epoch_steps": 5},
                            "active": {"round_epochs": 1, "mc_passes": 2}})
    batch = query(project, n=4)["batch"]
    folder = Path(batch["folder"])
    with (folder / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(re.fullmatch(r".+/[xyz]\d{3}", r["id"]) for r in rows)
    truth = lgg_nifti["truth"]
    for r in rows:
        patient, plane = r["id"].split("/")
        assert patient == pool_patient
        image = np.asarray(Image.open(folder / r["image"]))
        assert image.shape[:2] == (int(r["height"]), int(r["width"]))
        mask = truth[patient][1][..., int(plane[1:])]  # the fixture's volumes are (H, W, S), sliced along S
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / r["mask"])
    result = ingest(project, allow_empty=True)
    assert sorted(result["stored"]) == sorted(r["id"] for r in rows) and not result["invalid"]
    out = export_project(project, "png", tmp_path / "out")
    assert out["masks"] >= 4 and not any("/" in p.name for p in (tmp_path / "out" / "masks").iterdir())
