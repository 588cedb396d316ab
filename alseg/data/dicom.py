"""DICOM series: one case's folder of 2D slices checked and read as one volume (pydicom).

Owns everything alseg knows about DICOM, so :mod:`alseg.data.volumes` gets from a series what it
gets from a NIfTI header (a stored voxel array and its RAS+ voxel-to-world affine) and
:mod:`alseg.data.sources` only asks which folders hold DICOM files:

* which files are DICOM (:func:`is_dicom_file`): a ``.dcm`` file, or any file whose bytes 128-131
  are the ``DICM`` preamble (the usual extensionless export); ``DICOMDIR`` and other files are not
  slices and are left alone.
* the series (:func:`read_series`): every slice's header read (without pixels unless asked),
  sorted by ``ImagePositionPatient`` projected on the slice normal (the cross product of the
  ``ImageOrientationPatient`` cosines), never by file name or ``InstanceNumber``. The stored array
  is ``(Columns, Rows, slices)``: index ``i`` runs along the row cosine, ``j`` along the column
  cosine, ``k`` along the normal. The affine is built from the orientation, ``PixelSpacing``
  (row spacing, column spacing) and the step between the first and last positions, and turned
  from DICOM's LPS to RAS (x and y negated) like a NIfTI affine.
* intensities: ``RescaleSlope`` / ``RescaleIntercept`` applied per slice (float32 when they
  change values). ``MONOCHROME1`` slices (the lowest value shown white) are inverted within their
  stored range (``BitsStored``, ``PixelRepresentation``) before the rescale, as a viewer shows them,
  so a model and the page see bright as bright whichever way a scanner stored it.
* the refusals, each one :class:`AlsegError` line naming the file or folder: an unreadable file,
  several series (``SeriesInstanceUID``) in one folder, a single file posing as a series, a
  multi-frame file, colour slices, DICOM SEG or RTSTRUCT objects (masks come as NIfTI beside the
  series; DICOM SEG is not supported), a missing or malformed orientation, position or pixel
  spacing, slices of different orientation or size, two slices at one position, slice spacing
  that is not uniform within :data:`SLICE_SPACING_TOLERANCE`, positions off one line, and a
  compressed transfer syntax this pydicom cannot decode (the plugins it would need are named).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alseg.errors import AlsegError

DICOM_SUFFIX = ".dcm"
NOT_SLICES = {"dicomdir"}  # the media directory of a DICOM CD: an index, not an image
SLICE_SPACING_TOLERANCE = 0.01  # steps may differ from their mean by 1 % (DS rounding, scanner jitter)
MIN_SPACING_TOLERANCE_MM = 1e-3
ORIENTATION_TOLERANCE = 1e-4  # direction cosines of all slices agree to this
MAX_SERIES_VOXELS = 2 ** 31
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NOT_IMAGES = {"SEG": "a DICOM SEG object", "RTSTRUCT": "an RT structure set"}


@dataclass(frozen=True)
class Series:
    """One case's series as read from its headers.

    ``files`` are the slices in position order; ``shape`` is the stored ``(Columns, Rows,
    slices)``; ``affine`` the RAS voxel-to-world matrix of that stored order; ``slope`` and
    ``intercept`` per slice; ``transfer_syntax`` the first slice's (its name).
    """

    folder: Path
    files: tuple[Path, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray
    slope: tuple[float, ...]
    intercept: tuple[float, ...]
    transfer_syntax: str


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a visible file that claims to be a DICOM slice (``.dcm`` or the preamble)."""
    if path.name.startswith(".") or path.name.lower() in NOT_SLICES or not path.is_file():
        return False
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder``, sorted by name (an order nothing relies on)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_symlink() and not p.exists() and p.suffix.lower() == DICOM_SUFFIX:
            raise AlsegError("broken symbolic link (its target does not exist)", p)
        if is_dicom_file(p):
            found.append(p)
    return sorted(found)


def holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` holds at least one DICOM file directly (stops at the first)."""
    if not folder.is_dir():
        return False
    return any(is_dicom_file(p) for p in sorted(folder.iterdir()))


def series_key(folder: Path) -> tuple:
    """A cache key that changes when any file of the folder is added, removed or rewritten."""
    try:
        entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                         for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except FileNotFoundError:
        raise AlsegError("folder not found", folder) from None
    return (str(folder), tuple(entries))


# ---------------------------------------------------------------- headers

def _read(path: Path, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels,
                                 force=path.suffix.lower() == DICOM_SUFFIX)
    except InvalidDicomError as exc:
        raise AlsegError(f"not a DICOM file ({_short(exc)})", path) from None
    except Exception as exc:  # truncated files, bad lengths, bad VRs: pydicom raises many kinds
        raise AlsegError(f"unreadable DICOM file ({_short(exc)})", path) from None
    if not any(tag.group >= 0x0008 for tag in ds.keys()):  # a .dcm without the preamble is read by
        raise AlsegError("not a DICOM file (no DICOM data elements in it)", path)  # force: junk reads as nothing
    return ds


def _floats(ds, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        raise AlsegError(f"bad DICOM header: {keyword} is missing (no geometry to build a volume from)", path)
    try:
        items = list(value) if not isinstance(value, (str, bytes, int, float)) else [value]
        out = np.array([float(v) for v in items], float)
    except (TypeError, ValueError):
        raise AlsegError(f"bad DICOM header: {keyword} {value!r} is not {count} numbers", path) from None
    if out.size != count or not np.all(np.isfinite(out)):
        raise AlsegError(f"bad DICOM header: {keyword} {tuple(out.tolist())} is not {count} finite numbers", path)
    return out


def _number(ds, keyword: str, default: float, path: Path) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise AlsegError(f"bad DICOM header: {keyword} {value!r} is not a number", path) from None
    if not np.isfinite(out):
        raise AlsegError(f"bad DICOM header: {keyword} is not finite", path)
    return out


def _transfer_syntax(ds, path: Path) -> str:
    """The transfer syntax's name, refusing a compressed one this pydicom cannot decode."""
    meta = getattr(ds, "file_meta", None)
    uid = None if meta is None else meta.get("TransferSyntaxUID")
    if uid is None:
        return "Implicit VR Little Endian"  # pydicom's assumption for files without meta information
    name = getattr(uid, "name", str(uid)) or str(uid)
    if not getattr(uid, "is_compressed", False):
        return name
    available, needs = _decoder(uid)
    if not available:
        wanted = f": install one of {'; '.join(needs)}" if needs else ""
        raise AlsegError(f"compressed transfer syntax {name} ({uid}) cannot be decoded by pydicom without "
                         f"plugins{wanted}", path)
    return name


def _decoder(uid) -> tuple[bool, list[str]]:
    """Whether pydicom can decode ``uid`` here, and the plugins that would let it."""
    try:
        from pydicom.pixels import get_decoder  # pydicom 3
    except ImportError:  # pydicom 2.4: the pixel data handlers
        import pydicom.config

        handlers = [h for h in pydicom.config.pixel_data_handlers if h.supports_transfer_syntax(uid)]
        return any(h.is_available() for h in handlers), [h.HANDLER_NAME for h in handlers]
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return False, []
    return bool(decoder.is_available), list(getattr(decoder, "missing_dependencies", []))


def _check_series(folder: Path, files: list[Path], datasets: list) -> Series:
    """The refusals that need every slice's header, and the sorted series with its affine."""
    for path, ds in zip(files, datasets):
        modality = str(ds.get("Modality", "")).upper()
        if modality in _NOT_IMAGES:
            raise AlsegError(f"{_NOT_IMAGES[modality]}, not an image slice: DICOM SEG and RTSTRUCT masks are not "
                             "supported; give the mask as CASE_mask.nii.gz beside the case folder", path)
    uids: dict[str, Path] = {}
    for path, ds in zip(files, datasets):
        uids.setdefault(str(ds.get("SeriesInstanceUID", "")), path)
    if len(uids) > 1:
        (a, pa), (b, pb) = list(uids.items())[:2]
        raise AlsegError(f"the folder mixes {len(uids)} series (SeriesInstanceUID {a or '(none)'} in {pa.name}, "
                         f"{b or '(none)'} in {pb.name}); keep one series per case folder", folder)
    for path, ds in zip(files, datasets):
        frames = int(_number(ds, "NumberOfFrames", 1, path))
        if frames > 1:
            raise AlsegError(f"a multi-frame DICOM file ({frames} frames) is not supported; give one file per slice",
                             path)
        samples = int(_number(ds, "SamplesPerPixel", 1, path))
        if samples != 1:
            raise AlsegError(f"colour DICOM slices ({samples} samples per pixel) are not supported", path)
    if len(files) == 1:
        raise AlsegError("a single DICOM file (one 2D slice) posing as a volume: a series needs at least two "
                         "slices", files[0])
    syntax = _transfer_syntax(datasets[0], files[0])
    for path, ds in zip(files[1:], datasets[1:]):
        _transfer_syntax(ds, path)

    orient = [_floats(ds, "ImageOrientationPatient", 6, p) for p, ds in zip(files, datasets)]
    position = [_floats(ds, "ImagePositionPatient", 3, p) for p, ds in zip(files, datasets)]
    spacing = [_floats(ds, "PixelSpacing", 2, p) for p, ds in zip(files, datasets)]
    size = [(int(_number(ds, "Rows", 0, p)), int(_number(ds, "Columns", 0, p))) for p, ds in zip(files, datasets)]
    row, col = orient[0][:3], orient[0][3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(float(row @ col)) > 1e-3):
        raise AlsegError(f"bad DICOM header: ImageOrientationPatient {tuple(orient[0].tolist())} is not two "
                         "orthogonal unit vectors", files[0])
    if np.any(spacing[0] <= 0):
        raise AlsegError(f"bad DICOM header: PixelSpacing {tuple(spacing[0].tolist())} is not positive", files[0])
    if min(size[0]) < 1:
        raise AlsegError(f"bad DICOM header: Rows x Columns {size[0][0]} x {size[0][1]} has no pixels", files[0])
    for p, o, s, n in zip(files[1:], orient[1:], spacing[1:], size[1:]):
        if np.abs(o - orient[0]).max() > ORIENTATION_TOLERANCE:
            raise AlsegError(f"slice orientation {tuple(o.tolist())} differs from {files[0].name}'s "
                             f"{tuple(orient[0].tolist())}: not one volume", p)
        if n != size[0] or np.abs(s - spacing[0]).max() > MIN_SPACING_TOLERANCE_MM:
            raise AlsegError(f"slice is {n[0]} x {n[1]} pixels of {tuple(s.tolist())} mm but {files[0].name} is "
                             f"{size[0][0]} x {size[0][1]} of {tuple(spacing[0].tolist())} mm: not one volume", p)

    normal = np.cross(row, col)
    depth = np.array([float(normal @ x) for x in position])
    order = np.argsort(depth, kind="stable")
    depth, files = depth[order], [files[i] for i in order]
    position = np.stack([position[i] for i in order])
    steps = np.diff(depth)
    if np.any(steps < MIN_SPACING_TOLERANCE_MM):
        k = int(np.argmin(steps))
        raise AlsegError(f"two slices at one position ({depth[k]:.4g} mm along the normal; {files[k].name} and "
                         f"{files[k + 1].name}): several acquisitions, echoes or time points in one series?", folder)
    mean = float(steps.mean())
    tolerance = max(MIN_SPACING_TOLERANCE_MM, SLICE_SPACING_TOLERANCE * mean)
    if float(np.abs(steps - mean).max()) > tolerance:
        k = int(np.argmax(np.abs(steps - mean)))
        raise AlsegError(f"slice spacing is not uniform (steps from {steps.min():.4g} to {steps.max():.4g} mm, "
                         f"{steps[k]:.4g} mm between {files[k].name} and {files[k + 1].name}): a missing slice?",
                         folder)
    step = (position[-1] - position[0]) / (len(files) - 1)
    expected = position[0] + np.arange(len(files))[:, None] * step
    off = float(np.linalg.norm(position - expected, axis=1).max())
    if off > tolerance:
        raise AlsegError(f"slice positions do not lie on one line (off by up to {off:.3g} mm)", folder)
    rows, cols = size[0]
    shape = (cols, rows, len(files))
    if int(np.prod(shape, dtype=np.int64)) > MAX_SERIES_VOXELS:
        raise AlsegError(f"series of shape {shape} is over the limit of {MAX_SERIES_VOXELS} voxels", folder)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[0][1]  # i runs along a row: the column spacing
    lps[:3, 1] = col * spacing[0][0]  # j runs down a column: the row spacing
    lps[:3, 2] = step
    lps[:3, 3] = position[0]
    datasets = [datasets[i] for i in order]
    slope = tuple(_number(ds, "RescaleSlope", 1.0, p) for p, ds in zip(files, datasets))
    intercept = tuple(_number(ds, "RescaleIntercept", 0.0, p) for p, ds in zip(files, datasets))
    return Series(folder, tuple(files), shape, _LPS_TO_RAS @ lps, slope, intercept, syntax)


def read_series(folder: Path) -> Series:
    """Check one case folder's series from its headers (no pixels read)."""
    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise AlsegError("no DICOM files in the case folder (*.dcm, or files with the DICM preamble)", folder)
    return _check_series(folder, files, [_read(f, pixels=False) for f in files])


def read_series_voxels(folder: Path) -> tuple[Series, np.ndarray]:
    """The series and its stored ``(Columns, Rows, slices)`` voxels, rescaled (slope, intercept)."""
    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise AlsegError("no DICOM files in the case folder (*.dcm, or files with the DICM preamble)", folder)
    by_file = {f: _read(f, pixels=True) for f in files}
    series = _check_series(folder, files, [by_file[f] for f in files])
    planes = []
    for path in series.files:
        ds = by_file[path]
        if "PixelData" not in ds:
            raise AlsegError("slice has no pixel data", path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plane = np.asarray(ds.pixel_array)
        except Exception as exc:  # the decoders raise their own kinds
            raise AlsegError(f"unreadable DICOM pixel data ({series.transfer_syntax}: {_short(exc)})", path) from None
        if plane.shape != (series.shape[1], series.shape[0]) or plane.dtype.kind not in "biuf":
            raise AlsegError(f"slice pixels have shape {plane.shape} ({plane.dtype}), expected "
                             f"{series.shape[1]} x {series.shape[0]} greyscale", path)
        planes.append(_as_monochrome2(plane, ds))
    if any(s != 1.0 for s in series.slope) or any(b != 0.0 for b in series.intercept):
        voxels = np.stack([p.astype(np.float32) * np.float32(s) + np.float32(b)
                           for p, s, b in zip(planes, series.slope, series.intercept)], axis=-1)
    else:
        voxels = np.stack(planes, axis=-1)
    return series, np.ascontiguousarray(voxels.transpose(1, 0, 2))


def _as_monochrome2(plane: np.ndarray, ds) -> np.ndarray:
    """A ``MONOCHROME1`` slice's stored values inverted within the range its bits can hold (a
    ``MONOCHROME2`` slice, or a float one, as it is)."""
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() != "MONOCHROME1" or plane.dtype.kind == "f":
        return plane
    bits = int(ds.get("BitsStored") or plane.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return ((lo + hi) - plane.astype(np.int64)).astype(plane.dtype)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]
