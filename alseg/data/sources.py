"""Data sources: turn an on-disk layout into :class:`Sample` records, without decoding pixels.

Owns the readers for the three layouts alseg understands and their detection:

* ``isic2017``: the official ISIC 2017 Part 1 download,
  ``ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_NNNNNNN.jpg`` with masks in
  ``ISIC-2017_*_Part1_GroundTruth/ISIC_NNNNNNN_segmentation.png``;
* ``lgg``: the Kaggle ``kaggle_3m`` brain MRI layout, ``<patient>/<patient>_<n>.tif`` with
  ``<patient>_<n>_mask.tif`` (group = patient, slices in numeric order);
* ``folder``: ``images/`` and optional ``masks/`` paired by file stem, for users' own data,
  with an optional ``groups.csv`` (``image,group``) for grouped splits.

A split folder whose ground-truth folder exists must have a mask for every image; a split
without a ground-truth folder is an unlabelled pool (mask ``None``).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from alseg.errors import AlsegError

FORMATS = ("isic2017", "lgg", "folder")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}

_ISIC_SPLITS = (("Training", "training"), ("Validation", "validation"), ("Test_v2", "test"), ("Test", "test"))
_ISIC_IMAGE = re.compile(r"^(ISIC_\d{7})\.jpe?g$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d{7})_segmentation\.png$", re.IGNORECASE)
_LGG_IMAGE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)\.tiff?$", re.IGNORECASE)
_MASK_SUFFIXES = ("", "_mask", "_segmentation")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where its pixels and (optional) mask live, and its group.

    ``group`` ties samples that must stay in one split (an LGG patient); ``subset`` is the
    official partition the file came from (``training``/``validation``/``test``) or None.
    """

    id: str
    image: Path
    mask: Path | None
    group: str | None = None
    subset: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A dataset's samples in a stable order, with the layout they were read from."""

    format: str
    root: Path
    samples: tuple[Sample, ...]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]


def detect_format(path: str | Path) -> str:
    """Name the layout found at ``path``, or raise :class:`AlsegError` when none fits."""
    root = Path(path)
    if not root.exists():
        raise AlsegError("no such file or folder", root)
    if not root.is_dir():
        raise AlsegError("not a folder (give the dataset's folder)", root)
    if any((root / f"ISIC-2017_{name}_Data").is_dir() for name, _ in _ISIC_SPLITS):
        return "isic2017"
    if (root / "images").is_dir():
        return "folder"
    if _lgg_root(root) is not None:
        return "lgg"
    raise AlsegError(
        "unknown layout: expected ISIC-2017_*_Data folders (isic2017), kaggle_3m patient folders "
        "with *_mask.tif (lgg), or images/ [+ masks/] (folder)", root)


def open_dataset(path: str | Path, format: str | None = None) -> Dataset:
    """Read the layout at ``path`` (detected unless ``format`` names one) into a :class:`Dataset`."""
    root = Path(path).absolute()
    fmt = format or detect_format(root)
    if fmt not in FORMATS:
        raise AlsegError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise AlsegError("no such folder", root)
    reader = {"isic2017": _read_isic2017, "lgg": _read_lgg, "folder": _read_folder}[fmt]
    samples = reader(root)
    if not samples:
        raise AlsegError(f"no images found for format {fmt}", root)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise AlsegError(f"sample id {dup!r} appears twice", root)
    return Dataset(fmt, root, tuple(samples))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_isic2017(root: Path) -> list[Sample]:
    samples: list[Sample] = []
    for name, subset in _ISIC_SPLITS:
        image_dir = root / f"ISIC-2017_{name}_Data"
        if not image_dir.is_dir():
            continue
        truth_dir = root / f"ISIC-2017_{name}_Part1_GroundTruth"
        masks: dict[str, Path] = {}
        if truth_dir.is_dir():
            for f in _files(truth_dir):
                m = _ISIC_MASK.match(f.name)
                if m:  # superpixels, CSVs and other extras of the download are ignored
                    masks[m.group(1)] = f
        images: dict[str, Path] = {}
        for f in _files(image_dir):
            m = _ISIC_IMAGE.match(f.name)
            if m:
                images[m.group(1)] = f
        if truth_dir.is_dir():
            for sid, img in images.items():
                if sid not in masks:
                    raise AlsegError(f"image has no mask in {truth_dir.name}", img)
            for sid, msk in masks.items():
                if sid not in images:
                    raise AlsegError(f"mask has no image in {image_dir.name}", msk)
        for sid in sorted(images):
            samples.append(Sample(sid, images[sid], masks.get(sid), None, subset))
    return samples


def _lgg_root(root: Path) -> Path | None:
    """The folder holding the patient folders: ``root`` itself or its ``kaggle_3m`` child."""
    for candidate in (root, root / "kaggle_3m"):
        if candidate.is_dir() and any(
            d.is_dir() and any(d.glob("*_mask.tif*")) for d in candidate.iterdir()
        ):
            return candidate
    return None


def _read_lgg(root: Path) -> list[Sample]:
    base = _lgg_root(root)
    if base is None:
        raise AlsegError("no patient folders with *_mask.tif files (kaggle_3m layout)", root)
    samples: list[Sample] = []
    for patient_dir in sorted(d for d in base.iterdir() if d.is_dir()):
        patient = patient_dir.name
        slices: list[tuple[int, Sample]] = []
        files = {f.name: f for f in _files(patient_dir)}
        for fname, f in files.items():
            m = _LGG_IMAGE.match(fname)
            if not m or m.group("patient").endswith("_mask") or fname.lower().rsplit(".", 1)[0].endswith("_mask"):
                continue
            stem = f.name.rsplit(".", 1)[0]
            mask = next((files[n] for n in (f"{stem}_mask.tif", f"{stem}_mask.tiff") if n in files), None)
            if mask is None:
                raise AlsegError("slice has no mask (expected <patient>_<n>_mask.tif)", f)
            slices.append((int(m.group("n")), Sample(stem, f, mask, patient, None)))
        for fname, f in files.items():
            if fname.lower().endswith(("_mask.tif", "_mask.tiff")):
                image_stem = fname[: fname.lower().rindex("_mask")]
                if not any(s.id == image_stem for _, s in slices):
                    raise AlsegError("mask has no image slice", f)
        samples.extend(s for _, s in sorted(slices, key=lambda t: t[0]))
    return samples


def _read_folder(root: Path) -> list[Sample]:
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise AlsegError("no images/ folder", root)
    images = images_by_stem(image_dir)
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        for stem, path in images_by_stem(mask_dir).items():
            for suffix in _MASK_SUFFIXES:
                if suffix and stem.endswith(suffix) and stem[: -len(suffix)] in images:
                    stem = stem[: -len(suffix)]
                    break
            if stem not in images:
                raise AlsegError("mask has no image of the same name in images/", path)
            if stem in masks:
                raise AlsegError(f"two masks for image {stem!r}", path)
            masks[stem] = path
    groups = _read_groups(root / "groups.csv", images) if (root / "groups.csv").is_file() else {}
    return [Sample(stem, images[stem], masks.get(stem), groups.get(stem), None) for stem in sorted(images)]


def images_by_stem(folder: Path) -> dict[str, Path]:
    """The image files directly in ``folder`` by file stem (two files with one stem are an error)."""
    found: dict[str, Path] = {}
    for f in _files(folder):
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if f.stem in found:
            raise AlsegError(f"two files share the name {f.stem!r} ({found[f.stem].name})", f)
        found[f.stem] = f
    return found


def _read_groups(path: Path, images: dict[str, Path]) -> dict[str, str]:
    groups: dict[str, str] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "group"} <= set(reader.fieldnames):
            raise AlsegError("groups.csv needs the columns image,group", path)
        for row in reader:
            stem = Path(row["image"]).stem
            if stem not in images:
                raise AlsegError(f"groups.csv names an unknown image {row['image']!r}", path)
            groups[stem] = row["group"]
    return groups
