"""Data sources: turn an on-disk layout into :class:`Sample` records, without decoding pixels.

Owns the readers for the three layouts alseg understands and their detection:

* ``isic2017``: the official ISIC 2017 Part 1 download,
  ``ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_NNNNNNN.jpg`` with masks in
  ``ISIC-2017_*_Part1_GroundTruth/ISIC_NNNNNNN_segmentation.png``;
* ``lgg``: the Kaggle ``kaggle_3m`` brain MRI layout, ``<patient>/<patient>_<n>.tif`` with
  ``<patient>_<n>_mask.tif`` (group = patient, slices in numeric order); a single patient
  folder is read as a one-patient dataset;
* ``folder``: ``images/`` and optional ``masks/`` paired by file stem, for users' own data,
  with an optional ``groups.csv`` (``image,group``, UTF-8) for grouped splits, which then
  must give every image exactly one non-empty group.

Nothing is dropped silently: a broken symbolic link to an image or mask, or two files that
would be the same sample (``X.jpg`` beside ``X.JPG``), is an error naming the files.
A split folder whose ground-truth folder exists must have a mask for every image; a split
without a ground-truth folder is an unlabelled pool (mask ``None``).
"""
from __future__ import annotations

import csv
import io
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
    if _lgg_root(root) is not None or _is_lgg_patient(root):
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
    for s in samples:  # ids become database keys and file names: they must be text
        for file in (s.image, s.mask):
            try:
                None if file is None else str(file).encode("utf-8")
            except UnicodeEncodeError:
                raise AlsegError("file name is not valid UTF-8; rename the file", file) from None
    if not samples:
        raise AlsegError(f"no images found for format {fmt}", root)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise AlsegError(f"sample id {dup!r} appears twice", root)
    return Dataset(fmt, root, tuple(samples))


def _files(folder: Path) -> list[Path]:
    """The visible files directly in ``folder``, sorted; a dangling link to an image is an error.

    ``is_file()`` is False for a link whose target is gone, so without the check such an image
    (or mask) would vanish from the dataset, leaving its partner unlabelled or unpaired.
    """
    found = []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file():
            found.append(p)
        elif p.is_symlink() and not p.exists() and p.suffix.lower() in IMAGE_SUFFIXES:
            raise AlsegError("broken symbolic link (its target does not exist)", p)
    return sorted(found)


def _add_unique(found: dict[str, Path], key: str, path: Path, what: str) -> None:
    """``found[key] = path``, refusing a second file for the same sample (``X.jpg`` and ``X.JPG``)."""
    if key in found:
        raise AlsegError(f"two {what} files for {key!r}: {found[key].name} and {path.name}; keep one", path)
    found[key] = path


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
                    _add_unique(masks, m.group(1), f, "mask")
        images: dict[str, Path] = {}
        for f in _files(image_dir):
            m = _ISIC_IMAGE.match(f.name)
            if m:
                _add_unique(images, m.group(1), f, "image")
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


def _is_lgg_patient(folder: Path) -> bool:
    """Whether ``folder`` is itself one kaggle_3m patient folder (slices beside their ``*_mask.tif``)."""
    return folder.is_dir() and any(folder.glob("*_mask.tif*"))


def _read_lgg(root: Path) -> list[Sample]:
    base = _lgg_root(root)
    if base is not None:
        patient_dirs = sorted(d for d in base.iterdir() if d.is_dir())
    elif _is_lgg_patient(root):
        patient_dirs = [root]
    else:
        raise AlsegError("no patient folders with *_mask.tif files (kaggle_3m layout)", root)
    samples: list[Sample] = []
    for patient_dir in patient_dirs:
        patient = patient_dir.name
        slices: list[tuple[int, Sample]] = []
        stems: dict[str, Path] = {}
        files = {f.name: f for f in _files(patient_dir)}
        for fname, f in files.items():
            m = _LGG_IMAGE.match(fname)
            if not m or m.group("patient").endswith("_mask") or fname.lower().rsplit(".", 1)[0].endswith("_mask"):
                continue
            stem = f.name.rsplit(".", 1)[0]
            _add_unique(stems, stem, f, "image")
            found = [files[n] for n in (f"{stem}_mask.tif", f"{stem}_mask.tiff") if n in files]
            if len(found) > 1:
                raise AlsegError(f"two mask files for {stem!r}: {found[0].name} and {found[1].name}; keep one", found[1])
            mask = found[0] if found else None
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
    groups_csv = root / "groups.csv"
    if groups_csv.is_symlink() and not groups_csv.exists():
        raise AlsegError("broken symbolic link (its target does not exist)", groups_csv)
    groups = _read_groups(groups_csv, images) if groups_csv.is_file() else {}
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
    """``groups.csv``: UTF-8 (a BOM is fine), columns image,group, one non-empty group per image."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise AlsegError(f"groups.csv is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                         "save it as UTF-8", path) from None
    if "\x00" in text:
        raise AlsegError("groups.csv is not UTF-8 text (it holds NUL bytes: a binary file?)", path)
    groups: dict[str, str] = {}
    seen: dict[str, str] = {}
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"image", "group"} <= {f.strip() for f in reader.fieldnames if f}:
            raise AlsegError("groups.csv needs the columns image,group", path)
        reader.fieldnames = [f.strip() if f else f for f in reader.fieldnames]
        for row in reader:
            name = (row.get("image") or "").strip()
            group = (row.get("group") or "").strip()
            if not name and not group and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            line = reader.line_num
            if not name:
                raise AlsegError(f"groups.csv line {line} has no image name", path)
            stem = Path(name).stem
            if stem not in images:
                raise AlsegError(f"groups.csv names an unknown image {name!r} (line {line})", path)
            if stem in seen:
                raise AlsegError(f"groups.csv lists image {name!r} twice (lines {seen[stem]} and {line})", path)
            seen[stem] = str(line)
            if not group:
                raise AlsegError(f"groups.csv gives image {name!r} an empty group (line {line})", path)
            groups[stem] = group
    except csv.Error as exc:
        raise AlsegError(f"groups.csv is not valid CSV ({exc})", path) from None
    missing = [stem for stem in sorted(images) if stem not in groups]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AlsegError(f"groups.csv has no row for image {images[missing[0]].name!r}{more}; "
                         "every image needs a group", path)
    return groups
