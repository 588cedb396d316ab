"""Three real LGG patients (../shared/data) as NIfTI volumes, for the tests of volumes, predictions
and per-volume evaluation; conftest's ``lgg_nifti`` fixture builds them once per session."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from alseg.data.imageio import read_image, read_mask
from conftest import LGG

PATIENTS = ("TCGA_CS_4942_19970222", "TCGA_CS_5395_19981004", "TCGA_HT_7686_19950629")
STEP = 4  # 256 px slices kept every 4th pixel: 64 px, exactly reproducible from the TIFFs
FLAT_AFFINE = np.diag([-0.9, 0.9, 5.0, 1.0])  # stored x runs right to left: canonical RAS+ flips it


def tiff_stack(patient: str) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, S, 3)`` uint8 image and ``(H, W, S)`` bool mask of one patient, slices in order."""
    folder = LGG / patient
    n = len([p for p in folder.glob("*_mask.tif")])
    images = [read_image(folder / f"{patient}_{k}.tif")[::STEP, ::STEP] for k in range(1, n + 1)]
    masks = [read_mask(folder / f"{patient}_{k}_mask.tif")[::STEP, ::STEP] for k in range(1, n + 1)]
    return np.stack(images, axis=2), np.stack(masks, axis=2)


def build_lgg_nifti(root: Path) -> dict:
    """The three patients as nnU-Net (``imagesTr/P_000c.nii.gz`` + ``labelsTr/P.nii.gz``, identity
    affine) and as a flat folder (``P.nii.gz`` 4D + ``P_mask.nii.gz`` 0/255, flipped along x)."""
    nnunet, flat = root / "nnunet", root / "flat"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    flat.mkdir()
    truth = {}
    for patient in PATIENTS:
        image, mask = tiff_stack(patient)
        truth[patient] = (image, mask)
        for c in range(3):
            nib.save(nib.Nifti1Image(image[..., c], np.eye(4)), nnunet / "imagesTr" / f"{patient}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), nnunet / "labelsTr" / f"{patient}.nii.gz")
        nib.save(nib.Nifti1Image(image[::-1], FLAT_AFFINE), flat / f"{patient}.nii.gz")
        nib.save(nib.Nifti1Image(mask[::-1].astype(np.uint8) * 255, FLAT_AFFINE), flat / f"{patient}_mask.nii.gz")
    return {"nnunet": nnunet, "flat": flat, "truth": truth}
