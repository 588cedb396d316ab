"""The decoded-pixel cache: each dataset decoded once into uint8 ``.npy`` memmaps.

Owns the working-size arrays every later stage reads. Images are resized with Pillow's
antialiased bilinear filter (area-like when shrinking), masks with nearest neighbour and
then binarised. The cache folder is keyed by a fingerprint of the source files (paths,
sizes, mtimes), the working size and the channel count, so it is reused across runs and
rebuilt when any input changes (a volume's slices: every channel file, the slice and its
axis). Samples are decoded through :mod:`alseg.data.samples`, so volume slices arrive already
normalised per volume. It is built in a temporary folder and renamed into place
only when every file decoded, so a failed read leaves nothing behind.

A cache folder is checked when opened (``meta.json`` parses and carries this version and the
full fingerprint; the ``.npy`` files have the shapes and byte sizes ``meta.json`` implies). A
damaged one (truncated by a full disk, edited by hand) is removed and rebuilt, which is
reported through the ``note`` callable. Temporary ``.building-<pid>@<host>-*`` folders left by
a killed build on this host (their process is gone) are removed before the next build.

Default location: ``$ALSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/alseg``, else ``~/.cache/alseg``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from alseg.data.samples import sample_header, sample_image, sample_mask
from alseg.data.sources import Dataset
from alseg.data.volumes import volume_version
from alseg.errors import AlsegError

CACHE_VERSION = 4  # 3: meta.json carries the full fingerprint, checked on open; 4: EXIF orientation, chunk checksums
CHECK_CHUNK = 16 * 1024 * 1024  # bytes per checksum of a cache file
ProgressFn = Callable[[int, int], None]
NoteFn = Callable[[str], None]
_BUILDING = re.compile(r"^\.building-(?P<pid>\d+)@(?P<host>[^-]*)-")
LEGACY_BUILD_AGE_S = 3600  # .building-* folders without an owner (older alseg) are stale after this


def default_cache_dir() -> Path:
    if os.environ.get("ALSEG_CACHE_DIR"):
        return Path(os.environ["ALSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alseg"


@dataclass
class CachedData:
    """Working-size pixels of a dataset plus per-sample facts, aligned by index.

    ``images`` is ``(N, S, S, C)`` uint8, ``masks`` ``(N, S, S)`` uint8 in {0, 1} (all zero
    where ``has_mask`` is False). ``positive`` says whether the mask at native size has any
    foreground (a tiny lesion can vanish at a small working size). ``orig_sizes`` holds each source image's (width, height).
    """

    ids: list[str]
    images: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    positive: np.ndarray
    groups: list[str | None]
    subsets: list[str | None]
    orig_sizes: list[tuple[int, int]]
    size: int
    channels: int
    path: Path

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        lookup = {sid: i for i, sid in enumerate(self.ids)}
        return np.array([lookup[i] for i in ids], dtype=np.int64)


def fingerprint(dataset: Dataset, size: int, channels: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, dataset.format, size, channels]).encode())
    versions: dict[tuple, bytes] = {}
    for s in dataset.samples:
        for p in (s.image, s.mask):
            if p is None:
                h.update(b"-")
                continue
            try:
                st = p.stat()
            except OSError:
                raise AlsegError("file not found", p) from None
            h.update(os.fsencode(p) + f"|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(f"{s.id}|{s.group}|{s.subset}".encode("utf-8", "surrogateescape"))
        if s.slice is not None:  # only for volume slices, so 2D datasets keep their existing caches
            # every file of the volume (each channel file, each file of a DICOM series: a folder's own
            # mtime misses a slice rewritten in place), once per volume however many slices it has
            if s.image_files not in versions:
                versions[s.image_files] = repr(volume_version(s.image_files)).encode("utf-8", "surrogateescape")
            h.update(versions[s.image_files] + f"|slice {s.axis} {s.slice}".encode())
    return h.hexdigest()


def infer_channels(dataset: Dataset) -> int:
    """3 when any image is colour (ISIC RGB, LGG's three MRI channels), 1 only when all are grey;
    for volumes, their channel count (the same for every volume, any number).

    Reads image headers only (no pixels), stopping at the first colour image; grey images in a
    colour dataset are widened to 3 channels by :func:`fit_image`.
    """
    if dataset.volumes:
        return dataset.volumes[0].channels
    for sample in dataset.samples:
        if sample_header(sample)[2] == 3:
            return 3
    return 1


def mask_to_size(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary mask at ``size`` x ``size`` as uint8 0/1 (nearest neighbour on 0/255)."""
    mask = np.asarray(mask)
    if mask.shape == (size, size):
        return (mask > 0).astype(np.uint8)
    img = Image.fromarray((mask > 0).astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return (np.asarray(img) >= 128).astype(np.uint8)


def map_to_size(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float working-size map (probability, variance) at ``width`` x ``height``, bilinear."""
    if plane.shape == (height, width):
        return plane.astype(np.float32)
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))


def fit_image(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """An ``(H, W, C)`` uint8 image at the working size: ``(size, size, channels)`` uint8.

    Grey becomes ``channels`` planes by repeating the plane, several channels become grey by the
    rounded channel mean (any other change of channel count is refused); then each plane is resized with Pillow's antialiased bilinear filter (skipped when the
    image already has the working size). Training, evaluation and prediction all see pixels
    prepared by this one function.
    """
    if img.shape[2] != channels:
        if img.shape[2] == 1:
            img = np.repeat(img, channels, axis=2)
        elif channels == 1:
            img = img.mean(axis=2, keepdims=True).round().astype(np.uint8)
        else:
            raise AlsegError(f"image has {img.shape[2]} channels; the model takes {channels}")
    if img.shape[:2] != (size, size):
        planes = [np.asarray(Image.fromarray(img[:, :, c]).resize((size, size), Image.BILINEAR)) for c in range(channels)]
        img = np.stack(planes, axis=2)
    return img


def _decode(sample, size: int, channels: int):
    img = sample_image(sample)
    h, w = img.shape[:2]
    mask, positive = None, False
    if sample.mask is not None:
        m = sample_mask(sample)
        if m.shape != (h, w):
            raise AlsegError(f"mask is {m.shape[1]}x{m.shape[0]} but its image is {w}x{h}", sample.mask)
        positive = bool(m.any())  # at native size: a tiny lesion may vanish when shrunk
        mask = mask_to_size(m, size).astype(bool)
    return fit_image(img, size, channels), mask, positive, (w, h)


def load_cached(dataset: Dataset, size: int, channels: int | None = None, cache_dir: str | Path | None = None,
                progress: ProgressFn | None = None, workers: int = 4, note: NoteFn | None = None) -> CachedData:
    """Return the dataset's pixels at ``size`` x ``size``, decoding only when no valid cache exists.

    A damaged cache folder is rebuilt, and stale partial builds are removed; both are told to
    ``note`` (one line each) when given.
    """
    if size < 8:
        raise AlsegError(f"working size must be at least 8 pixels, got {size}")
    channels = channels or infer_channels(dataset)
    fp = fingerprint(dataset, size, channels)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"{dataset.format}-{size}px-{channels}ch-{fp[:20]}"
    if final.exists() or final.is_symlink():
        try:
            return _open(final, fp, len(dataset.samples))
        except _Damaged as exc:
            if note:
                note(f"cache {final} is damaged ({exc}); rebuilding it")
            _discard(final)
    _build(dataset, size, channels, fp, final, progress, workers, note)
    try:
        return _open(final, fp, len(dataset.samples))
    except _Damaged as exc:  # just built and already unusable: the disk, or another process, at fault
        raise AlsegError(f"the pixel cache just built is unusable ({exc}); check the disk and try again",
                         final) from None


class _Damaged(Exception):
    """A cache folder that cannot be used as it is (the message says why)."""


def _discard(folder: Path) -> None:
    """Remove a damaged cache folder: first renamed aside (atomic), so no reader meets it half-deleted."""
    aside = folder.parent / f".damaged-{uuid.uuid4().hex[:12]}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process removed it already
        return
    except OSError:
        aside = folder
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_builds(root: Path, note: NoteFn | None = None) -> list[Path]:
    """Remove ``.building-*`` folders of builds that died: started on this host by a process
    that no longer runs, or (no owner in the name: older alseg) untouched for an hour.
    Builds of other hosts sharing the folder are left alone, since their processes cannot be
    seen from here. Leftover ``.damaged-*`` folders go too. Returns the builds removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    host, now = _host(), time.time()
    for d in root.iterdir():
        if d.name.startswith(".damaged-") and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)  # set aside by _discard; its removal was cut short
            continue
        if not d.name.startswith(".building-") or not d.is_dir() or d.is_symlink():
            continue
        m = _BUILDING.match(d.name)
        try:
            if m:
                stale = m.group("host") == host and int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid")))
            else:
                stale = now - d.stat().st_mtime > LEGACY_BUILD_AGE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
                if note:
                    note(f"removed {d}, left by an interrupted cache build")
    return removed


def _build(dataset: Dataset, size: int, channels: int, fp: str, final: Path, progress, workers: int,
           note: NoteFn | None = None) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(final.parent, note)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}@{_host()}-", dir=final.parent))
    try:
        n = len(dataset.samples)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, channels))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
        orig: list[tuple[int, int]] = [(0, 0)] * n
        positive = np.zeros(n, bool)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # Pillow and tifffile release the GIL while decoding, so threads overlap the I/O and codecs.
            for i, (img, mask, pos, wh) in enumerate(pool.map(lambda s: _decode(s, size, channels), dataset.samples)):
                images[i] = img
                positive[i] = pos
                if mask is not None:
                    masks[i] = mask
                orig[i] = wh
                if progress:
                    progress(i + 1, n)
        images.flush()
        masks.flush()
        del images, masks
        meta = {
            "version": CACHE_VERSION, "fingerprint": fp, "format": dataset.format, "size": size, "channels": channels,
            "ids": [s.id for s in dataset.samples],
            "has_mask": [s.mask is not None for s in dataset.samples],
            "positive": positive.tolist(),
            "groups": [s.group for s in dataset.samples],
            "subsets": [s.subset for s in dataset.samples],
            "orig_sizes": orig,
            "checksums": {name: _checksums(tmp / name) for name in ("images.npy", "masks.npy")},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # another process did not win the race: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AlsegError("disk full while building the pixel cache; nothing was kept (free space or "
                             "set ALSEG_CACHE_DIR / --cache-dir elsewhere)", final.parent) from None
        raise


def _checksums(path: Path) -> list[int]:
    """CRC-32 of each ``CHECK_CHUNK`` of a file: a cache file changed in place, at the same size, shows."""
    import zlib

    sums = []
    with path.open("rb") as fh:
        while chunk := fh.read(CHECK_CHUNK):
            sums.append(zlib.crc32(chunk))
    return sums


def _npy(path: Path, shape: tuple[int, ...], checksums: list[int] | None = None) -> np.ndarray:
    """Memory-map ``path``, raising :class:`_Damaged` unless it is a whole uint8 array of ``shape``."""
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise _Damaged(f"{path.name} has .npy format version {version}, not one alseg writes")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            stored, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if tuple(stored) != shape or dtype != np.uint8 or fortran:
            raise _Damaged(f"{path.name} holds {dtype} {tuple(stored)}, expected uint8 {shape}")
        expected = offset + int(np.prod(shape, dtype=np.int64))
        actual = path.stat().st_size
        if actual != expected:
            raise _Damaged(f"{path.name} is {actual} bytes, expected {expected}")
        if checksums is not None and _checksums(path) != checksums:
            raise _Damaged(f"{path.name} was changed after it was built (checksums differ)")
        return np.load(path, mmap_mode="r")
    except _Damaged:
        raise
    except FileNotFoundError:
        raise _Damaged(f"{path.name} is missing") from None
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise _Damaged(f"{path.name} is unreadable: {str(exc)[:80]}") from None


def _open(folder: Path, fp: str, n: int) -> CachedData:
    """The cache in ``folder``, checked against the fingerprint ``fp`` and ``n`` samples (else :class:`_Damaged`)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damaged("meta.json is missing") from None
    except (OSError, ValueError) as exc:
        raise _Damaged(f"meta.json is unreadable: {str(exc)[:80]}") from None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fp:
        raise _Damaged("meta.json does not match this dataset and alseg version")
    try:
        size, channels = int(meta["size"]), int(meta["channels"])
        lists = {k: meta[k] for k in ("ids", "has_mask", "positive", "groups", "subsets", "orig_sizes")}
        if any(not isinstance(v, list) or len(v) != n for v in lists.values()):
            raise _Damaged(f"meta.json does not list {n} samples")
        orig_sizes = [(int(w), int(h)) for w, h in meta["orig_sizes"]]
        sums = {k: [int(c) for c in meta["checksums"][k]] for k in ("images.npy", "masks.npy")}
    except (KeyError, TypeError, ValueError) as exc:
        raise _Damaged(f"meta.json lacks or mangles {exc}") from None
    return CachedData(
        ids=meta["ids"],
        images=_npy(folder / "images.npy", (n, size, size, channels), sums["images.npy"]),
        masks=_npy(folder / "masks.npy", (n, size, size), sums["masks.npy"]),
        has_mask=np.array(meta["has_mask"], bool),
        positive=np.array(meta["positive"], bool),
        groups=meta["groups"],
        subsets=meta["subsets"],
        orig_sizes=orig_sizes,
        size=size,
        channels=channels,
        path=folder,
    )
