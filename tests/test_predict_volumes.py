"""alseg predict on NIfTI volumes: one mask and one uncertainty NIfTI per case that overlay the input
(its shape, affine and voxel order), voxels equal to the slices' predictions stacked, per-slice and
per-volume scores with the lesion volume in mL; a volume that cannot be read is skipped whole.

Three real LGG patients as NIfTI (test_volumes' fixture: nnU-Net files with an identity affine, and a
flat folder stored left-right flipped at 0.9 x 0.9 x 5 mm) and a model trained for two epochs on LGG.
"""
from __future__ import annotations

import csv
import errno
import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from alseg import AlsegError, predict_folder
from alseg.data import open_dataset, sample_image
from alseg.data.cache import fit_image, map_to_size
from alseg.data.volumes import VolumeInfo
from alseg.predict import lesion_ml, volume_image
from alseg.progress import Reporter
from alseg.train import Checkpoint, predict_probs
from conftest import LGG, run_json
from volume_fixtures import FLAT_AFFINE, PATIENTS

CASES = sorted(PATIENTS)


@pytest.fixture(scope="session")
def lgg_model(tmp_path_factory, lgg_nifti):
    """A tiny model trained on LGG for two epochs at 32 px: ``(checkpoint file, loaded checkpoint)``.

    So tiny a model keeps every probability under 0.5 (empty masks would make every voxel test
    vacuous), so its output bias is moved until 3 % of the fixture's pixels pass 0.5: masks then
    follow what the model finds most lesion-like, sparse and asymmetric.
    """
    import torch

    run = tmp_path_factory.mktemp("runs") / "lgg"
    run_json("train", "--data", LGG, "--size", "32", "--width", "4", "--epochs", "2", "--out", run)
    ckpt = Checkpoint.load(run / "checkpoints" / "last.pt", "cpu")
    dataset = open_dataset(lgg_nifti["nnunet"])
    x = np.stack([fit_image(sample_image(s), ckpt.size, 3) for s in dataset.samples])
    q = float(np.quantile(predict_probs(ckpt.model, x, ckpt.normalizer), 0.97))
    with torch.no_grad():
        ckpt.model.head.bias -= float(np.log(q / (1 - q)))
    path = run / "calibrated.pt"
    ckpt.save(path)
    return path, Checkpoint.load(path, "cpu")


@pytest.fixture(scope="module")
def deterministic(lgg_model, lgg_nifti, tmp_path_factory):
    """``mc=0`` predictions of both layouts: ``{layout: (out, result)}``."""
    run, _ = lgg_model
    outs = {}
    for layout in ("nnunet", "flat"):
        out = tmp_path_factory.mktemp("pred") / layout
        outs[layout] = out, predict_folder(run, lgg_nifti[layout], out, mc=0, device="cpu")
    return outs


def _csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _expected_canonical(ckpt, dataset, case) -> np.ndarray:
    """The case's canonical (RAS+) mask built here: each slice predicted by ``predict_probs``, resized
    back to the slice's size, thresholded, and put at its index along its axis."""
    info = next(v for v in dataset.volumes if v.case == case)
    slices = [s for s in dataset.samples if s.group == case]
    x = np.stack([fit_image(sample_image(s), ckpt.size, 3) for s in slices])
    probs = predict_probs(ckpt.model, x, ckpt.normalizer, device="cpu")
    w, h = info.slice_size()
    planes = [map_to_size(p, w, h) > 0.5 for p in probs]
    return np.stack(planes, axis=info.axis).astype(np.uint8)


def test_nnunet_masks_overlay_the_input_and_are_the_slices_stacked(deterministic, lgg_nifti, lgg_model):
    _, ckpt = lgg_model
    out, result = deterministic["nnunet"]
    dataset = open_dataset(lgg_nifti["nnunet"])
    assert result["volumes"] == 3 and result["images"] == len(dataset.samples) and result["skipped"] == []
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{c}.nii.gz" for c in CASES]  # no CASE/ folders
    assert not (out / "uncertainty").exists()  # mc=0: no variance
    lesion = 0
    for case in CASES:
        source = nib.load(lgg_nifti["nnunet"] / "imagesTr" / f"{case}_0000.nii.gz")
        written = nib.load(out / "masks" / f"{case}.nii.gz")
        data = np.asanyarray(written.dataobj)
        assert data.dtype == np.uint8 and written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
        np.testing.assert_array_equal(data, _expected_canonical(ckpt, dataset, case))  # identity: canonical order
        lesion += int(data.sum())
    assert 0 < lesion < sum(np.prod(nib.load(out / "masks" / f"{c}.nii.gz").shape) for c in CASES)


def test_scores_per_slice_and_volume_in_ml_from_the_spacing(deterministic, lgg_nifti):
    for layout, voxel_mm3 in (("nnunet", 1.0), ("flat", 0.9 * 0.9 * 5.0)):
        out, _ = deterministic[layout]
        dataset = open_dataset(lgg_nifti[layout])
        rows = _csv(out / "scores.csv")
        assert [r["id"] for r in rows] == dataset.ids
        assert [(r["case"], int(r["slice"]), int(r["axis"])) for r in rows] == \
            [(s.group, s.slice, s.axis) for s in dataset.samples]
        assert all(r["status"] == "ok" and r["variance"] == "" for r in rows)
        volumes = {r["case"]: r for r in _csv(out / "volumes.csv")}
        assert sorted(volumes) == CASES
        for case in CASES:
            mask = np.asanyarray(nib.load(out / "masks" / f"{case}.nii.gz").dataobj)
            v = volumes[case]
            n = int(mask.sum())
            assert v["status"] == "ok" and v["mask"] == f"masks/{case}.nii.gz" and v["uncertainty"] == ""
            assert int(v["lesion_voxels"]) == n and int(v["slices"]) == mask.shape[2]
            assert float(v["lesion_ml"]) == pytest.approx(n * voxel_mm3 / 1000)
            assert v["shape"] == "x".join(map(str, mask.shape))
            fractions = [float(r["foreground_fraction"]) for r in rows if r["case"] == case]
            assert fractions == pytest.approx([float(mask[:, :, z].mean()) for z in range(mask.shape[2])], abs=1e-6)
    assert volumes[CASES[0]]["spacing_mm"] == "0.9x0.9x5"
    assert lesion_ml(1000, (0.5, 0.5, 2.0)) == pytest.approx(0.5)


def test_flipped_input_gets_a_mask_in_its_own_voxel_order(deterministic, lgg_nifti):
    """The flat files store x right to left (affine -0.9 on x): the mask keeps that order and affine, so it
    overlays its input; its voxels are the nnU-Net copy's prediction flipped, and its mL scale with 4.05 mm^3."""
    flat, _ = deterministic["flat"]
    nnunet, _ = deterministic["nnunet"]
    flat_volumes = {r["case"]: r for r in _csv(flat / "volumes.csv")}
    nnunet_volumes = {r["case"]: r for r in _csv(nnunet / "volumes.csv")}
    for case in CASES:
        source = nib.load(lgg_nifti["flat"] / f"{case}.nii.gz")
        written = nib.load(flat / "masks" / f"{case}.nii.gz")
        assert written.shape == source.shape[:3]
        np.testing.assert_allclose(written.affine, FLAT_AFFINE, atol=1e-6)
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
        assert nib.aff2axcodes(written.affine) == ("L", "A", "S")
        same_patient = np.asanyarray(nib.load(nnunet / "masks" / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), same_patient[::-1])
        assert flat_volumes[case]["lesion_voxels"] == nnunet_volumes[case]["lesion_voxels"]
        if int(nnunet_volumes[case]["lesion_voxels"]):
            ratio = float(flat_volumes[case]["lesion_ml"]) / float(nnunet_volumes[case]["lesion_ml"])
            assert ratio == pytest.approx(4.05)


def test_mc_dropout_writes_float32_variance_volumes(lgg_model, lgg_nifti, tmp_path):
    run, _ = lgg_model
    out = tmp_path / "out"
    result = predict_folder(run, lgg_nifti["flat"], out, mc=3, device="cpu")
    assert result["volumes"] == 3 and result["mc"] == 3
    rows = _csv(out / "scores.csv")
    volumes = {r["case"]: r for r in _csv(out / "volumes.csv")}
    for case in CASES:
        source = nib.load(lgg_nifti["flat"] / f"{case}.nii.gz")
        variance_img = nib.load(out / "uncertainty" / f"{case}.nii.gz")
        variance = np.asanyarray(variance_img.dataobj)
        assert variance.dtype == np.float32 and variance_img.shape == source.shape[:3]
        np.testing.assert_allclose(variance_img.affine, source.affine, atol=1e-6)
        assert variance.min() >= 0 and variance.max() <= 0.25 and variance.max() > 0
        assert volumes[case]["uncertainty"] == f"uncertainty/{case}.nii.gz"
        slice_sum = sum(float(r["variance"]) for r in rows if r["case"] == case)
        assert float(volumes[case]["variance"]) == pytest.approx(slice_sum, rel=1e-9)
        mask = np.asanyarray(nib.load(out / "masks" / f"{case}.nii.gz").dataobj)
        assert set(np.unique(mask)) <= {0, 1}
    # the same seed writes the same bytes
    again = tmp_path / "again"
    predict_folder(run, lgg_nifti["flat"], again, mc=3, device="cpu")
    for name in ("scores.csv", "volumes.csv", f"uncertainty/{CASES[0]}.nii.gz", f"masks/{CASES[1]}.nii.gz"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_another_slicing_axis_still_fills_the_input_grid(lgg_model, lgg_nifti, tmp_path):
    run, ckpt = lgg_model
    out = tmp_path / "out"
    result = predict_folder(run, lgg_nifti["nnunet"], out, mc=0, volume_axis="coronal", device="cpu")
    dataset = open_dataset(lgg_nifti["nnunet"], volume_axis="coronal")
    assert result["images"] == len(dataset.samples) == 3 * 64
    case = CASES[0]
    written = nib.load(out / "masks" / f"{case}.nii.gz")
    assert written.shape == nib.load(lgg_nifti["nnunet"] / "imagesTr" / f"{case}_0000.nii.gz").shape
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), _expected_canonical(ckpt, dataset, case))
    assert {int(r["axis"]) for r in _csv(out / "scores.csv")} == {1}


def _truncate(path):
    """Keep a .nii.gz's header readable but cut its voxels short."""
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 3]))


def test_an_unreadable_volume_is_skipped_whole_the_others_written(lgg_model, lgg_nifti, tmp_path):
    run, _ = lgg_model
    data = tmp_path / "flat"
    shutil.copytree(lgg_nifti["flat"], data)
    bad = CASES[1]
    _truncate(data / f"{bad}.nii.gz")
    notes = []

    class Notes(Reporter):
        def note(self, text):
            notes.append(text)

    out = tmp_path / "out"
    result = predict_folder(run, data, out, mc=0, device="cpu", reporter=Notes())
    assert result["volumes"] == 2
    assert [s["case"] for s in result["skipped"]] == [bad] and "unreadable" in result["skipped"][0]["problem"]
    assert len(notes) == 1 and bad in notes[0]  # once for the volume, not once per slice
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{c}.nii.gz" for c in CASES if c != bad]
    rows = _csv(out / "scores.csv")
    assert all(r["status"].startswith("skipped: unreadable") for r in rows if r["case"] == bad)
    assert all(r["status"] == "ok" for r in rows if r["case"] != bad)
    assert result["images"] == sum(r["case"] != bad for r in rows)
    volumes = {r["case"]: r for r in _csv(out / "volumes.csv")}
    assert volumes[bad]["status"].startswith("skipped:") and volumes[bad]["mask"] == ""


def test_every_volume_unreadable_is_one_error_and_nothing_written(lgg_model, lgg_nifti, tmp_path):
    run, _ = lgg_model
    data = tmp_path / "flat"
    shutil.copytree(lgg_nifti["flat"], data)
    for case in CASES:
        _truncate(data / f"{case}.nii.gz")
    with pytest.raises(AlsegError, match="none of the .* images could be read"):
        predict_folder(run, data, tmp_path / "out", mc=0, device="cpu")
    assert not (tmp_path / "out").exists()


def test_disk_full_while_writing_a_volume_leaves_nothing(lgg_model, lgg_nifti, tmp_path, monkeypatch):
    import alseg.predict as predict_mod

    run, _ = lgg_model
    real = predict_mod.atomic_write_bytes

    def full_at_the_second_volume(path, data):
        if path.name == f"{CASES[1]}.nii.gz":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(predict_mod, "atomic_write_bytes", full_at_the_second_volume)
    out = tmp_path / "new" / "out"
    with pytest.raises(AlsegError, match="disk full"):
        predict_folder(run, lgg_nifti["flat"], out, mc=0, device="cpu")
    assert not (tmp_path / "new").exists()


def test_volume_axis_is_refused_for_a_plain_folder(lgg_model, tmp_path):
    run, _ = lgg_model
    (tmp_path / "imgs").mkdir()
    with pytest.raises(AlsegError, match="volume axis"):
        predict_folder(run, tmp_path / "imgs", tmp_path / "out", volume_axis=2)


def test_a_series_without_a_file_to_copy_gets_the_canonical_grid(tmp_path):
    """A DICOM series (a folder, not a NIfTI file): the mask is written canonical with the canonical affine."""
    affine = ((2.0, 0.0, 0.0, -10.0), (0.0, 0.5, 0.0, 3.0), (0.0, 0.0, 0.5, 7.0), (0.0, 0.0, 0.0, 1.0))  # RAS+
    info = VolumeInfo("case", (tmp_path,), None, (4, 5, 6), 1, (2.0, 0.5, 0.5), ("S", "R", "A"), affine, 0)
    canonical = np.random.default_rng(0).integers(0, 2, (4, 5, 6)).astype(np.uint8)
    img = volume_image(info, canonical)
    path = tmp_path / "m.nii.gz"
    path.write_bytes(gzip.compress(img.to_bytes()))
    back = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), canonical)
    np.testing.assert_allclose(back.affine, np.asarray(affine), atol=1e-6)
    assert back.get_data_dtype() == np.uint8
