"""COCO instances JSON: masks out as run-length encoded objects, and back in.

Owns the COCO side of an export (``annotations.json``, ``predictions.json``) and reading a COCO
annotations file back into masks; the files around them are :mod:`alseg.annotate.exchange`'s.

One category, :data:`CATEGORY` (id 1). A mask becomes one annotation per connected component
(8-connected), so that tools that count or train on objects see each lesion as one; its
``segmentation`` is COCO's compressed RLE (``pycocotools.mask.encode``: ``{"size": [h, w],
"counts": str}``), which keeps the mask pixel for pixel where polygons would not (holes, one-pixel
details), with ``area`` (pixels), ``bbox`` (``[x, y, width, height]``) and ``iscrowd: 0``. The
spec pairs RLE with ``iscrowd: 1``, but trainers (detectron2, MMDetection) ignore crowd regions,
and ``pycocotools`` reads an RLE whatever ``iscrowd`` says. An image whose mask is empty is listed
with no annotation. Predictions (``predictions.json``) are the same structure with a ``score``
on each annotation: 1.0, since the exported prediction is the thresholded mean of the model's
passes, not a probability, with the image's pool uncertainty (MC variance) as ``alseg_variance``.

Reading takes every image of the file (an image without annotations is an empty mask) and
unites its annotations: compressed or uncompressed RLE or polygons. Compressed RLE is checked
here before ``pycocotools`` decodes it (its counts must cover exactly ``height x width``
pixels), so a malformed file is one error, never a crash. With several categories, only the one
named :data:`CATEGORY` counts; several without it are refused.
"""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np

from alseg.errors import AlsegError

CATEGORY = "lesion"
CATEGORY_ID = 1
PREDICTION_SCORE = 1.0
MAX_ANNOTATIONS_PER_IMAGE = 100  # the cap on a file's annotations is this times its image cap


def _decode(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` as a bool mask, without its NumPy 2 deprecation warning."""
    import warnings

    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of a bool mask, JSON-ready (``counts`` as str)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of ``mask``, each a bool mask of the same size, in label order."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), int))
    return [labels == k for k in range(1, n + 1)]


def annotations_of(mask: np.ndarray, image_id: int, first_id: int, score: float | None = None,
                   extra: dict | None = None) -> list[dict]:
    """One COCO annotation per connected component of ``mask``, numbered from ``first_id``."""
    from pycocotools import mask as mask_utils

    out = []
    for k, part in enumerate(components(mask)):
        rle = encode_mask(part)
        raw = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        ann = {"id": first_id + k, "image_id": image_id, "category_id": CATEGORY_ID, "segmentation": rle,
               "area": int(mask_utils.area(raw)), "bbox": [float(v) for v in mask_utils.toBbox(raw)],
               "iscrowd": 0}
        if score is not None:
            ann["score"] = score
        out.append({**ann, **(extra or {})})
    return out


def dataset(images: list[dict], masks: list[np.ndarray], *, predictions: bool = False,
            extras: list[dict] | None = None, description: str = "alseg export") -> dict:
    """A COCO instances dict: ``images`` (each ``{"file_name", "width", "height", ...}``, ids given
    here from 1) with their ``masks`` as annotations (scored when ``predictions``)."""
    coco_images, annotations = [], []
    for k, (image, mask) in enumerate(zip(images, masks), start=1):
        coco_images.append({"id": k, **image})
        extra = extras[k - 1] if extras else None
        annotations += annotations_of(mask, k, len(annotations) + 1, PREDICTION_SCORE if predictions else None, extra)
    return {"info": {"description": description, "version": "1.0"}, "licenses": [], "images": coco_images,
            "annotations": annotations,
            "categories": [{"id": CATEGORY_ID, "name": CATEGORY, "supercategory": CATEGORY}]}


# --- reading ------------------------------------------------------------------------------------
def rle_counts(text: str, where: str) -> list[int]:
    """The run lengths a compressed COCO RLE string holds (COCO's 6-bit-per-character packing:
    5 value bits and a continuation bit per character, offset by 48; from the third count on,
    each is stored as its difference from the count two before)."""
    counts: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise AlsegError("an RLE's counts end in the middle of a number", where)
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise AlsegError("an RLE's counts hold a character outside COCO's alphabet", where)
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # a negative difference
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _check_counts(counts: list[int], h: int, w: int, where: str) -> None:
    if any(c < 0 for c in counts):
        raise AlsegError("an RLE holds a negative run", where)
    total = sum(counts)
    if total != h * w:
        raise AlsegError(f"RLE length mismatch: its runs cover {total} pixels, the image {w} x {h} has {h * w}",
                         where)


def decode_segmentation(seg: Any, h: int, w: int, where: str) -> np.ndarray:
    """An annotation's ``segmentation`` (RLE, compressed or not, or polygons) as a bool mask."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if size is not None and list(size) != [h, w]:
            raise AlsegError(f"an RLE's size {size} is not its image's [{h}, {w}]", where)
        if isinstance(counts, str):
            _check_counts(rle_counts(counts, where), h, w, where)
            rle = {"size": [h, w], "counts": counts.encode("ascii")}
        elif isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            _check_counts(counts, h, w, where)
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        else:
            raise AlsegError("an RLE's counts are neither a string nor a list of integers", where)
        return _decode(rle)
    if isinstance(seg, list):
        polygons = []
        for poly in seg:
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly)):
                raise AlsegError("a polygon is not a list of at least three x, y pairs", where)
            polygons.append([float(v) for v in poly])
        if not polygons:
            return np.zeros((h, w), bool)
        return _decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
    raise AlsegError("an annotation has no segmentation (RLE or polygons)", where)


def masks_from_coco(doc: Any, where: str, *, max_entries: int) -> dict[str, np.ndarray]:
    """``{image file stem: bool mask}`` from a COCO instances dict."""
    from PIL import Image

    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("annotations"), list):
        raise AlsegError("not a COCO annotations file (no 'images' and 'annotations' lists)", where)
    images, annotations = doc["images"], doc["annotations"]
    if len(images) > max_entries:
        raise AlsegError(f"holds {len(images)} images, more than the {max_entries} one file may bring", where)
    if len(annotations) > max_entries * MAX_ANNOTATIONS_PER_IMAGE:
        raise AlsegError(f"holds {len(annotations)} annotations, more than the "
                         f"{max_entries * MAX_ANNOTATIONS_PER_IMAGE} one file may bring", where)
    wanted = _wanted_category(doc.get("categories"), annotations, where)
    by_id: dict[Any, tuple[str, np.ndarray]] = {}
    names: set[str] = set()
    for image in images:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise AlsegError("an image has no id or file_name", where)
        w, h = image.get("width"), image.get("height")
        if not (isinstance(w, int) and isinstance(h, int)) or w <= 0 or h <= 0:
            raise AlsegError(f"image {image['file_name']!r} has no size (width / height)", where)
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise AlsegError(f"image {image['file_name']!r} is {w} x {h} pixels, over the limit of "
                             f"{Image.MAX_IMAGE_PIXELS}", where)
        name = PurePosixPath(image["file_name"].replace("\\", "/")).stem
        if not name or name in names:
            raise AlsegError(f"two images (or none) are named {name!r}", where)
        if image["id"] in by_id:
            raise AlsegError(f"two images have the id {image['id']!r}", where)
        names.add(name)
        by_id[image["id"]] = (name, np.zeros((h, w), bool))
    for ann in annotations:
        if not isinstance(ann, dict) or ann.get("image_id") not in by_id:
            raise AlsegError("an annotation names no image of the file", where)
        if wanted is not None and ann.get("category_id") != wanted:
            continue
        name, mask = by_id[ann["image_id"]]
        mask |= decode_segmentation(ann.get("segmentation"), *mask.shape, where)
    return dict(by_id.values())


def _wanted_category(categories: Any, annotations: list, where: str) -> Any:
    """None: every annotation is the lesion; else the category id that is."""
    used = {a.get("category_id") for a in annotations if isinstance(a, dict)}
    if len(used) <= 1:
        return None
    named = [c.get("id") for c in categories or [] if isinstance(c, dict)
             and str(c.get("name", "")).lower() == CATEGORY]
    if len(named) == 1:
        return named[0]
    raise AlsegError(f"annotations use {len(used)} categories; alseg segments one class: keep one, or name "
                     f"it {CATEGORY!r}", where)
