"""A lab's project over volumes, end to end: the batch goes out as NIfTI (``rounds/RRR/volumes/``) beside
the per-slice PNGs, and a corrected mask volume comes back in (its batch slices only).

Three LGG patients as NIfTI (tests/volume_fixtures.py), one without its mask: the pool. Tiny settings,
so the models are no head start; the predicted volume is checked by exporting the same batch again
with the model declared useful."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from alseg.data.volumes import read_volume_info, volume_image, written_slice
from conftest import run_cli, run_json

POOL = "TCGA_HT_7686_19950629"  # the case without a mask
TINY = ("--size", "32", "--width", "4", "--epochs", "1", "--round-epochs", "1", "--mc-passes", "2", "--no-pretrain")


@pytest.fixture(scope="module")
def queried(lgg_nifti, tmp_path_factory) -> dict:
    """A NIfTI project after `alseg query -n 4`: round 1's batch exported (all of it the pool case's slices)."""
    root = tmp_path_factory.mktemp("volume-project")
    data = root / "flat"
    shutil.copytree(lgg_nifti["flat"], data)
    (data / f"{POOL}_mask.nii.gz").unlink()
    project = root / "project"
    run_cli("init", project, "--images", data, *TINY)
    result = run_json("query", project, "-n", "4")
    return {"project": project, "data": data, "batch": result["batch"], "truth": lgg_nifti["truth"]}


@pytest.fixture
def project(queried, tmp_path) -> Path:
    """A copy of the queried project, for a test that writes to it."""
    dest = tmp_path / "project"
    shutil.copytree(queried["project"], dest, symlinks=True)
    (dest / "lock").unlink(missing_ok=True)
    return dest


def _manifest(folder: Path) -> list[dict]:
    with (folder / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _slices_txt(path: Path) -> list[tuple[str, int, int]]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert rows[0] == ["id", "axis", "index"]
    return [(id, int(axis), int(index)) for id, axis, index in rows[1:]]


def _truth_volume(queried) -> tuple[np.ndarray, np.ndarray]:
    """The pool case's true mask as the fixture stores masks (x flipped, FLAT_AFFINE), and canonically."""
    from volume_fixtures import FLAT_AFFINE

    truth = queried["truth"][POOL][1]  # (H, W, S) bool: canonical (x, y, z), as the fixture's affine flips x back
    return truth, FLAT_AFFINE


def test_batch_exports_slices_and_uncertainty_on_the_source_grid(queried):
    folder = Path(queried["batch"]["folder"])
    ids = [r["id"] for r in _manifest(folder)]
    assert len(ids) == 4 and all(id.startswith(f"{POOL}/z") for id in ids)
    assert (folder / "images").is_dir() and len(list((folder / "images").iterdir())) == 4  # the PNGs stay
    listed = _slices_txt(folder / "volumes" / f"{POOL}_slices.txt")
    assert [id for id, _, _ in listed] == ids
    # slicing along z, which the fixture stores unflipped: the file's k index is the slice number in the id
    assert [(axis, index) for _, axis, index in listed] == [(2, int(id.rsplit("z", 1)[1])) for id in ids]
    source = nib.load(str(queried["data"] / f"{POOL}.nii.gz"))
    unc = nib.load(str(folder / "volumes" / f"{POOL}_uncertainty.nii.gz"))
    assert unc.shape == source.shape[:3] and np.allclose(unc.affine, source.affine)
    assert unc.get_data_dtype() == np.float32
    values = np.asarray(unc.dataobj)
    nonzero = sorted(int(k) for k in np.flatnonzero(values.reshape(-1, values.shape[2]).any(axis=0)))
    assert nonzero == sorted(index for _, _, index in listed)  # variance on the batch's slices only
    # round 1's model is no head start at these settings: no predicted PNGs, so no predicted volume
    assert not any((folder / "predicted").iterdir())
    assert not (folder / "volumes" / f"{POOL}_predicted.nii.gz").exists()


def test_predicted_volume_is_the_head_start_over_every_slice(project, queried, tmp_path, monkeypatch):
    from alseg.active.loop import ActiveRun, open_active
    from alseg.annotate.export import export_batch
    from alseg.predict import predict_folder
    from alseg.rundir import RunDir
    from alseg.store import RunStore

    run_dir = RunDir(project)
    shutil.move(run_dir.batch(1), tmp_path / "aside")  # no batch folder: it is exported again, the same batch
    monkeypatch.setattr(ActiveRun, "health", lambda self, round: SimpleNamespace(useful=True))
    with RunStore(run_dir) as store:
        run = ActiveRun(store, open_active(store))
        case = [s.id for s in run.dataset.samples if s.group == POOL]
        _split_at_quantile(run_dir.checkpoint(0), run.data.images[run.data.indices(case)])
        folder = export_batch(run, 1)
    items = _manifest(folder)
    assert [r["id"] for r in items] == [r["id"] for r in _manifest(tmp_path / "aside")]
    source = nib.load(str(queried["data"] / f"{POOL}.nii.gz"))
    predicted = nib.load(str(folder / "volumes" / f"{POOL}_predicted.nii.gz"))
    assert predicted.shape == source.shape[:3] and np.allclose(predicted.affine, source.affine)
    assert predicted.header.get_zooms()[:3] == source.header.get_zooms()[:3]
    mask = np.asarray(predicted.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    canonical = np.asarray(nib.as_closest_canonical(predicted).dataobj)
    asked, drawn = set(), 0
    for row in items:  # the batch's slices: exactly its predicted PNGs
        k = int(row["id"].rsplit("z", 1)[1])
        asked.add(k)
        png = np.asarray(Image.open(folder / row["predicted"])) > 0
        assert np.array_equal(canonical[:, :, k] > 0, png)
        drawn += int(png.sum())
    assert 0 < drawn < len(items) * png.size  # masks with a shape, so the orientation is checked
    # the others: one deterministic pass of the same model, as `alseg predict --mc 0` gives
    predict_folder(run_dir.checkpoint(0), queried["data"], tmp_path / "pred", mc=0)
    reference = np.asarray(nib.load(str(tmp_path / "pred" / "masks" / f"{POOL}.nii.gz")).dataobj)
    others = [k for k in range(mask.shape[2]) if k not in asked]
    assert mask[:, :, others].any() and reference[:, :, others].any()
    # a pixel whose probability is within float noise of 0.5 may go either way between batch compositions
    assert (mask[:, :, others] != reference[:, :, others]).mean() < 1e-3


def _split_at_quantile(path: Path, images: np.ndarray, q: float = 0.7) -> None:
    """Shift the checkpoint's output bias so that a ``1 - q`` share of ``images``' pixels is foreground: a
    model whose masks have a shape to check (a tiny trained one predicts nothing)."""
    import torch

    from alseg.train import Checkpoint, predict_probs

    ckpt = Checkpoint.load(path)
    p = float(np.quantile(predict_probs(ckpt.model, images, ckpt.normalizer), q))
    with torch.no_grad():
        ckpt.model.head.bias -= float(np.log(p / (1 - p)))
    ckpt.save(path)


def test_mask_volume_labels_exactly_the_batch_slices(project, queried):
    from alseg.store import RunStore

    truth, affine = _truth_volume(queried)
    masks = project / "rounds" / "001" / "masks"
    nib.save(nib.Nifti1Image(truth[::-1].astype(np.uint8) * 255, affine), masks / f"{POOL}_mask.nii.gz")
    ids = [r["id"] for r in _manifest(project / "rounds" / "001")]
    empty = [id for id in ids if not truth[:, :, int(id.rsplit("z", 1)[1])].any()]

    strict = run_cli("ingest", project, "--json", check=False)  # tumour-free slices need --allow-empty
    result = json.loads(strict.stdout)
    assert sorted(bad["file"] for bad in result["invalid"]) == sorted(
        f"{masks / POOL}_mask.nii.gz [{id}]" for id in empty)
    assert strict.returncode == (2 if empty else 0)

    result = run_json("ingest", project, "--allow-empty")
    assert result["invalid"] == [] and result["complete"] and result["queued"] == []
    [volume] = result["volumes"]
    assert (volume["case"], volume["round"], volume["slices"], volume["taken"]) == (POOL, 1, 4, 4)
    assert volume["ignored"] == truth.shape[2] - 4
    with RunStore.open_readonly(project) as store:
        assert sorted(store.expert_ids()) == sorted(ids)  # no other slice of the volume was labelled
        for id in ids:
            assert np.array_equal(store.mask(id), truth[:, :, int(id.rsplit("z", 1)[1])])

    after = run_json("query", project)  # the labelled batch trains round 2 and the next batch is chosen
    assert after["batch"]["round"] == 2 and after["batch"]["queued"] == after["batch"]["images"] > 0
    assert not set(r["id"] for r in _manifest(project / "rounds" / "002")) & set(ids)


def test_mask_volume_of_another_grid_is_refused_in_one_line(project, queried, tmp_path):
    from alseg.store import RunStore

    truth, affine = _truth_volume(queried)
    wrong = tmp_path / f"{POOL}.nii.gz"
    nib.save(nib.Nifti1Image(np.pad(truth[::-1], ((0, 2), (0, 0), (0, 0))).astype(np.uint8), affine), wrong)
    proc = run_cli("ingest", project, wrong, "--allow-empty", check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(wrong) in line and "shape" in line
    shifted = tmp_path / "shifted" / f"{POOL}_mask.nii.gz"  # the right shape, another place in the world
    shifted.parent.mkdir()
    moved = affine.copy()
    moved[2, 3] += 5.0
    nib.save(nib.Nifti1Image(truth[::-1].astype(np.uint8), moved), shifted)
    proc = run_cli("ingest", project, shifted, "--allow-empty", check=False)
    assert proc.returncode == 2 and "affine" in proc.stderr and str(shifted) in proc.stderr
    with RunStore.open_readonly(project) as store:  # nothing was stored: the batch is still queued
        assert sorted(store.queued(1)) == sorted(r["id"] for r in _manifest(project / "rounds" / "001"))


def test_written_slice_counts_from_the_stored_end_of_a_flipped_axis(tmp_path):
    volume = np.zeros((6, 5, 4), np.uint8)
    path = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, -2.0, 1.0])), path)  # stored k runs superior to inferior
    info = read_volume_info("flipped", [path], axis=2)
    assert written_slice(info, 2, 0) == (2, 3) and written_slice(info, 2, 3) == (2, 0)
    canonical = np.zeros(info.shape, np.uint8)
    canonical[:, :, 1] = 1  # canonical slice 1 ...
    stored = np.asarray(volume_image(info, canonical).dataobj)
    assert sorted(set(np.flatnonzero(stored.any(axis=(0, 1))))) == [written_slice(info, 2, 1)[1]]  # ... is stored 2


# --- a DICOM-series project: the same files out and back ------------------------------------------------

def _dicom_series(folder: Path, volume: np.ndarray) -> None:
    """``volume`` (rows, columns, slices) as an axial DICOM series (pydicom, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", series, k + 1
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = ["-20", "-30", f"{10 + 2.5 * k:g}"]
        ds.PixelSpacing = ["0.9", "0.8"]
        ds.Rows, ds.Columns = volume.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = volume[..., k].astype("<i2").tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def test_dicom_project_round_trip(tmp_path):
    from alseg.data.sources import open_dataset
    from alseg.store import RunStore

    data, rng = tmp_path / "dicom", np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    for c, case in enumerate(("a", "b", "c")):
        lesion = np.stack([(yy - 12) ** 2 + (xx - 8 - 2 * c) ** 2 < (9 + k) for k in range(6)], axis=2)
        _dicom_series(data / case, rng.integers(0, 200, (24, 24, 6)) + 600 * lesion)
        if case != "c":  # c is the pool
            info = read_volume_info(case, [data / case])
            canonical = lesion[::-1, ::-1].transpose(1, 0, 2)  # axial LPS rows/columns as RAS+ (x, y, z)
            nib.save(volume_image(info, canonical.astype(np.uint8)), data / f"{case}_mask.nii.gz")
    project = tmp_path / "project"
    run_cli("init", project, "--images", data, *TINY)
    batch = run_json("query", project, "-n", "2")["batch"]
    folder = Path(batch["folder"])
    listed = _slices_txt(folder / "volumes" / "c_slices.txt")
    info = next(v for v in open_dataset(data).volumes if v.case == "c")
    unc = nib.load(str(folder / "volumes" / "c_uncertainty.nii.gz"))
    assert unc.shape == info.shape and np.allclose(unc.affine, np.array(info.affine))  # canonical for a series
    assert [index for _, _, index in listed] == [int(id.rsplit("z", 1)[1]) for id, _, _ in listed]
    truth = np.stack([(yy - 12) ** 2 + (xx - 12) ** 2 < (9 + k) for k in range(6)], axis=2)[::-1, ::-1].transpose(1, 0, 2)
    nib.save(volume_image(info, truth.astype(np.uint8)), folder / "masks" / "c.nii.gz")
    result = run_json("ingest", project, "--allow-empty")
    assert result["complete"] and result["volumes"][0]["taken"] == 2
    with RunStore.open_readonly(project) as store:
        for id, axis, index in listed:
            assert np.array_equal(store.mask(id), np.take(truth, index, axis=axis))
