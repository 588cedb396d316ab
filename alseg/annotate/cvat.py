"""CVAT's "Segmentation mask 1.1" zip (Pascal VOC style): masks out, and back in.

Owns the zip's layout, its colours and reading one back; the files around it are
:mod:`alseg.annotate.exchange`'s. The zip CVAT imports (Actions > Upload annotations >
"Segmentation mask 1.1", into a task whose one label is named :data:`LABEL`) holds::

    labelmap.txt                      # label:color_rgb:parts:actions
    ImageSets/Segmentation/default.txt  # the image names, without extension, one a line
    SegmentationClass/NAME.png        # RGB: the label's colour on black (the background)
    SegmentationObject/NAME.png       # RGB: each object (8-connected component) its own colour

Colours follow the Pascal VOC colour map CVAT uses: background (0, 0, 0), the lesion class 1
(128, 0, 0); objects 1, 2, ... take the map's colours 1, 2, ... (components past 255 share
colour 255). ``NAME`` is the image's file name in the task, less its extension.

Reading takes ``SegmentationClass/``: a pixel is lesion when it has the colour ``labelmap.txt``
gives the one label that is not the background (or the label named :data:`LABEL` if there are
several); without a ``labelmap.txt``, any colour but black. A zip is refused before anything is
decompressed when it has too many entries, an entry's name could leave a folder (absolute,
``..``, backslashes, drive letters) or its declared sizes are too big or too compressed (a zip
bomb); an entry is then read no further than its declared size, and a mask no larger than the
pixel limit is decoded.
"""
from __future__ import annotations

import io
import re
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from alseg.errors import AlsegError

LABEL = "lesion"
BACKGROUND = "background"
LABELMAP = "labelmap.txt"
IMAGE_SET = "ImageSets/Segmentation/default.txt"
CLASS_DIR = "SegmentationClass"
OBJECT_DIR = "SegmentationObject"
MAX_MEMBER_BYTES = 256 << 20  # one mask PNG; a mask at Pillow's pixel limit compresses far below this
MAX_TOTAL_BYTES = 4 << 30
MAX_RATIO = 200  # declared size over compressed size, for members over 1 MiB (PNGs are compressed already)
_DRIVE = re.compile(r"^[A-Za-z]:")


def voc_colour(index: int) -> tuple[int, int, int]:
    """Colour ``index`` (0..255) of the Pascal VOC colour map: the bits of the index spread over R, G
    and B from the most significant bit down."""
    r = g = b = 0
    c = index
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


LABEL_COLOUR = voc_colour(1)


def labelmap_text() -> str:
    bg, fg = voc_colour(0), LABEL_COLOUR
    return ("# label:color_rgb:parts:actions\n"
            f"{BACKGROUND}:{bg[0]},{bg[1]},{bg[2]}::\n"
            f"{LABEL}:{fg[0]},{fg[1]},{fg[2]}::\n")


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def class_png(mask: np.ndarray) -> bytes:
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[np.asarray(mask, bool)] = LABEL_COLOUR
    return _png(rgb)


def object_png(mask: np.ndarray) -> bytes:
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), int))
    palette = np.array([voc_colour(k) for k in range(256)], np.uint8)
    return _png(palette[np.minimum(labels, 255)])


def write_zip(path: Path, items: list[tuple[str, np.ndarray]]) -> None:
    """The Segmentation mask 1.1 zip of ``items`` (name without extension, bool mask) at ``path``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(LABELMAP, labelmap_text())
        zf.writestr(IMAGE_SET, "".join(f"{name}\n" for name, _ in items))
        for name, mask in items:
            zf.writestr(f"{CLASS_DIR}/{name}.png", class_png(mask))
            zf.writestr(f"{OBJECT_DIR}/{name}.png", object_png(mask))


# --- reading ------------------------------------------------------------------------------------
def _check_name(name: str, where: str) -> None:
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\x00" in name or _DRIVE.match(name)
            or any(p in ("..", ".") for p in parts)):
        raise AlsegError(f"zip entry {name!r} could be written outside its folder (zip slip); refused", where)


def _check_members(infos: list[zipfile.ZipInfo], where: str, max_entries: int) -> None:
    if len(infos) > 2 * max_entries + 16:  # two masks an image, a few lists
        raise AlsegError(f"zip has {len(infos)} entries, more than one file may bring "
                         f"({max_entries} images)", where)
    total = 0
    for info in infos:
        _check_name(info.filename, where)
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > MAX_MEMBER_BYTES or (info.file_size > 1 << 20 and ratio > MAX_RATIO):
            raise AlsegError(f"zip entry {info.filename!r} would unpack to {info.file_size} bytes "
                             f"({ratio:.0f} x its packed size): a zip bomb? refused", where)
    if total > MAX_TOTAL_BYTES:
        raise AlsegError(f"zip would unpack to {total} bytes, over {MAX_TOTAL_BYTES}: refused", where)


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    with zf.open(info) as fh:
        data = fh.read(info.file_size + 1)  # never more than declared, whatever the stream holds
    if len(data) > info.file_size:
        raise AlsegError(f"zip entry {info.filename!r} holds more than its declared size; refused", where)
    return data


def _labelmap(text: str, where: str) -> dict[str, tuple[int, int, int]]:
    colours: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            rgb = tuple(int(v) for v in rest.split(":")[0].split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise AlsegError(f"labelmap.txt line {line!r} has no R,G,B colour", where)
        colours[name.strip()] = rgb  # type: ignore[assignment]
    return colours


def _lesion_colour(colours: dict[str, tuple[int, int, int]], where: str) -> tuple[int, int, int]:
    labels = {n: c for n, c in colours.items() if n.lower() != BACKGROUND}
    if len(labels) == 1:
        return next(iter(labels.values()))
    named = [c for n, c in labels.items() if n.lower() == LABEL]
    if named:
        return named[0]
    raise AlsegError(f"labelmap.txt has {len(labels)} labels ({', '.join(sorted(labels)) or 'none'}); alseg "
                     f"segments one class: keep one, or name it {LABEL!r}", where)


def _decode(data: bytes, name: str, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise AlsegError(f"mask {name!r} is {w} x {h} pixels, over the limit of {Image.MAX_IMAGE_PIXELS}",
                                 where)
            return np.asarray(im.convert("RGB"))
    except AlsegError:
        raise
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise AlsegError(f"mask {name!r} is not a readable image ({exc})", where) from None


def masks_from_zip(path: str | Path, *, max_entries: int) -> dict[str, np.ndarray]:
    """``{image name without extension: bool mask}`` from a Segmentation mask 1.1 zip."""
    where = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            return _masks(zf, where, max_entries)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise AlsegError(f"not a zip file, or a damaged one ({exc})", where) from None
    except (NotImplementedError, RuntimeError) as exc:  # unknown compression, encrypted entries
        raise AlsegError(f"zip cannot be read ({exc})", where) from None


def _masks(zf: zipfile.ZipFile, where: str, max_entries: int) -> dict[str, np.ndarray]:
    infos = zf.infolist()
    _check_members(infos, where, max_entries)
    masks = [i for i in infos if not i.is_dir() and i.filename.startswith(CLASS_DIR + "/")]
    if not masks:
        raise AlsegError("not a CVAT Segmentation mask 1.1 zip (no SegmentationClass/ masks)", where)
    if len(masks) > max_entries:
        raise AlsegError(f"zip holds {len(masks)} masks, more than the {max_entries} one file may bring", where)
    by_name = {i.filename: i for i in infos}
    colour = None
    if LABELMAP in by_name:
        try:
            text = _read(zf, by_name[LABELMAP], where).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise AlsegError("labelmap.txt is not UTF-8 text", where) from None
        colour = _lesion_colour(_labelmap(text, where), where)
    out: dict[str, np.ndarray] = {}
    for info in masks:
        relative = info.filename[len(CLASS_DIR) + 1:]
        if PurePosixPath(relative).suffix.lower() != ".png":
            raise AlsegError(f"mask {info.filename!r} is not a PNG", where)
        name = relative[: -len(PurePosixPath(relative).suffix)]
        rgb = _decode(_read(zf, info, where), info.filename, where)
        out[name] = np.all(rgb == colour, axis=2) if colour is not None else rgb.any(axis=2)
    return out
