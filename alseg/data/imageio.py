"""Decoding one image or mask file into a validated NumPy array.

Owns the pixel-level rules every reader shares: which files open, how 16-bit or float
images become uint8, and when a mask counts as binary.

Mask tolerance: a mask is binary when its values are a subset of {0, 1} or {0, 255}.
A 0..255 mask may also carry up to 1 % of pixels strictly between 0 and 255 (anti-aliased
edges from resampling or JPEG); those are binarised at >= 128. Anything else (label maps
such as {0, 1, 2}, soft probability maps) is rejected. Colour masks are accepted only when
their channels are equal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from alseg.errors import AlsegError

NONBINARY_TOLERANCE = 0.01
_TIFF = {".tif", ".tiff"}


def _read_raw(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "LA", "1"):
                    im = im.convert("RGB" if im.mode not in ("LA", "1") else "L")
                arr = np.asarray(im)
    except AlsegError:
        raise
    except FileNotFoundError:
        raise AlsegError("file not found", path) from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise AlsegError(f"unreadable image ({_short(exc, path)})", path) from None
    except Exception as exc:  # tifffile raises its own types for corrupt files
        if type(exc).__module__.startswith("tifffile"):
            raise AlsegError(f"unreadable image ({_short(exc, path)})", path) from None
        raise
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
