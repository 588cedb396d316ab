"""Decoding one image or mask file into a validated NumPy array.

Owns the pixel-level rules every reader shares: which files open, how 16-bit or float
images become uint8, and when a mask counts as binary.

Mask tolerance: a mask is binary when its values are a subset of {0, 1} or {0, 255}.
A 0..255 mask may also carry up to 1 % of pixels strictly between 0 and 255 (anti-aliased
edges from resampling or JPEG); those are binarised at >= 128. Anything else (label maps
such as {0, 1, 2}, soft probability maps) is rejected. Colour masks are accepted only when
their channels are equal.

Orientation: photos (phones, dermatoscopes) often store their pixels sideways with an EXIF
Orientation tag that every viewer applies; so does every reader here, images and masks alike,
so a mask drawn on the image as a viewer shows it fits the decoded image.

Size limit: any image over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused before its pixels
are decoded, TIFF included (a small compressed file can expand to gigabytes), with one
``AlsegError`` rather than Pillow's ``DecompressionBombWarning``.
"""
from __future__ import annotations

import re
import threading
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alseg.errors import AlsegError

NONBINARY_TOLERANCE = 0.01
_TIFF = {".tif", ".tiff"}
# Pillow modes that read_image returns as one plane; every other mode (RGB, RGBA, P, CMYK, ...) becomes RGB.
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# Image.open warns through the process-wide warnings filters; the lock keeps this module's
# temporary filter (see _open_pil) from interleaving between decoding threads.
_PIL_OPEN_LOCK = threading.Lock()
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation tag of an opened image (1, upright, when absent or unreadable)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block is no reason to refuse the pixels
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn what Pillow and tifffile raise for a bad file into a one-line :class:`AlsegError`."""
    try:
        yield
    except AlsegError:
        raise
    except FileNotFoundError:
        if path.is_symlink():
            raise AlsegError("broken symbolic link (its target does not exist)", path) from None
        raise AlsegError("file not found", path) from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError,
            zlib.error) as exc:  # zlib: a deflate-compressed TIFF cut short
        raise AlsegError(f"unreadable image ({_short(exc, path)})", path) from None
    except Exception as exc:  # tifffile raises its own types for corrupt files
        if type(exc).__module__.startswith("tifffile"):
            raise AlsegError(f"unreadable image ({_short(exc, path)})", path) from None
        raise


def _check_pixels(width: int, height: int, path: Path, planes: int = 1) -> None:
    """Refuse an image over ``PIL.Image.MAX_IMAGE_PIXELS`` (None disables), for every format alike."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height * planes > limit:
        dims = f"{width} x {height}" + (f" x {planes} pages" if planes > 1 else "")
        raise AlsegError(f"image is {dims} pixels, over the limit of {limit} (decompression-bomb guard)", path)


def _open_pil(path: Path) -> Image.Image:
    """``Image.open`` (header only) with the pixel limit enforced here, and no warning escaping.

    Pillow warns between 1x and 2x ``MAX_IMAGE_PIXELS`` and raises above 2x; alseg refuses
    anything over 1x with one message instead.
    """
    with _PIL_OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:  # over 2x the limit: Pillow refused it itself
            size = _bomb_size(exc)
            if size is not None:
                _check_pixels(*size, path)
            found = re.search(r"\((\d+) pixels\)", str(exc))
            count = found.group(1) if found else "too many"
            raise AlsegError(f"image is {count} pixels, over the limit of {Image.MAX_IMAGE_PIXELS} "
                             "(decompression-bomb guard)", path) from None
    try:
        _check_pixels(*im.size, path)
    except AlsegError:
        im.close()
        raise
    return im


def _bomb_size(exc: BaseException) -> tuple[int, int] | None:
    """The ``(width, height)`` Pillow's size check refused (its message gives only the product)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    size = tb.tb_frame.f_locals.get("size") if tb is not None else None
    if isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return size
    return None


def _tiff_geometry(tif, path: Path) -> tuple[int, int, tuple[int, ...]]:
    """``(width, height, shape)`` of the array ``tifffile.imread`` would return, pixel limit checked."""
    page = tif.pages[0]
    shape = tuple(int(n) for n in tif.series[0].shape)
    width, height = int(page.imagewidth), int(page.imagelength)
    planes = max(1, int(np.prod(shape, dtype=np.int64)) // max(1, width * height * int(page.samplesperpixel)))
    _check_pixels(width, height, path, planes)
    return width, height, shape


def _shape_channels(shape: tuple[int, ...]) -> int | None:
    """Channels :func:`read_image` gives an array of ``shape`` (see :func:`_to_hwc`), None if unsupported."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        c = shape[0] if shape[0] <= 4 and shape[2] > 4 else shape[2]
        return 3 if c == 4 else c if c in (1, 3) else None
    return None


def read_header(path: str | Path) -> tuple[int, int, int]:
    """``(width, height, channels)`` of an image from its header, without decoding the pixels.

    ``channels`` is what :func:`read_image` would return (1 grey, 3 colour). Oversized images
    are refused here as in :func:`read_image`.
    """
    path = Path(path)
    with _reading(path):
        if path.suffix.lower() in _TIFF:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                width, height, shape = _tiff_geometry(tif, path)
            channels = _shape_channels(shape)
            if channels is None:
                raise AlsegError(f"unsupported image shape {shape}", path)
        else:
            with _open_pil(path) as im:
                (width, height), channels = im.size, 1 if im.mode in _GREY_MODES else 3
                if _orientation(im) in _TRANSPOSED:
                    width, height = height, width
    return width, height, channels


def _read_raw(path: Path) -> np.ndarray:
    with _reading(path):
        if path.suffix.lower() in _TIFF:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                _tiff_geometry(tif, path)  # before decoding: a small file can hold a huge image
                arr = np.asarray(tif.asarray())
        else:
            with _open_pil(path) as im:
                im.load()
                if _orientation(im) != 1:
                    im = ImageOps.exif_transpose(im)
                if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "LA", "1"):
                    im = im.convert("RGB" if im.mode not in ("LA", "1") else "L")
                arr = np.asarray(im)
    if arr.size == 0:
        raise AlsegError("image has no pixels", path)
    return arr


def _short(exc: BaseException, path: Path | None = None) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if path is not None:  # the error line names the file already
        text = text.replace(f" '{path}'", "").replace(f" {path}", "").replace(str(path), "the file")
    return text[:120]


def _to_hwc(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        if arr.shape[0] <= 4 and arr.shape[2] > 4:  # channels-first TIFF
            arr = np.moveaxis(arr, 0, 2)
        if arr.shape[2] == 4:  # drop alpha
            arr = arr[:, :, :3]
        if arr.shape[2] in (1, 3):
            return arr
    raise AlsegError(f"unsupported image shape {arr.shape}", path)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    # 16-bit or float images: stretch each image's own range to 0..255
    a = arr.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip((a - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an ``(H, W, C)`` uint8 array, C being 1 (grey) or 3."""
    path = Path(path)
    return _to_uint8(_to_hwc(_read_raw(path), path))


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file to an ``(H, W)`` bool array, rejecting masks that are not binary."""
    path = Path(path)
    arr = _read_raw(path)
    if arr.ndim == 3:
        arr = _to_hwc(arr, path)
        if arr.shape[2] > 1 and not all(np.array_equal(arr[:, :, 0], arr[:, :, c]) for c in range(1, arr.shape[2])):
            raise AlsegError("mask has colour channels that differ; expected a single-channel 0/255 mask", path)
        arr = arr[:, :, 0]
    if arr.dtype == bool:
        return arr
    values = np.unique(arr)
    if np.all(np.isin(values, (0, 1))) or np.all(np.isin(values, (0, 255))):
        return arr > 0
    if arr.dtype == np.uint8 and values.max() == 255:
        between = np.count_nonzero((arr > 0) & (arr < 255)) / arr.size
        if between <= NONBINARY_TOLERANCE:
            return arr >= 128
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise AlsegError(f"mask is not binary (values {shown}); expected 0/255 or 0/1", path)


def png_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (H x W or H x W x 3 uint8) encoded as PNG."""
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
