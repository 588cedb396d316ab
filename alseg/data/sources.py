"""Data sources: turn an on-disk layout into :class:`Sample` records, without decoding pixels.

Owns the readers for the layouts alseg understands and their detection:

* ``isic2017``: the official ISIC 2017 Part 1 download,
  ``ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_NNNNNNN.jpg`` with masks in
  ``ISIC-2017_*_Part1_GroundTruth/ISIC_NNNNNNN_segmentation.png``;
* ``lgg``: the Kaggle ``kaggle_3m`` brain MRI layout, ``<patient>/<patient>_<n>.tif`` with
  ``<patient>_<n>_mask.tif`` (group = patient, slices in numeric order); a single patient
  folder is read as a one-patient dataset;
* ``folder``: ``images/`` and optional ``masks/`` paired by file stem, for users' own data,
  with an optional ``groups.csv`` (``image,group``, UTF-8) for grouped splits, which then
  must give every image exactly one non-empty group;
* ``nifti``: NIfTI volumes (``.nii``, ``.nii.gz``), either nnU-Net's ``imagesTr/`` +
  ``labelsTr/`` (and ``imagesTs/`` [+ ``labelsTs/``], subset ``test``), images
  ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... one per channel (or one ``CASE.nii.gz``, 4D
  for several channels) and the label ``CASE.nii.gz``; or one flat folder of ``CASE.nii.gz``
  (or its ``CASE_0000..`` channel files) beside ``CASE_mask.nii.gz`` (a case without one is
  unlabelled). Every slice along the slicing axis is a sample (tumour-free ones included),
  with id ``CASE/z042`` (the axis letter, the slice number zero-padded to at least three
  digits), group = the case. The axis is ``volume_axis`` or, by default, each volume's axis
  with the fewest voxels. Headers are checked here (:mod:`alseg.data.volumes`); each
  volume's description is kept in :attr:`Dataset.volumes`.
* ``dicom``: DICOM series, one folder per case holding one series of 2D slices (``*.dcm`` or
  extensionless files with the DICM preamble, read by :mod:`alseg.data.dicom`), the case's
  mask a NIfTI volume on the series' voxel grid, ``CASE_mask.nii.gz`` beside the case folder or
  ``masks/CASE.nii.gz`` (a case without one is unlabelled; DICOM SEG masks are not supported).
  Once read, a series is a volume like a NIfTI one: the same slicing axis, ids ``CASE/z042``,
  group = the case. Every visible folder but ``masks/`` must be a case.

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

from alseg.data.dicom import dicom_files, holds_dicom
from alseg.data.volumes import AXIS_NAMES, VolumeInfo, is_nifti, nifti_stem, parse_axis, read_volume_info
from alseg.errors import AlsegError

_TRAILING_NUMBER = re.compile(r"_(\d+)$")  # an LGG slice id: <patient>_<n>

FORMATS = ("isic2017", "lgg", "folder", "nifti", "dicom")
VOLUME_FORMATS = ("nifti", "dicom")
# layouts whose groups are volumes with known slice positions: LGG patients' numbered slices too
SLICED_LAYOUTS = ("lgg", *VOLUME_FORMATS)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}

_ISIC_SPLITS = (("Training", "training"), ("Validation", "validation"), ("Test_v2", "test"), ("Test", "test"))
_ISIC_IMAGE = re.compile(r"^(ISIC_\d{7})\.jpe?g$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d{7})_segmentation\.png$", re.IGNORECASE)
_LGG_IMAGE = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)\.tiff?$", re.IGNORECASE)
_MASK_SUFFIXES = ("", "_mask", "_segmentation")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_NNUNET_SPLITS = (("imagesTr", "labelsTr", "training"), ("imagesTs", "labelsTs", "test"))


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where its pixels and (optional) mask live, and its group.

    ``group`` ties samples that must stay in one split (an LGG patient, a volume's case);
    ``subset`` is the official partition the file came from (``training``/``validation``/``test``)
    or None. A slice of a volume has ``slice`` (its index) and ``axis`` (0, 1, 2: canonical x, y,
    z) set, ``image`` is the volume's (first channel's) file and ``channel_files`` the further
    per-channel files; a 2D image has neither. Read pixels through :mod:`alseg.data.samples`.
    """

    id: str
    image: Path
    mask: Path | None
    group: str | None = None
    subset: str | None = None
    slice: int | None = None
    axis: int | None = None
    channel_files: tuple[Path, ...] = ()

    @property
    def image_files(self) -> tuple[Path, ...]:
        """Every file the image's pixels come from (one, or one per channel)."""
        return (self.image, *self.channel_files)


@dataclass(frozen=True)
class Dataset:
    """A dataset's samples in a stable order, with the layout they were read from.

    ``volumes`` describes each volume (shape, spacing, orientation, slicing axis) for the
    ``nifti`` and ``dicom`` layouts, in the order its slices appear; empty for 2D layouts.
    """

    format: str
    root: Path
    samples: tuple[Sample, ...]
    volumes: tuple[VolumeInfo, ...] = ()
    volume_axis: int | None = None  # the axis asked for (None: each volume's own)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def slice_indices(self) -> list[int]:
        """Each sample's position in its volume, in ``samples`` order: a volume slice's index, an
        LGG slice's number (``<patient>_<n>``), else its place among its group's samples."""
        seen: dict[str | None, int] = {}
        out = []
        for s in self.samples:
            place = seen.get(s.group, 0)
            seen[s.group] = place + 1
            m = _TRAILING_NUMBER.search(s.id) if self.format == "lgg" else None
            out.append(s.slice if s.slice is not None else int(m.group(1)) if m else place)
        return out


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
    if _nifti_files(root / "imagesTr"):
        return "nifti"
    if _dicom_cases(root) or holds_dicom(root):  # before flat NIfTI: their masks are NIfTI files too
        return "dicom"
    if _nifti_files(root):
        return "nifti"
    raise AlsegError(
        "unknown layout: expected ISIC-2017_*_Data folders (isic2017), kaggle_3m patient folders "
        "with *_mask.tif (lgg), images/ [+ masks/] (folder), NIfTI volumes in imagesTr/ [+ labelsTr/] "
        "or beside their CASE_mask.nii.gz (nifti), or DICOM series, a folder per case (dicom)", root)


def open_dataset(path: str | Path, format: str | None = None, volume_axis: int | str | None = None) -> Dataset:
    """Read the layout at ``path`` (detected unless ``format`` names one) into a :class:`Dataset`.

    ``volume_axis`` (``nifti``, ``dicom``) slices every volume along that axis (0/1/2, x/y/z or
    sagittal/coronal/axial of the canonical RAS+ volume); None or ``"auto"``: a DICOM series
    along its acquisition plane, a NIfTI volume along its axis with the fewest voxels.
    """
    root = Path(path).absolute()
    fmt = format or detect_format(root)
    if fmt not in FORMATS:
        raise AlsegError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    axis = parse_axis(volume_axis)
    if axis is not None and fmt not in VOLUME_FORMATS:
        raise AlsegError(f"a volume axis applies to NIfTI volumes and DICOM series, not to the {fmt} layout", root)
    if not root.is_dir():
        raise AlsegError("no such folder", root)
    volumes: tuple[VolumeInfo, ...] = ()
    if fmt == "nifti":
        samples, volumes = _read_nifti(root, axis)
    elif fmt == "dicom":
        samples, volumes = _read_dicom(root, axis)
    else:
        reader = {"isic2017": _read_isic2017, "lgg": _read_lgg, "folder": _read_folder}[fmt]
        samples = reader(root)
    for s in samples:  # ids become database keys and file names: they must be text
        for file in (*s.image_files, s.mask):
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
    return Dataset(fmt, root, tuple(samples), volumes, axis)


def open_recorded_dataset(info: dict) -> Dataset:
    """The dataset a run's store records (its ``data`` record: path, format, volume axis), sliced
    along the axis the run was made with."""
    return open_dataset(info["path"], info["format"], info.get("volume_axis"))


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


def _nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder`` (none when it is not a folder)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.name.startswith(".") or not is_nifti(p):
            continue
        if p.is_symlink() and not p.exists():
            raise AlsegError("broken symbolic link (its target does not exist)", p)
        if p.is_file():
            found.append(p)
    return sorted(found)


def _cases(images: list[Path], labelled: set[str]) -> dict[str, tuple[Path, ...]]:
    """Image files by case: ``CASE_0000``, ``CASE_0001``, ... are one case's channels, in order;
    a file whose whole stem is a case (a label of that name exists, or no ``_NNNN`` ending) is the
    case's only file."""
    whole: dict[str, Path] = {}
    channels: dict[str, dict[int, Path]] = {}
    for f in images:
        stem = nifti_stem(f)
        m = _CHANNEL_FILE.match(stem)
        if m and stem not in labelled:
            case, k = m.group("case"), int(m.group("channel"))
            if k in channels.setdefault(case, {}):
                raise AlsegError(f"two files for channel {k} of case {case!r}: {channels[case][k].name} and {f.name}", f)
            channels[case][k] = f
        else:
            _add_unique(whole, stem, f, "image")
    cases: dict[str, tuple[Path, ...]] = {}
    for case, by_channel in channels.items():
        if case in whole:
            raise AlsegError(f"case {case!r} has both {whole[case].name} and per-channel files; keep one form",
                             whole[case])
        missing = [k for k in range(max(by_channel) + 1) if k not in by_channel]
        if missing:
            first = by_channel[min(by_channel)]
            raise AlsegError(f"case {case!r} lacks its channel file {case}_{missing[0]:04d} "
                             f"(channels must run 0000, 0001, ... without gaps)", first)
        cases[case] = tuple(by_channel[k] for k in sorted(by_channel))
    for case, f in whole.items():
        cases[case] = (f,)
    return dict(sorted(cases.items()))


def _read_nifti(root: Path, axis: int | None) -> tuple[list[Sample], tuple[VolumeInfo, ...]]:
    """Every slice of every volume, by case; the volumes' headers checked on the way."""
    found: list[tuple[str, tuple[Path, ...], Path | None, str | None]] = []  # case, images, mask, subset
    if (root / "imagesTr").is_dir():
        for image_name, label_name, subset in _NNUNET_SPLITS:
            image_dir, label_dir = root / image_name, root / label_name
            if not image_dir.is_dir():
                continue
            labels: dict[str, Path] = {}
            for f in _nifti_files(label_dir):
                _add_unique(labels, nifti_stem(f), f, "label")
            cases = _cases(_nifti_files(image_dir), set(labels))
            for case, label in labels.items():
                if case not in cases:
                    raise AlsegError(f"label has no image in {image_name}/ (expected {case}_0000.nii.gz)", label)
            for case, files in cases.items():
                if label_dir.is_dir() and case not in labels:
                    raise AlsegError(f"image has no label {case}.nii.gz in {label_name}/", files[0])
                found.append((case, files, labels.get(case), subset))
    else:
        files = _nifti_files(root)
        masks: dict[str, Path] = {}
        for f in files:
            stem = nifti_stem(f)
            if stem.lower().endswith("_mask"):
                _add_unique(masks, stem[: -len("_mask")], f, "mask")
        images = [f for f in files if not nifti_stem(f).lower().endswith("_mask")]
        cases = _cases(images, set(masks))
        for case, mask in masks.items():
            if case not in cases:
                raise AlsegError(f"mask has no image {case}.nii.gz (or {case}_0000.nii.gz) beside it", mask)
        found = [(case, files, masks.get(case), None) for case, files in cases.items()]
    if not found:
        raise AlsegError("no NIfTI volumes found (imagesTr/*.nii.gz, or CASE.nii.gz beside CASE_mask.nii.gz)", root)
    return _volume_samples(found, axis)


def _volume_samples(found: list[tuple[str, tuple[Path, ...], Path | None, str | None]],
                    axis: int | None) -> tuple[list[Sample], tuple[VolumeInfo, ...]]:
    """Every slice of every ``(case, image files, mask, subset)``, their headers checked."""
    samples: list[Sample] = []
    volumes: list[VolumeInfo] = []
    for case, files, mask, subset in found:
        info = read_volume_info(case, files, mask, axis)
        if volumes and info.channels != volumes[0].channels:
            raise AlsegError(f"case {case!r} has {info.channels} channels but case {volumes[0].case!r} has "
                             f"{volumes[0].channels}; every volume needs the same channels", files[0])
        volumes.append(info)
        digits = max(3, len(str(info.slices - 1)))
        letter = AXIS_NAMES[info.axis]
        samples.extend(Sample(f"{case}/{letter}{k:0{digits}d}", files[0], mask, case, subset, k, info.axis, files[1:])
                       for k in range(info.slices))
    return samples, tuple(volumes)


def _dicom_cases(root: Path) -> list[Path]:
    """The visible folders in ``root`` (``masks/`` aside) that hold DICOM files."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name != "masks" and holds_dicom(d))


def _read_dicom(root: Path, axis: int | None) -> tuple[list[Sample], tuple[VolumeInfo, ...]]:
    """Every slice of every case folder's series, with its NIfTI mask beside it or in ``masks/``."""
    if dicom_files(root):
        raise AlsegError("DICOM files lie directly in this folder: give the folder above the case folders "
                         "(one folder per case, holding that case's series)", root)
    cases: dict[str, Path] = {}
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith(".") or d.name == "masks":
            continue
        if not holds_dicom(d):
            raise AlsegError("folder holds no DICOM files: every folder here is one case's series "
                             "(masks go beside it as CASE_mask.nii.gz or in masks/)", d)
        cases[d.name] = d
    if not cases:
        raise AlsegError("no DICOM series found (a folder per case holding *.dcm slices)", root)
    masks: dict[str, Path] = {}
    for f in _nifti_files(root):
        stem = nifti_stem(f)
        if not stem.lower().endswith("_mask"):
            raise AlsegError("a NIfTI file beside DICOM case folders must be a mask named CASE_mask.nii.gz", f)
        _add_unique(masks, stem[: -len("_mask")], f, "mask")
    for f in _nifti_files(root / "masks"):
        stem = nifti_stem(f)
        case = stem[: -len("_mask")] if stem.lower().endswith("_mask") and stem not in cases else stem
        _add_unique(masks, case, f, "mask")
    for case, mask in masks.items():
        if case not in cases:
            raise AlsegError(f"mask has no case folder {case}/ holding a DICOM series", mask)
    found = [(case, (folder,), masks.get(case), None) for case, folder in cases.items()]
    return _volume_samples(found, axis)
