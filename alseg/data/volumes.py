"""Volumes (NIfTI files, DICOM series): their headers checked, and their voxels read as 2D slices.

Owns everything alseg knows about a 3D (or 3D + channels) image, so the layout readers in
:mod:`alseg.data.sources` and the sample readers in :mod:`alseg.data.samples` never touch nibabel.
A volume's image is a NIfTI file or a folder holding one DICOM series; :mod:`alseg.data.dicom`
turns a series into a stored voxel array and its RAS affine, and from there it is treated exactly
as a NIfTI volume with that affine (same canonical orientation, checks, slicing, normalisation):

* the header (:func:`read_volume_info`): shape, channels, voxel spacing and orientation, read
  without the voxels. Every volume is used in nibabel's closest canonical orientation (RAS+,
  as ``nib.as_closest_canonical``): axis 0 runs left to right (x), 1 posterior to anterior (y),
  2 inferior to superior (z), so image and mask agree whatever order each file stores. The
  spacing and affine reported are the canonical ones.
* the refusals, each one :class:`AlsegError` line: an unreadable header or voxel data, a
  degenerate affine or voxel size, a 2D image posing as a volume (fewer than three dimensions
  or a spatial dimension of 1), more than 3D + channels, a 4D mask, channel files or a mask of
  another shape or affine than the image (after both are made canonical), a mask that is not
  binary ({0, 1} or {0, 255}).
* slicing (:func:`image_slice`, :func:`mask_slice`): slice ``k`` along ``axis`` is the canonical
  array's plane ``take(k, axis)``; its rows follow the lower remaining axis, its columns the higher
  (an axial slice, axis 2, is ``(x, y)``). No display rotation is applied.
* intensities (:func:`image_slice`): each channel of a volume is mapped to uint8 by its own 0.5th
  and 99.5th percentiles over the whole volume (clipped outside), never per slice, so a slice's
  brightness means the same on every slice of a patient. The normalised volume is computed once
  and kept in an in-process cache (least recently used first out, ``VOLUME_CACHE_BYTES`` in all),
  keyed by each file's path, size and mtime, so reading every slice of a volume decodes it once.

Multi-channel volumes come either as a 4th dimension of one file (``(X, Y, Z, C)``) or as one 3D
file per channel (nnU-Net's ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...), which must share
the first file's shape and affine.
"""
from __future__ import annotations

import threading
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from alseg.data.dicom import read_series, read_series_voxels, series_key
from alseg.errors import AlsegError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AXIS_NAMES = ("x", "y", "z")  # canonical RAS+ axes; slices along them are sagittal, coronal, axial
_AXIS_WORDS = {"x": 0, "sagittal": 0, "y": 1, "coronal": 1, "z": 2, "axial": 2}
PERCENTILES = (0.5, 99.5)
MAX_CHANNELS = 16  # a longer 4th dimension is a time series, not channels
MAX_VOLUME_VOXELS = 2 ** 31  # guard against a small .nii.gz claiming a huge volume
VOLUME_CACHE_BYTES = 1 << 30
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class VolumeInfo:
    """One case's volume as read from its headers (canonical RAS+ orientation).

    ``image_files`` holds one file, or one per channel in channel order; ``shape`` is the
    canonical spatial shape ``(X, Y, Z)``; ``spacing`` the voxel size in mm along those axes;
    ``orientation`` the axis codes the image file stores (e.g. ``("L", "P", "S")``) before it was
    made canonical; ``affine`` the canonical voxel-to-world matrix; ``axis`` the axis it is
    sliced along.
    """

    case: str
    image_files: tuple[Path, ...]
    mask: Path | None
    shape: tuple[int, int, int]
    channels: int
    spacing: tuple[float, float, float]
    orientation: tuple[str, str, str]
    affine: tuple[tuple[float, ...], ...]
    axis: int

    @property
    def slices(self) -> int:
        return self.shape[self.axis]

    def slice_size(self) -> tuple[int, int]:
        """``(width, height)`` of one slice: columns follow the higher remaining axis."""
        rows, cols = (n for i, n in enumerate(self.shape) if i != self.axis)
        return cols, rows


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The file name without ``.nii`` or ``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def parse_axis(value: int | str | None) -> int | None:
    """A slicing axis from ``0``/``1``/``2``, ``x``/``y``/``z`` or ``sagittal``/``coronal``/``axial``;
    None or ``"auto"`` means each volume's own: a DICOM series' acquisition plane, a NIfTI volume's
    axis with the fewest voxels."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _AXIS_WORDS:
            return _AXIS_WORDS[word]
        if word.isdigit():
            value = int(word)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) <= 2:
        return int(value)
    raise AlsegError(f"volume axis {value!r} is not one of 0, 1, 2 (x, y, z; sagittal, coronal, axial) or auto")


def default_axis(shape: Sequence[int]) -> int:
    """The axis with the fewest voxels (the thick-slice acquisition axis); a tie goes to the later axis."""
    return min(range(3), key=lambda i: (shape[i], -i))


# ---------------------------------------------------------------- headers

@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]  # as stored
    ornt: np.ndarray  # nibabel orientation: stored axis i -> canonical axis, flip
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    spacing: tuple[float, float, float]
    axcodes: tuple[str, str, str]


def _load(path: Path):
    """``nib.load`` (lazy: header only) with its failures as one line."""
    import nibabel as nib

    if path.is_symlink() and not path.exists():
        raise AlsegError("broken symbolic link (its target does not exist)", path)
    if not path.is_file():
        raise AlsegError("file not found", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, EOFError, gzip and zlib errors
        raise AlsegError(f"unreadable NIfTI header ({_short(exc)})", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise AlsegError(f"not a NIfTI image ({type(img).__name__})", path)
    return img


def _header(path: Path) -> _Header:
    """A NIfTI file's header, or (a folder) a DICOM series' headers, checked and made canonical."""
    if path.is_dir():
        series = read_series(path)
        zooms = np.sqrt((series.affine[:3, :3] ** 2).sum(axis=0))
        return _geometry(series.shape, series.affine, zooms, path, "DICOM")
    img = _load(path)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3:
        raise AlsegError(f"a 2D image (shape {shape}), not a volume", path)
    if min(shape) < 1:
        raise AlsegError(f"volume has no voxels (shape {shape})", path)
    if min(shape[:3]) == 1:
        raise AlsegError(f"a 2D image (shape {shape}, one slice thick), not a volume", path)
    if len(shape) > 4:
        raise AlsegError(f"unsupported NIfTI shape {shape}: expected X x Y x Z, or X x Y x Z x channels", path)
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOLUME_VOXELS:
        raise AlsegError(f"volume of shape {shape} is over the limit of {MAX_VOLUME_VOXELS} voxels", path)
    return _geometry(shape, img.affine, img.header.get_zooms()[:3], path, "NIfTI")


def _geometry(shape: tuple[int, ...], affine, zooms, path: Path, kind: str) -> _Header:
    """The canonical (RAS+) shape, affine and spacing of a stored ``shape`` with ``affine``."""
    import nibabel as nib
    from nibabel.orientations import inv_ornt_aff, io_orientation

    if affine is None or not np.all(np.isfinite(affine)):
        raise AlsegError(f"bad {kind} header: its affine is missing or not finite", path)
    ornt = io_orientation(affine)
    if np.isnan(ornt).any() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise AlsegError(f"bad {kind} header: its affine is degenerate (no orientation)", path)
    zooms = np.asarray(zooms, float)
    if zooms.size < 3 or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise AlsegError(f"bad {kind} header: voxel sizes {tuple(zooms.tolist())} are not positive", path)
    canonical_shape = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    for i, (j, _) in enumerate(ornt):
        canonical_shape[int(j)] = shape[i]
        spacing[int(j)] = float(zooms[i])
    canonical_affine = affine @ inv_ornt_aff(ornt, shape[:3])
    return _Header(tuple(shape), ornt, tuple(canonical_shape), canonical_affine, tuple(spacing),
                   tuple(nib.aff2axcodes(affine)))


def _same_space(a: _Header, b: _Header, what: str, path: Path, reference: Path) -> None:
    if a.canonical_shape != b.canonical_shape:
        raise AlsegError(f"{what} has shape {b.shape[:3]} but its image {reference.name} has {a.shape[:3]} "
                         "(after both are made RAS+)", path)
    if not np.allclose(a.canonical_affine, b.canonical_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        diff = float(np.abs(a.canonical_affine - b.canonical_affine).max())
        raise AlsegError(f"{what} has another affine than its image {reference.name} (differs by up to "
                         f"{diff:.3g} mm): not the same voxel grid", path)


def read_volume_info(case: str, image_files: Sequence[Path], mask: Path | None = None,
                     axis: int | None = None) -> VolumeInfo:
    """Check one case's headers (image, channel files, mask) and describe its volume.

    ``axis`` is the slicing axis (None: a DICOM series' stacking axis, the plane it was acquired
    in; a NIfTI volume's :func:`default_axis`). No voxels are read, so a mask's
    values are checked when its slices are (:func:`mask_slice`).
    """
    files = tuple(Path(f) for f in image_files)
    if not files:
        raise AlsegError(f"case {case!r} has no image file")
    head = _header(files[0])
    if len(head.shape) == 4:
        if len(files) > 1:
            raise AlsegError(f"a 4D image (shape {head.shape}) cannot also have per-channel files", files[0])
        channels = head.shape[3]
        if not 1 <= channels <= MAX_CHANNELS:
            raise AlsegError(f"4th dimension of {channels} is not image channels (at most {MAX_CHANNELS}; "
                             "time series are not supported)", files[0])
    else:
        channels = len(files)
        if channels > MAX_CHANNELS:
            raise AlsegError(f"case {case!r} has {channels} channel files, more than {MAX_CHANNELS}", files[0])
    for other in files[1:]:
        h = _header(other)
        if len(h.shape) != 3:
            raise AlsegError(f"a channel file must be 3D, this one has shape {h.shape}", other)
        _same_space(head, h, "channel file", other, files[0])
    if mask is not None:
        m = _header(Path(mask))
        if len(m.shape) != 3:
            raise AlsegError(f"a 4D mask (shape {m.shape}): expected one 3D binary mask per case", mask)
        _same_space(head, m, "mask", Path(mask), files[0])
    if axis is None:  # a DICOM series along its acquisition (the slices' stacking), a NIfTI its thinnest axis
        axis = int(head.ornt[2, 0]) if files[0].is_dir() else default_axis(head.canonical_shape)
    return VolumeInfo(case, files, None if mask is None else Path(mask), head.canonical_shape, channels,
                      head.spacing, head.axcodes, tuple(tuple(float(v) for v in row) for row in head.canonical_affine),
                      int(axis))


def volume_geometry(image_files: Sequence[Path]) -> tuple[tuple[int, int, int], int]:
    """``(canonical shape, channels)`` of a volume from its headers (cached per file version)."""
    files = tuple(Path(f) for f in image_files)
    key = _key(files)
    with _GEOMETRY_LOCK:
        if key in _GEOMETRY:
            return _GEOMETRY[key]
    head = _header(files[0])
    value = (head.canonical_shape, head.shape[3] if len(head.shape) == 4 else len(files))
    with _GEOMETRY_LOCK:
        _GEOMETRY[key] = value
    return value


_GEOMETRY: dict[tuple, tuple[tuple[int, int, int], int]] = {}
_GEOMETRY_LOCK = threading.Lock()


# ---------------------------------------------------------------- voxels

class _VolumeCache:
    """Decoded volumes by file version, least recently used dropped past a byte budget.

    Threads asking for the same volume at once wait for one decode instead of each doing it.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, build: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            guard = self._building.setdefault(key, threading.Lock())
        with guard:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            try:
                value = build()
            finally:
                with self._lock:
                    self._building.pop(key, None)
            with self._lock:
                self._items[key] = value
                total = sum(v.nbytes for v in self._items.values())
                while total > self.budget and len(self._items) > 1:
                    _, dropped = self._items.popitem(last=False)
                    total -= dropped.nbytes
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHE = _VolumeCache(VOLUME_CACHE_BYTES)


def clear_cache() -> None:
    """Forget every decoded volume (tests; a long-lived process short of memory)."""
    _CACHE.clear()
    with _GEOMETRY_LOCK:
        _GEOMETRY.clear()


def volume_version(image_files: Sequence[Path]) -> tuple:
    """What identifies this version of a volume's files: each file's path, size and mtime, and for a
    DICOM series folder those of every file in it (a folder's own mtime misses a slice rewritten
    in place). Cache keys and fingerprints of volumes should use it."""
    return _key(tuple(Path(f) for f in image_files))


def _key(files: Sequence[Path]) -> tuple:
    parts = []
    for f in files:
        if f.is_dir():  # a DICOM series: any of its files changing makes another version
            parts.append(series_key(f))
            continue
        try:
            st = f.stat()
        except FileNotFoundError:
            raise AlsegError("file not found", f) from None
        parts.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(parts)


def _canonical_voxels(path: Path) -> np.ndarray:
    """The file's (or DICOM series folder's) voxels, scaled as its header says, in canonical RAS+ order."""
    from nibabel.orientations import apply_orientation, io_orientation

    if path.is_dir():
        series, data = read_series_voxels(path)
        return apply_orientation(data, io_orientation(series.affine))
    head = _header(path)
    img = _load(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, MemoryError) as exc:
        raise AlsegError(f"unreadable NIfTI data ({_short(exc)})", path) from None
    if data.dtype.kind not in "biuf":
        raise AlsegError(f"unsupported voxel type {data.dtype}", path)
    return apply_orientation(data, head.ornt)


def _check_slice_pixels(width: int, height: int, path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise AlsegError(f"slice is {width} x {height} pixels, over the limit of {limit}", path)


def normalise_channel(values: np.ndarray) -> np.ndarray:
    """One channel of a whole volume to uint8 by its 0.5th-99.5th percentiles (NaN becomes 0)."""
    a = np.asarray(values, np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(a[finite] if not finite.all() else a, PERCENTILES)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    out = (np.where(finite, a, lo) - np.float32(lo)) * np.float32(255.0 / (hi - lo)) + np.float32(0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def _normalised_volume(files: tuple[Path, ...]) -> np.ndarray:
    """``(X, Y, Z, C)`` uint8: every channel normalised over its whole volume."""
    if len(files) == 1:
        data = _canonical_voxels(files[0])
        planes = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
        return np.stack([normalise_channel(p) for p in planes], axis=3)
    return np.stack([normalise_channel(_canonical_voxels(f)) for f in files], axis=3)


def _binary_volume(path: Path) -> np.ndarray:
    data = _canonical_voxels(path)
    if data.ndim != 3:
        raise AlsegError(f"a 4D mask (shape {data.shape}): expected one 3D binary mask per case", path)
    values = np.unique(data)
    if not (np.all(np.isin(values, (0, 1))) or np.all(np.isin(values, (0, 255)))):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise AlsegError(f"mask is not binary (values {shown}); expected 0/1 or 0/255 "
                         "(a label map with several classes is not supported)", path)
    return data > 0


def _plane(volume: np.ndarray, axis: int, index: int, path: Path) -> np.ndarray:
    if not 0 <= axis <= 2:
        raise AlsegError(f"slice axis {axis} is not 0, 1 or 2", path)
    if not 0 <= index < volume.shape[axis]:
        raise AlsegError(f"slice {index} along axis {AXIS_NAMES[axis]} is outside the volume "
                         f"({volume.shape[axis]} slices): did the file change?", path)
    return take_slice(volume, axis, index)


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` of ``volume``, as a contiguous array."""
    # basic indexing, not np.take: nibabel's volumes are Fortran-ordered, where np.take of one
    # index took 90 ms a slice (a 256 x 256 x 150 volume: 14 s to cache) against under 1 ms
    return np.ascontiguousarray(volume[(slice(None),) * axis + (index,)])


def image_slice(image_files: Sequence[Path], axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a (per-volume normalised) volume: ``(H, W, C)`` uint8."""
    files = tuple(Path(f) for f in image_files)
    volume = _CACHE.get(("image",) + _key(files), lambda: _normalised_volume(files))
    plane = _plane(volume, axis, index, files[0])
    _check_slice_pixels(plane.shape[1], plane.shape[0], files[0])
    return plane


def mask_slice(mask_file: Path, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a binary mask volume: ``(H, W)`` bool."""
    path = Path(mask_file)
    volume = _CACHE.get(("mask",) + _key((path,)), lambda: _binary_volume(path))
    return _plane(volume, axis, index, path)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


# ---------------------------------------------------------------- writing volumes, reading mask volumes back

_RAS = ((0, 1), (1, 1), (2, 1))  # nibabel orientation of a canonical array: axis i is world axis i, not flipped


def volume_image(info: VolumeInfo, canonical: np.ndarray):
    """A ``nib.Nifti1Image`` of a canonical (RAS+) array laid over ``info``'s volume.

    A NIfTI input: the array is put back into the input file's own voxel order and given its
    geometry (zooms, units, qform and sform with their codes), so the two overlay voxel for voxel.
    Otherwise (a DICOM series): the canonical array with the canonical affine as qform and sform.
    (Written by ``alseg predict`` and by a volume project's batch export.)
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    reference = info.image_files[0]
    if not is_nifti(reference):
        img = nib.Nifti1Image(canonical, None)
        affine = np.asarray(info.affine, float)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        img.set_data_dtype(canonical.dtype)
        return img
    try:
        ref = nib.load(str(reference))
        stored = apply_orientation(canonical, ornt_transform(np.array(_RAS, float), io_orientation(ref.affine)))
    except Exception as exc:  # it was read moments ago: removed or rewritten since
        raise AlsegError(f"volume changed since it was read ({str(exc)[:120]})", reference) from None
    if stored.shape != tuple(ref.shape[:3]):
        raise AlsegError(f"volume changed since it was read (shape {tuple(ref.shape[:3])}, "
                         f"expected {stored.shape})", reference)
    img = nib.Nifti1Image(np.ascontiguousarray(stored), None)
    img.set_data_dtype(stored.dtype)
    img.header.set_zooms(tuple(float(z) for z in ref.header.get_zooms()[:3]))
    img.header.set_xyzt_units(*ref.header.get_xyzt_units())
    qform, qcode = ref.header.get_qform(coded=True)
    sform, scode = ref.header.get_sform(coded=True)
    if qcode:
        img.set_qform(qform, code=int(qcode))
    if scode:
        img.set_sform(sform, code=int(scode))
    return img


def nifti_gz_bytes(img) -> bytes:
    """A NIfTI image as the bytes of a ``.nii.gz`` file (no time stamp inside: the same input, the same bytes)."""
    import gzip

    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def written_slice(info: VolumeInfo, axis: int, index: int) -> tuple[int, int]:
    """``(file axis, file index)`` of canonical slice ``index`` along ``axis`` in the voxel order
    :func:`volume_image` writes: a NIfTI source's own (an axis it stores flipped counts from the other
    end), a DICOM series' canonical one (its written volume is canonical)."""
    reference = info.image_files[0]
    if not is_nifti(reference):
        return axis, index
    ornt = _header(reference).ornt
    stored_axis = next(i for i, (j, _) in enumerate(ornt) if int(j) == axis)
    flipped = ornt[stored_axis, 1] < 0
    return stored_axis, (info.shape[axis] - 1 - index) if flipped else index


def read_mask_volume(info: VolumeInfo, path: str | Path) -> np.ndarray:
    """A mask volume given back for ``info``'s case, as a canonical ``(X, Y, Z)`` bool array.

    It must lie on the case's voxel grid (the same shape and affine as the image, after both are
    made RAS+: a file in another orientation of the same grid is fine) and be binary (0/1 or 0/255);
    else one :class:`AlsegError` line naming ``path``."""
    path = Path(path)
    if not is_nifti(path):
        raise AlsegError("not a NIfTI file (.nii or .nii.gz)", path)
    image = _header(info.image_files[0])
    mask = _header(path)
    if len(mask.shape) != 3:
        raise AlsegError(f"a 4D mask (shape {mask.shape}): expected one 3D binary mask per case", path)
    _same_space(image, mask, "mask", path, info.image_files[0])
    return _binary_volume(path)
