"""Pixels of one :class:`~alseg.data.sources.Sample`, whatever it is: a 2D file or a volume's slice.

The one door later stages read samples through (the cache, the summary, exports): a 2D sample
goes to :mod:`alseg.data.imageio`, a volume slice (``sample.slice`` set) to
:mod:`alseg.data.volumes` (per-volume percentile normalisation, decoded volume cached in-process).
"""
from __future__ import annotations

import numpy as np

from alseg.data.imageio import read_header, read_image, read_mask
from alseg.data.sources import Sample
from alseg.data.volumes import image_slice, mask_slice, volume_geometry


def is_slice(sample: Sample) -> bool:
    """Whether ``sample`` is one slice of a volume (rather than a 2D image file)."""
    return sample.slice is not None


def sample_image(sample: Sample) -> np.ndarray:
    """The sample's image as ``(H, W, C)`` uint8 (C: 1 or 3 for 2D files; a volume's channel count)."""
    if is_slice(sample):
        return image_slice(sample.image_files, sample.axis, sample.slice)
    return read_image(sample.image)


def sample_mask(sample: Sample) -> np.ndarray | None:
    """The sample's mask as ``(H, W)`` bool, or None when it has none."""
    if sample.mask is None:
        return None
    if is_slice(sample):
        return mask_slice(sample.mask, sample.axis, sample.slice)
    return read_mask(sample.mask)


def sample_header(sample: Sample) -> tuple[int, int, int]:
    """``(width, height, channels)`` of :func:`sample_image`'s array, from headers only."""
    if is_slice(sample):
        shape, channels = volume_geometry(sample.image_files)
        rows, cols = (n for i, n in enumerate(shape) if i != sample.axis)
        return cols, rows, channels
    return read_header(sample.image)
