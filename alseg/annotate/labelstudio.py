"""Label Studio's JSON tasks: brush masks out (annotations and predictions) and back in.

Owns Label Studio's brush RLE and its task JSON, nothing else of an export (the files around it
are :mod:`alseg.annotate.exchange`'s).

The brush RLE is the run-length packing Label Studio's editor uses (thi.ng ``rle-pack``): a bit
stream, most significant bit first, holding a 32-bit count of values, the word size less one (5
bits), four run-length field widths less one (4 bits each), then chunks: one bit (1 a run of one
repeated word, 0 that many literal words), two bits choosing one of the four widths, the run
length less one in that width, then the word(s). The values are the image's RGBA bytes, row by
row (``H x W x 4``); the mask is the alpha plane. :func:`encode_rle` makes the same bytes as
``label_studio_converter.brush.encode_rle`` (word size 8, widths 3, 4, 8 and 16, runs of one
written as a one-word literal, runs over 65,536 split, the stream padded with 1 to 8 zero bits);
it is written here rather than taken from ``label-studio-converter``, whose install pulls
pandas, nltk and lxml. :func:`decode_rle` reads any word size and widths. A decoded pixel counts
as lesion when its alpha is above 0, as Label Studio's own converter reads brush masks.

A task is ``{"data": {"image": URL, "alseg_id": ID}, "annotations": [...], "predictions": [...]}``
with one ``brushlabels`` region labelled :data:`LABEL` per mask, at the image's original size.
Reading an export back takes, per task, its ground-truth annotation if one is marked, else the
latest updated one that was not cancelled, and unites its ``brushlabels`` regions and its
``polygonlabels`` regions (points in percent of the image, filled). A task without such an
annotation is left out; a task whose chosen annotation has no region and whose image size the
file does not give is left out too (there is no size to make an empty mask at). The image's name
is the file name in its URL (``d=`` of ``/data/local-files/?d=...``, else the URL's path), less
the 8-character prefix Label Studio gives an uploaded file (``/data/upload/...``).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from typing import Any, Iterable
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from alseg.errors import AlsegError

LABEL = "lesion"
FROM_NAME = "tag"
TO_NAME = "image"
WORD_SIZE = 8
RUN_WIDTHS = (3, 4, 8, 16)
MAX_RUN = 1 << 16  # the longest run one chunk of the widest field holds
_MAX_UNCHECKED = 1 << 26  # values decode_rle unpacks without an expected count (64 MiB)
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")

LABEL_CONFIG = f"""<View>
  <Image name="{TO_NAME}" value="$image" zoom="true"/>
  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">
    <Label value="{LABEL}" background="rgba(255, 0, 0, 0.6)"/>
  </BrushLabels>
</View>
"""


# --- the RLE ------------------------------------------------------------------------------------
def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, values)`` of the runs of equal values in a 1-D array."""
    if values.size == 0:
        return np.zeros(0, np.int64), values
    ends = np.flatnonzero(values[1:] != values[:-1])
    ends = np.append(ends, values.size - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths, values[ends]


def encode_rle(values: Iterable[int]) -> list[int]:
    """Label Studio's brush RLE of ``values`` (each 0..255), as the list of bytes its JSON holds."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values).ravel()
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("brush RLE values are bytes (0..255)")
    fields = [f"{arr.size:032b}", f"{WORD_SIZE - 1:05b}"] + [f"{w - 1:04b}" for w in RUN_WIDTHS]
    for length, value in zip(*_runs(arr)):
        length, word = int(length), f"{int(value):08b}"
        if length == 1:  # a literal chunk of one word
            fields.append("0" + "00" + "000" + word)
            continue
        while length > MAX_RUN:
            fields.append("1" + "11" + f"{MAX_RUN - 1:016b}" + word)
            length -= MAX_RUN
        selector = next(k for k, w in enumerate(RUN_WIDTHS) if length <= 1 << w)
        fields.append("1" + f"{selector:02b}" + format(length - 1, f"0{RUN_WIDTHS[selector]}b") + word)
    bits = "".join(fields)
    bits += "0" * (8 - len(bits) % 8)  # as Label Studio's converter pads: a whole zero byte when aligned
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


class _BitReader:
    """Reads fields of a byte string, most significant bit first."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.total = len(data) * 8

    def read(self, n: int) -> int:
        if self.pos + n > self.total:
            raise EOFError
        start, end = self.pos >> 3, (self.pos + n + 7) >> 3
        chunk = int.from_bytes(self.data[start:end], "big")
        self.pos += n
        return (chunk >> (end * 8 - self.pos)) & ((1 << n) - 1)


def decode_rle(rle: Any, expected: int | None = None, where: str | None = None) -> np.ndarray:
    """The values a brush RLE holds; AlsegError(problem, where) when it is malformed or holds
    other than ``expected`` values (checked before anything is unpacked)."""
    try:
        data = bytes(rle)
    except (TypeError, ValueError):
        raise AlsegError("brush RLE is not a list of bytes (0..255)", where) from None
    bits = _BitReader(data)
    try:
        count = bits.read(32)
        word = bits.read(5) + 1
        widths = [bits.read(4) + 1 for _ in range(4)]
        if expected is not None and count != expected:
            raise AlsegError(f"RLE length mismatch: it holds {count} values, the image needs {expected} "
                             "(width x height x 4)", where)
        if expected is None and count > _MAX_UNCHECKED:
            raise AlsegError(f"brush RLE claims {count} values; give the image size to read it", where)
        out = np.zeros(count, np.uint8 if word <= 8 else np.uint32)
        i = 0
        while i < count:
            repeated = bits.read(1)
            j = i + 1 + bits.read(widths[bits.read(2)])
            if j > count:
                raise AlsegError(f"RLE runs past its {count} values", where)
            if repeated:
                out[i:j] = bits.read(word)
            else:
                out[i:j] = [bits.read(word) for _ in range(j - i)]
            i = j
    except EOFError:
        raise AlsegError("brush RLE ends before its values do (truncated)", where) from None
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A bool mask as Label Studio brush RLE (every RGBA byte 255 inside, 0 outside)."""
    return encode_rle(np.repeat(np.asarray(mask, bool).ravel().astype(np.uint8) * 255, 4))


def rle_to_mask(rle: Any, width: int, height: int, where: str | None = None) -> np.ndarray:
    values = decode_rle(rle, expected=width * height * 4, where=where)
    return values.reshape(height, width, 4)[:, :, 3] > 0


# --- tasks out ----------------------------------------------------------------------------------
def local_files_url(relative: str) -> str:
    """The URL Label Studio serves a file under its local-files document root by."""
    from urllib.parse import quote

    return "/data/local-files/?d=" + quote(relative, safe="/")


def brush_region(name: str, mask: np.ndarray) -> dict:
    """One ``brushlabels`` region of :data:`LABEL` covering ``mask`` (at the image's size)."""
    h, w = mask.shape
    return {"id": hashlib.sha1(name.encode("utf-8")).hexdigest()[:10], "type": "brushlabels",
            "from_name": FROM_NAME, "to_name": TO_NAME, "original_width": int(w), "original_height": int(h),
            "image_rotation": 0, "origin": "manual",
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [LABEL]}}


def task(id: str, url: str, *, mask: np.ndarray | None = None, prediction: np.ndarray | None = None,
         model_version: str | None = None, score: float | None = None, name: str | None = None) -> dict:
    """A Label Studio task for image ``url``: the expert's ``mask`` as its annotation, the model's
    ``prediction`` as its pre-annotation (either may be None)."""
    name = name or id
    shape = mask.shape if mask is not None else prediction.shape if prediction is not None else None
    out: dict = {"data": {"image": url, "alseg_id": id}}
    if shape is not None:  # lets a reader make the empty mask of an annotation left without regions
        out["data"].update(alseg_width=int(shape[1]), alseg_height=int(shape[0]))
    if mask is not None:
        out["annotations"] = [{"result": [brush_region(name, mask)], "ground_truth": False}]
    if prediction is not None:
        out["predictions"] = [{"model_version": model_version or "alseg", "score": score,
                               "result": [brush_region(name + "#prediction", prediction)]}]
    return out


# --- tasks in -----------------------------------------------------------------------------------
def image_name(url: str) -> str:
    """The file stem a task's image URL names (see the module's docstring)."""
    parsed = urlparse(url)
    path = parse_qs(parsed.query).get("d", [None])[0] or unquote(parsed.path)
    path = path.replace("\\", "/")
    stem = PurePosixPath(path).stem
    if parsed.path.startswith("/data/upload/"):
        stem = _UPLOAD_PREFIX.sub("", stem)
    return stem


def _chosen_annotation(annotations: list, where: str) -> dict | None:
    live = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not live:
        return None
    marked = [a for a in live if a.get("ground_truth")]
    pool = marked or live
    # the latest edit wins; without dates, the last in the list (Label Studio lists them as made)
    return max(enumerate(pool), key=lambda t: (str(t[1].get("updated_at") or ""), t[0]))[1]


def _region_labels(region: dict) -> list[str]:
    value = region.get("value") or {}
    return [str(v) for v in (value.get("brushlabels") or value.get("polygonlabels") or [])]


def _size(region: dict, where: str) -> tuple[int, int]:
    w, h = region.get("original_width"), region.get("original_height")
    if not (isinstance(w, int) and isinstance(h, int)) or w <= 0 or h <= 0:
        raise AlsegError("a region has no image size (original_width / original_height)", where)
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise AlsegError(f"a region's image is {w} x {h} pixels, over the limit of {Image.MAX_IMAGE_PIXELS}", where)
    return w, h


def _polygon(region: dict, w: int, h: int, where: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    points = (region.get("value") or {}).get("points")
    try:
        xy = [(float(x) * w / 100.0, float(y) * h / 100.0) for x, y in points]
    except (TypeError, ValueError):
        raise AlsegError("a polygon's points are not [x %, y %] pairs", where) from None
    canvas = Image.new("1", (w, h), 0)
    if len(xy) >= 3:
        ImageDraw.Draw(canvas).polygon(xy, fill=1, outline=1)
    return np.asarray(canvas, bool)


def masks_from_tasks(tasks: Any, where: str, *, max_entries: int) -> dict[str, np.ndarray]:
    """``{image name: bool mask}`` from a Label Studio JSON export (a list of tasks)."""
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise AlsegError("not a Label Studio JSON export (expected a list of tasks)", where)
    if len(tasks) > max_entries:
        raise AlsegError(f"holds {len(tasks)} tasks, more than the {max_entries} one file may bring", where)
    if tasks and not any("data" in t for t in tasks):
        raise AlsegError("tasks have no 'data' (a JSON-MIN export? export as 'JSON')", where)
    chosen: list[tuple[str, list[dict], dict]] = []
    labels: set[str] = set()
    for k, t in enumerate(tasks):
        data = t.get("data")
        if not isinstance(data, dict):
            raise AlsegError(f"task {k + 1} has no 'data'", where)
        url = data.get("image")
        if url is None:
            texts = [v for v in data.values() if isinstance(v, str)]
            url = texts[0] if len(texts) == 1 else None
        if not isinstance(url, str) or not url:
            raise AlsegError(f"task {k + 1} has no image URL (data.image)", where)
        annotations = t.get("annotations") or []
        if not isinstance(annotations, list):
            raise AlsegError(f"task {k + 1}: 'annotations' is not a list", where)
        annotation = _chosen_annotation(annotations, where)
        if annotation is None:
            continue  # not labelled in Label Studio
        regions = [r for r in annotation.get("result") or [] if isinstance(r, dict)
                   and str(r.get("type", "")).lower() in ("brushlabels", "polygonlabels")]
        for r in regions:
            labels.update(_region_labels(r))
        chosen.append((url, regions, data))
    wanted = _wanted_labels(labels, where)
    out: dict[str, np.ndarray] = {}
    for url, regions, data in chosen:
        name = image_name(url)
        if not name:
            raise AlsegError(f"cannot tell the image's name from its URL {url!r}", where)
        if name in out:
            raise AlsegError(f"two tasks name the image {name!r}", where)
        mask = None
        for r in regions:
            if wanted is not None and not set(_region_labels(r)) & wanted:
                continue
            w, h = _size(r, where)
            if mask is None:
                mask = np.zeros((h, w), bool)
            elif mask.shape != (h, w):
                raise AlsegError(f"regions of image {name!r} give two image sizes", where)
            if str(r["type"]).lower() == "brushlabels":
                value = r.get("value") or {}
                if value.get("format", "rle") != "rle" or "rle" not in value:
                    raise AlsegError(f"a brush region of {name!r} holds no RLE", where)
                mask |= rle_to_mask(value["rle"], w, h, where)
            else:
                mask |= _polygon(r, w, h, where)
        if mask is None:
            w, h = data.get("alseg_width"), data.get("alseg_height")
            if not (isinstance(w, int) and isinstance(h, int)):
                continue  # labelled as empty, but the file gives no size to make the empty mask at
            mask = np.zeros((h, w), bool)
        out[name] = mask
    return out


def _wanted_labels(labels: set[str], where: str) -> set[str] | None:
    """None: every region is the lesion; else the one label that is (alseg segments one class)."""
    if len(labels) <= 1:
        return None
    named = {lab for lab in labels if lab.lower() == LABEL}
    if named:
        return named
    raise AlsegError(f"regions carry several labels ({', '.join(sorted(labels))}); alseg segments one "
                     f"class: keep one label, or name it {LABEL!r}", where)
