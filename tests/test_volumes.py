"""NIfTI volumes as samples: three real LGG patients converted to NIfTI (nnU-Net's per-channel
files, and a flat folder of 4D images stored left-right flipped), read back slice by slice, and
the headers and masks that must be refused, each in one line; DICOM series (written here with
pydicom, shuffled names and instance numbers, and one real patient with its NIfTI twin) read as
the same volumes, and the series that must be refused."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from alseg.data import detect_format, load_cached, open_dataset, sample_header, sample_image, sample_mask, summarize
from alseg.data.volumes import clear_cache, parse_axis
from alseg.errors import AlsegError
from conftest import LGG

from volume_fixtures import PATIENTS, tiff_stack as _tiff_stack


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



def test_a_volume_project_without_masks_never_asks_for_a_slice_of_air(lgg_nifti, tmp_path):
    """Three real patients, no masks: a first batch of every slice but the mostly-air ones is
    exactly those slices (a random draw of that many from all of them would almost never miss
    every air slice), and the rule leaves out no tumour slice of these patients."""
    import shutil

    from alseg.active.coldstart import tissue_candidates
    from alseg.project import init_project, query
    from alseg.store import RunStore

    data = tmp_path / "volumes"
    shutil.copytree(lgg_nifti["flat"], data)
    for mask in data.glob("*_mask.nii.gz"):
        mask.unlink()
    cache = load_cached(open_dataset(data), 32, cache_dir=tmp_path / "cache")
    ids, groups = list(cache.ids), list(cache.groups)
    tissue = set(tissue_candidates(cache.images, ids, cache.indices(ids), groups, 1))  # the pool is every slice
    air = set(ids) - tissue
    assert air and all(len([g for i, g in zip(ids, groups) if i in tissue and g == p]) > 5 for p in set(groups))
    truth = lgg_nifti["truth"]
    assert not any(truth[i.split("/")[0]][1][..., int(i.split("/")[1][1:])].any() for i in air)
    project = tmp_path / "p"
    init_project(project, data, preset="demo", pretrain=False,
                 overrides={"data": {"size": 32, "cache_dir": str(tmp_path / "cache")}, "model": {"width": 4}})
    batch = query(project, n=len(tissue))["batch"]
    with RunStore.open_readonly(project) as store:
        assert set(store.queued(0)) == tissue and batch["round"] == 0


# ---------------------------------------------------------------- DICOM series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to the patient's left (+x LPS), columns to posterior (+y)


def _dicom_slice(path: Path, pixels: np.ndarray, position, *, series="1.2.3.4", instance=1,
                 orientation=AXIAL, spacing=(0.9, 0.8), slope=1.0, intercept=0.0, syntax=None, modality="MR",
                 drop=(), photometric="MONOCHROME2") -> Path:
    """One 2D DICOM slice written by pydicom (explicit VR little endian unless ``syntax`` says)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = modality, series, instance
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.PixelSpacing = [f"{v:g}" for v in spacing]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if syntax is None:
        # MONOCHROME1 stores the lowest value shown white: the same picture stored inverted
        stored = pixels if photometric == "MONOCHROME2" else -1 - pixels.astype(np.int32)
        ds.PixelData = stored.astype("<i2").tobytes()
    else:  # a compressed syntax: placeholder fragments (the refusal comes from the header alone)
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"] * 1)
        ds["PixelData"].VR = "OB"
    for keyword in drop:
        delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return path


def _series(folder: Path, volume: np.ndarray, *, step=2.5, origin=(-20.0, -30.0, 10.0), seed=0,
            extensionless=False, slopes=None, intercepts=None, positions=None, **kw) -> list[Path]:
    """``volume`` (Rows, Columns, slices) as a DICOM series, stored as ``slopes * raw + intercepts``
    per slice, under shuffled file names and instance numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    n = volume.shape[2]
    rng = np.random.default_rng(seed)
    names, instances = rng.permutation(n), rng.permutation(n) + 1
    paths = []
    for k in range(n):
        slope = 1.0 if slopes is None else slopes[k]
        intercept = 0.0 if intercepts is None else intercepts[k]
        raw = np.round((volume[..., k] - intercept) / slope).astype(np.int16)
        z = origin[2] + step * k if positions is None else positions[k]
        name = f"IM{names[k]:04d}" + ("" if extensionless else ".dcm")
        paths.append(_dicom_slice(folder / name, raw, (origin[0], origin[1], z), instance=int(instances[k]),
                                  slope=slope, intercept=intercept, **kw))
    return paths


# The canonical (RAS+) affine of a _series by hand: x = 20 - 0.8 i runs right to left, so the
# canonical x starts at the last column (20 - 0.8 * 15 = 8); y = 30 - 0.9 j starts at 30 - 0.9 * 11.
SERIES_AFFINE = np.array([[0.8, 0, 0, 8.0], [0, 0.9, 0, 20.1], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])


def _as_canonical(volume: np.ndarray) -> np.ndarray:
    """A (Rows, Columns, slices) axial LPS series as RAS+ (x, y, z): columns reversed become x,
    rows reversed become y."""
    return volume[::-1, ::-1].transpose(1, 0, 2)


@pytest.fixture(scope="session")
def dicom_cases(tmp_path_factory) -> dict:
    """Two 12 x 16 x 6 axial series with per-slice rescale values: ``A`` (``*.dcm``, its mask
    ``A_mask.nii.gz`` beside it) and ``B`` (extensionless DICM files, its mask in ``masks/``)."""
    root = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(7)
    truth = {}
    for case, seed in (("A", 1), ("B", 2)):
        volume = rng.integers(0, 400, (12, 16, 6)).astype(np.float64) * 3 - 500  # what the scanner measured
        _series(root / case, volume, seed=seed, extensionless=case == "B",
                slopes=[3.0, 1.5, 3.0, 0.5, 1.0, 3.0], intercepts=[-500 - 10 * k for k in range(6)])
        mask = volume > 0
        truth[case] = (volume, mask)
        target = root / "A_mask.nii.gz" if case == "A" else root / "masks" / "B.nii.gz"
        target.parent.mkdir(exist_ok=True)
        _save(target, _as_canonical(mask).astype(np.uint8), SERIES_AFFINE)
    (root / "B" / "notes.txt").write_text("not a slice")
    return {"root": root, "truth": truth}


def test_a_dicom_series_reads_as_a_volume_in_position_order(dicom_cases):
    root, truth = dicom_cases["root"], dicom_cases["truth"]
    clear_cache()
    assert detect_format(root) == "dicom"
    ds = open_dataset(root)
    assert ds.format == "dicom" and ds.ids == [f"{c}/z{k:03d}" for c in "AB" for k in range(6)]
    assert [s.group for s in ds.samples] == [c for c in "AB" for _ in range(6)]
    assert [s.mask.name for s in ds.samples[::6]] == ["A_mask.nii.gz", "B.nii.gz"]
    info = ds.volumes[0]
    assert info.shape == (16, 12, 6) and info.channels == 1 and info.axis == 2
    assert info.spacing == pytest.approx((0.8, 0.9, 2.5)) and info.orientation == ("L", "P", "S")
    np.testing.assert_allclose(np.array(info.affine), SERIES_AFFINE, atol=1e-6)
    for case, (volume, mask) in truth.items():
        want = _normalised(_as_canonical(volume)[..., None])  # the rescaled values, normalised per volume
        assert len(np.unique(want)) > 100  # a real test of every pixel, not of a constant image
        for s in (s for s in ds.samples if s.group == case):
            assert sample_header(s) == (12, 16, 1)
            got = sample_image(s)
            assert got.shape == (16, 12, 1)
            assert np.abs(got.astype(int) - want[:, :, s.slice].astype(int)).max() <= 1, s.id
            np.testing.assert_array_equal(sample_mask(s), _as_canonical(mask)[:, :, s.slice])
    coronal = open_dataset(root, volume_axis="y")
    assert coronal.ids[:2] == ["A/y000", "A/y001"] and sample_header(coronal.samples[0]) == (6, 16, 1)
    positives = sum(bool(m[..., k].any()) for _, m in truth.values() for k in range(6))
    assert summarize(ds) == {"format": "dicom", "samples": 12, "with_mask": 12, "positive": positives, "groups": 2,
                             "image_sizes": {"12x16": 12}, "volumes": 2, "channels": 1}


def test_dicom_cache_key_sees_a_slice_rewritten_in_place(dicom_cases, tmp_path):
    """The decoded series is cached by the versions of all its files, not by the folder's mtime."""
    import os
    import shutil

    from pydicom import dcmread

    root = tmp_path / "copy"
    shutil.copytree(dicom_cases["root"], root)
    before = [sample_image(s) for s in open_dataset(root).samples[:6]]
    first = min((root / "A").iterdir())
    stamp = (root / "A").stat().st_mtime_ns
    ds = dcmread(first)
    ds.PixelData = np.full(12 * 16, 7, "<i2").tobytes()  # the same header, other pixels
    ds.save_as(first, enforce_file_format=True)
    os.utime(root / "A", ns=(stamp, stamp))  # the folder itself looks untouched
    after = [sample_image(s) for s in open_dataset(root).samples[:6]]
    assert any(not np.array_equal(x, y) for x, y in zip(before, after))


def test_dicom_slices_sort_by_position_along_the_normal_not_by_name(tmp_path):
    """A sagittal series (normal along -x in LPS: positions decrease) written in shuffled names."""
    volume = np.arange(8 * 10 * 4, dtype=np.float64).reshape(8, 10, 4)
    folder = tmp_path / "sag" / "s1"
    folder.mkdir(parents=True)
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run posterior, columns inferior: normal = (-1, 0, 0)
    for k in range(4):
        _dicom_slice(folder / f"{(k * 3) % 4}.dcm", volume[..., k].astype(np.int16), (5.0 - 2.0 * k, 0, 0),
                     orientation=sagittal, spacing=(1.0, 1.0), instance=4 - k)
    ds = open_dataset(tmp_path / "sag", volume_axis="x")
    info = ds.volumes[0]
    # LPS x = 5 - 2k is RAS x = 2k - 5: slice k is canonical x = k; y = -j (columns, posterior) is RAS
    # anterior reversed; z = -row runs inferior, reversed.
    assert info.shape == (4, 10, 8) and info.spacing == pytest.approx((2.0, 1.0, 1.0))
    canonical = volume.transpose(2, 1, 0)[:, ::-1, ::-1]
    got = np.stack([sample_image(s)[..., 0] for s in ds.samples], axis=0)
    np.testing.assert_array_equal(got, _normalised(canonical[..., None])[..., 0])


def test_a_monochrome1_series_reads_as_the_same_picture_as_its_monochrome2_twin(tmp_path):
    """MONOCHROME1 stores the lowest value shown white; read as a viewer shows it, its voxels equal
    those of the same picture stored MONOCHROME2 (and differ from the stored values)."""
    from alseg.data.dicom import read_series_voxels

    volume = np.random.default_rng(3).integers(-300, 900, size=(12, 16, 5)).astype(np.float64)
    _series(tmp_path / "m2", volume)
    _series(tmp_path / "m1", volume, photometric="MONOCHROME1")
    _, plain = read_series_voxels(tmp_path / "m2")
    _, inverted = read_series_voxels(tmp_path / "m1")
    np.testing.assert_array_equal(inverted, plain)
    from pydicom import dcmread
    stored = dcmread(sorted((tmp_path / "m1").iterdir())[0]).pixel_array
    assert not np.isin(stored, plain).all()  # the file really holds the inverted values


def test_a_dicom_series_is_sliced_in_its_acquisition_plane_by_default(tmp_path):
    """20 axial slices of 8 x 10: the thinnest axis is y (8 rows), but the series was acquired axially."""
    volume = np.random.default_rng(5).integers(0, 100, (8, 10, 20)).astype(np.float64)
    _series(tmp_path / "dcm" / "c1", volume)
    ds = open_dataset(tmp_path / "dcm")
    assert ds.volumes[0].shape == (10, 8, 20) and ds.volumes[0].axis == 2 and ds.volume_axis is None
    assert ds.ids[:2] == ["c1/z000", "c1/z001"] and len(ds.ids) == 20
    asked = open_dataset(tmp_path / "dcm", volume_axis="coronal")
    assert asked.volume_axis == 1 and asked.volumes[0].axis == 1 and len(asked.ids) == 8
    (tmp_path / "nii").mkdir()
    _save(tmp_path / "nii" / "c1.nii.gz", _as_canonical(volume).astype(np.uint8), SERIES_AFFINE)
    assert open_dataset(tmp_path / "nii").volumes[0].axis == 1  # a NIfTI file: its thinnest axis


def test_an_lgg_patient_as_dicom_reads_like_its_nifti_twin(tmp_path):
    """One real patient's FLAIR channel as a DICOM series, beside the same voxels as NIfTI."""
    patient = PATIENTS[0]
    image, mask = _tiff_stack(patient)
    flair = image[..., 1].astype(np.float64)  # (rows, columns, slices)
    dicom_root, nifti_root = tmp_path / "dicom", tmp_path / "nifti"
    nifti_root.mkdir()
    _series(dicom_root / patient, flair, step=5.0, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0))
    twin = np.diag([1.0, 1.0, 5.0, 1.0])
    twin[:2, 3] = -63.0  # RAS x = -i, so the canonical x starts at the last column
    _save(nifti_root / f"{patient}.nii.gz", _as_canonical(flair).astype(np.uint8), twin)
    for root in (dicom_root, nifti_root):
        _save(root / f"{patient}_mask.nii.gz", _as_canonical(mask).astype(np.uint8), twin)
    a, b = open_dataset(dicom_root), open_dataset(nifti_root)
    assert a.format == "dicom" and b.format == "nifti" and a.ids == b.ids and len(a.ids) == mask.shape[2]
    assert a.volumes[0].shape == b.volumes[0].shape and a.volumes[0].spacing == b.volumes[0].spacing
    np.testing.assert_allclose(a.volumes[0].affine, b.volumes[0].affine, atol=1e-6)
    assert sum(bool(sample_mask(s).any()) for s in a.samples) == sum(bool(mask[..., k].any()) for k in range(mask.shape[2]))
    for sa, sb in zip(a.samples, b.samples):
        np.testing.assert_array_equal(sample_image(sa), sample_image(sb))
        np.testing.assert_array_equal(sample_mask(sa), sample_mask(sb))


def _small(folder: Path, n=3, **kw) -> list[Path]:
    return _series(folder, np.random.default_rng(3).integers(0, 100, (8, 8, n)).astype(np.float64), **kw)


def test_dicom_series_problems_are_refused_in_one_line(tmp_path):
    from pydicom.uid import JPEGLSLossless

    mixed = tmp_path / "mixed"
    _small(mixed / "c1")
    _dicom_slice(mixed / "c1" / "other.dcm", np.zeros((8, 8), np.int16), (-20, -30, 30), series="9.9")
    assert _refused(r"mixes 2 series", open_dataset, mixed).path.endswith("c1")

    for keyword in ("ImageOrientationPatient", "ImagePositionPatient"):
        missing = tmp_path / f"no{keyword}"
        paths = _small(missing / "c1")
        _dicom_slice(paths[1], np.zeros((8, 8), np.int16), (-20, -30, 12.5), drop=(keyword,))
        assert _refused(f"{keyword} is missing", open_dataset, missing).path == str(paths[1])

    gap = tmp_path / "gap"  # slice positions 0, 2, 4, 8: a slice is missing
    _small(gap / "c1", n=4, positions=[0.0, 2.0, 4.0, 8.0])
    _refused(r"slice spacing is not uniform \(steps from 2 to 4 mm", open_dataset, gap)
    _small(tmp_path / "jitter" / "c1", n=4, positions=[0.0, 2.001, 4.0, 6.002])  # within 1 %: accepted
    assert len(open_dataset(tmp_path / "jitter").samples) == 4
    twice = tmp_path / "twice"
    _small(twice / "c1", n=3, positions=[0.0, 2.0, 2.0])
    _refused("two slices at one position", open_dataset, twice)

    single = tmp_path / "single"
    _small(single / "c1", n=1)
    _refused("a single DICOM file .* posing as a volume", open_dataset, single)

    packed = tmp_path / "jpegls"
    _small(packed / "c1", syntax=JPEGLSLossless)
    err = _refused("compressed transfer syntax JPEG-LS Lossless .* cannot be decoded by pydicom without plugins",
                   open_dataset, packed)
    assert "pyjpegls" in str(err) or "gdcm" in str(err)

    seg = tmp_path / "seg"
    _small(seg / "c1")
    _dicom_slice(seg / "c1" / "seg.dcm", np.zeros((8, 8), np.int16), (-20, -30, 0), modality="SEG")
    _refused("DICOM SEG and RTSTRUCT masks are not supported", open_dataset, seg)

    junk = tmp_path / "junk"
    _small(junk / "c1")
    (junk / "c1" / "broken.dcm").write_bytes(b"\x00" * 10)
    assert _refused("not a DICOM file", open_dataset, junk).path.endswith("broken.dcm")


def test_dicom_masks_must_match_the_series_and_pair_by_case(tmp_path):
    shape = tmp_path / "shape"
    _small(shape / "c1")  # 8 x 8 x 3
    _save(shape / "c1_mask.nii.gz", np.zeros((8, 8, 4), np.uint8), SERIES_AFFINE)
    assert _refused(r"mask has shape \(8, 8, 4\) but its image c1 has \(8, 8, 3\)", open_dataset,
                    shape).path.endswith("c1_mask.nii.gz")
    moved = tmp_path / "moved"
    _small(moved / "c1")
    affine = np.diag([0.8, 0.9, 2.5, 1.0])  # the right spacing, but not where the series lies
    _save(moved / "c1_mask.nii.gz", np.zeros((8, 8, 3), np.uint8), affine)
    _refused("another affine than its image c1", open_dataset, moved)

    stray = tmp_path / "stray"
    _small(stray / "c1")
    (stray / "reports").mkdir()
    (stray / "reports" / "r.txt").write_text("x")
    assert _refused("folder holds no DICOM files", open_dataset, stray, "dicom").path.endswith("reports")
    orphan = tmp_path / "orphan"
    _small(orphan / "c1")
    _save(orphan / "c2_mask.nii.gz", np.zeros((8, 8, 3), np.uint8))
    _refused("mask has no case folder c2/", open_dataset, orphan)
    loose = tmp_path / "loose"
    _small(loose)
    _refused("DICOM files lie directly in this folder", open_dataset, loose)
    _refused("applies to NIfTI volumes", open_dataset, LGG, volume_axis=2)
