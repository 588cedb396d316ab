"""The review server: the expert's whole workplace for a project's batches, past and open.

``alseg serve PROJECT`` opens the project (holding its writer lock for the server's lifetime),
serves the page shipped in ``alseg/annotate/static/`` and a small JSON API. Every ``{id}`` route
takes ``?round=R`` (default: the latest batch) and finds the item in any exported round, so past
rounds can be reopened and corrected.

======  ==============================  =====================================================
GET     ``/api/batch``                  a batch (``?round=R``, default latest): round, progress,
                                        items and their URLs, ``rounds``, ``annotator``,
                                        ``job`` (the next round's worker), ``next_mode``
GET     ``/api/image/{id}``             the image (its real type: JPEG stays JPEG, else PNG);
                                        ``?max_side=N`` (N one of the app's ``preview_sides``,
                                        else 422): a JPEG of it at most N px on its long side,
                                        cached under ``rounds/RRR/previews/`` (the image itself
                                        when it is no larger)
GET     ``/api/thumb/{id}``             a JPEG at most 192 px on its long side, cached under
                                        ``rounds/RRR/thumbs/``
GET     ``/api/volume/{id}``            the volume the image is a slice of (:class:`VolumeIndex`):
                                        ``group``, ``slices`` in slice order (``id``, ``index``,
                                        ``in_batch``, ``labelled``, ``url``) and ``current`` (the
                                        image's place among them); ``group`` None and no slices for
                                        an image that is no volume's slice
GET     ``/api/predicted/{id}``         the model's predicted mask (0/255 PNG, original size)
GET     ``/api/uncertainty/{id}``       the uncertainty overlay (JPEG; PNG in older batches)
GET     ``/api/mask/{id}``              the stored expert mask (0/255 PNG; ``?version=N``), 404 if none
PUT     ``/api/mask/{id}``              store a mask: body PNG bytes; query ``seconds``,
                                        ``active_seconds``, ``strokes``, ``clicks``,
                                        ``allow_empty``, ``replace``; also POST. 409 with
                                        ``"confirm": true`` when it would replace another mask
POST    ``/api/undo/{id}``              withdraw the latest submit (the previous version is current)
GET     ``/api/history/{id}``           every stored version of the image's mask, who and when
POST    ``/api/skip/{id}``              record the expert's ``seconds`` on an image, not labelled
POST    ``/api/time/{id}``              record ``seconds`` of viewing (``action=view``)
POST    ``/api/next``                   train on the labelled batch and export the next (202)
GET     ``/api/job``                    that worker's state
GET     ``/api/status``                 the project's status (as ``alseg status --json``)
======  ==============================  =====================================================

Every GET route answers HEAD too (the same status and headers, no body), and an ``{id}`` may
hold any character, a newline included (``%0A``).

A volume's slice that no round has chosen (a neighbour the page shows for context) is served by
``/api/image/{id}`` (without ``?round``) from the project's own dataset: the slice's pixels
decoded as training reads them and encoded afresh (PNG, or a JPEG preview for ``max_side``),
never a file's bytes; any other id there is looked up in the batches as before.

Errors are JSON ``{"error": "..."}``: 4xx for the request, 503 when busy, 507 when the disk is
full (nothing stored), 500 for a bug (whose traceback is still logged). Safety: ids are looked up
in the batch (or, for a volume's slices, among the samples the project's store lists), never
joined into paths; only the files the batch's manifest records are served,
and only when they resolve inside the batch folder; every upload is size-capped (413 before it
is read whole) and validated by :meth:`alseg.project.Project.submit`, which stores it
atomically. Requests whose ``Origin`` is another site are refused (no cross-site submits); a
``Host`` that is not a plain ``name[:port]`` is refused (400), and on a loopback address so is
one for another name (DNS rebinding). With annotators (tokens, :mod:`alseg.annotate.auth`)
every request, to any path and with any method, needs a token and each submit is recorded under
its annotator's name; :func:`serve` requires them off loopback.

Bounds, so that slow or many clients cannot hold the server (:func:`create_app`,
:func:`server_config`): an upload's whole body must arrive within ``upload_deadline`` (408),
at most ``upload_slots`` upload bodies are received and stored at once (one more waits
``busy_wait`` seconds, then 503), and bodies are spooled to a nameless file in the project's
``.incoming/`` past ``spool_bytes`` rather than held in memory; a connection that sends no
complete request head within ``IDLE_SECONDS`` of opening (or of its last answer) is closed, and
past ``MAX_CONNECTIONS`` open connections new requests get 503. A client that goes away in the
middle of an upload is not an error: nothing is stored and nothing is logged.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import io
import math
import re
import socket
import sqlite3
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from alseg.annotate.auth import DEFAULT_ANNOTATOR, TokenGuard
from alseg.errors import AlsegError

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
UPLOAD_DEADLINE = 60.0  # seconds for an upload's whole body: a 20 MB mask over a slow link, with room
UPLOAD_SLOTS = 4  # upload bodies received and stored at once
BUSY_WAIT = 2.0  # seconds one more upload waits for a slot before it is told the server is busy
SPOOL_BYTES = 1024 * 1024  # an upload body past this goes to a nameless file in .incoming/, not memory
IDLE_SECONDS = 5.0  # a connection must send a request's head within this of opening or of its last answer
MAX_CONNECTIONS = 100  # open connections; past this uvicorn answers new requests 503
MAX_SECONDS = 24 * 3600.0  # one recorded stretch of expert time; more is a clock gone wrong
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                                 b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
]


class ApiError(Exception):
    """A refused request: rendered as ``{"error": ..., "id": ...}`` with ``status`` (and ``headers``)."""

    def __init__(self, status: int, error: str, id: str | None = None, extra: dict | None = None,
                 headers: dict | None = None):
        self.status, self.error, self.id, self.extra, self.headers = status, error, id, extra, headers


# an upload refused before its body was read whole: the rest of it must not be parsed as a next request
_CLOSE = {"Connection": "close"}


def _error(status: int, error: str, id: str | None = None, extra: dict | None = None,
           headers: dict | None = None) -> JSONResponse:
    body = {"error": error} if id is None else {"error": error, "id": id}
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store", **(headers or {})})


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the database's file system) is full."""
    if isinstance(exc, AlsegError):
        return exc.problem.startswith("disk full")
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


DISK_FULL = "disk full; nothing was stored (free space on the project's disk, then submit again)"


class _AnyText(Convertor):
    """A path parameter of any characters: Starlette's ``path`` (``.*``) stops at a newline."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", _AnyText())


class _Guard:
    """ASGI middleware: refuse malformed and foreign Host headers and cross-site writes; answer HEAD
    as GET without the body; add security headers."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None, check_origin: bool = True):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        self.check_origin = check_origin

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        name = _hostname(host)
        status, problem = 403, None
        if name is None:
            status, problem = 400, f"malformed Host header {host!r}"
        elif self.allowed is not None and name not in self.allowed:
            problem = f"host {host!r} is not served here (open the page at 127.0.0.1)"
        elif self.check_origin and scope["method"] not in ("GET", "HEAD", "OPTIONS") and "origin" in headers:
            origin = urlsplit(headers["origin"])
            if origin.netloc.lower() != host.lower():
                problem = "request from another site refused (open the review page itself)"
        head = scope["method"] == "HEAD"
        if head:  # routes are declared for GET; HEAD gets GET's status and headers
            scope = {**scope, "method": "GET"}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _SECURITY_HEADERS
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        if problem is not None:
            return await _error(status, problem)(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})))"
                   r"(?::(?P<port>[0-9]{1,5}))?")


def _hostname(host: str) -> str | None:
    """The name in a Host header, lower case and without its port (``[::1]:80`` -> ``::1``); ``""``
    for no Host; None when it is not a plain ``name[:port]`` (``a:1@b``, ``a/b``, spaces, a port
    that is not a number): such a Host is never compared with a name, so it cannot pass as one."""
    if host == "":
        return ""
    m = _HOST.fullmatch(host)
    if m is None or (m["port"] is not None and int(m["port"]) > 65535):
        return None
    return (m["v6"] or m["name"]).lower()


THUMB_SIDE = 192
THUMB_QUALITY = 80
# a display-sized copy of a large image: the page shows it while the screen has no more pixels for
# the image than it has (a 6000x4000 photo fitted in a window), so the browser decodes 2048x1365
# (11 MB RGBA) instead of 24 MP (96 MB); only zoomed in past it does it load the next size up
PREVIEW_SIDES = (1024, 2048, 4096)
PREVIEW_QUALITY = 90
_MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
NEXT_MODES = ("button", "auto")


SLICE_CACHE = 64  # encoded neighbour slices kept in memory (a few kB to a few hundred kB each)


class VolumeIndex:
    """The project's volumes: each volume's slices in slice order, read once from the project's dataset.

    A volume is a group of more than one sample with known slice positions: a NIfTI or DICOM
    volume's slices (``CASE/z042``), an LGG patient's numbered slices (``<patient>_<n>``). Other
    layouts (photos, plain folders, with or without ``groups.csv``) have none. Only samples the
    project's store lists count. A dataset that cannot be read (moved, unmounted) gives no
    volumes: the page then works as for photos. Thread-safe.
    """

    def __init__(self, project):
        self._project = project
        self._lock = threading.Lock()
        self._loaded = False
        self._samples: dict = {}  # id -> Sample, volume slices only
        self._group: dict[str, str] = {}  # id -> its volume
        self._slices: dict[str, list[tuple[int, str]]] = {}  # volume -> [(index, id)] in slice order
        self._encoded: dict = {}  # (id, max_side) -> (bytes, media type), oldest first

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            from alseg.data.sources import SLICED_LAYOUTS, open_recorded_dataset

            project = self._project
            info, known = project.data_info(), set(project.sample_ids())
            if info.get("format") not in SLICED_LAYOUTS or not info.get("path"):
                return
            try:  # cut along the axis the project recorded
                dataset = open_recorded_dataset(info)
            except (AlsegError, OSError):
                return
            samples = [(s, k) for s, k in zip(dataset.samples, dataset.slice_indices()) if s.id in known]
            groups: dict[str, list] = {}
            for sample, index in samples:
                if sample.group is not None:
                    groups.setdefault(sample.group, []).append((index, sample))
            for group, members in groups.items():
                if len(members) < 2:
                    continue
                members.sort(key=lambda m: (m[0], m[1].id))
                self._slices[group] = [(index, sample.id) for index, sample in members]
                for _, sample in members:
                    self._samples[sample.id] = sample
                    self._group[sample.id] = group

    def group_of(self, id: str) -> str | None:
        """The volume ``id`` is a slice of, or None."""
        self._load()
        return self._group.get(id)

    def sample(self, id: str):
        """The :class:`~alseg.data.sources.Sample` of the volume slice ``id``, or None."""
        self._load()
        return self._samples.get(id)

    def slices(self, group: str) -> list[tuple[int, str]]:
        """``(index, id)`` of every slice of ``group``, in slice order."""
        self._load()
        return list(self._slices.get(group, ()))

    def image(self, sample, max_side: int | None) -> tuple[bytes, str]:
        """The slice's pixels as the batch would show them (PNG; a JPEG at most ``max_side`` px on its
        long side when it is larger): ``(bytes, media type)``, the last ``SLICE_CACHE`` kept."""
        key = (sample.id, max_side)
        with self._lock:
            if key in self._encoded:
                self._encoded[key] = self._encoded.pop(key)  # most recently used last
                return self._encoded[key]
        import numpy as np
        from PIL import Image

        from alseg.annotate.export import display_pixels, jpeg_bytes
        from alseg.data.imageio import png_bytes
        from alseg.data.samples import sample_image

        pixels = display_pixels(sample_image(sample))
        height, width = pixels.shape[:2]
        if max_side is not None and max(width, height) > max_side:
            small = Image.fromarray(pixels).resize(preview_size(width, height, max_side), Image.LANCZOS)
            encoded = (jpeg_bytes(np.asarray(small), PREVIEW_QUALITY), "image/jpeg")
        else:
            encoded = (png_bytes(pixels), "image/png")
        with self._lock:
            self._encoded[key] = encoded
            while len(self._encoded) > SLICE_CACHE:
                self._encoded.pop(next(iter(self._encoded)))
        return encoded


def create_app(project, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               allowed_hosts: tuple[str, ...] | None = None, annotators=None,
               default_annotator: str = DEFAULT_ANNOTATOR, turnover=None, next_mode: str = "button",
               upload_deadline: float = UPLOAD_DEADLINE, upload_slots: int = UPLOAD_SLOTS,
               busy_wait: float = BUSY_WAIT, spool_bytes: int = SPOOL_BYTES,
               preview_sides: tuple[int, ...] = PREVIEW_SIDES) -> FastAPI:
    """The review app over an open :class:`alseg.project.Project` (which the caller closes).

    ``allowed_hosts``: the Host names served (``None``: any; :func:`serve` passes the loopback
    names when it binds a loopback address). ``annotators``: an :class:`alseg.annotate.auth.Annotators`
    (every request then needs a token) or ``None`` (every request is ``default_annotator``'s).
    ``turnover``: an :class:`alseg.annotate.turnover.Turnover` that makes the next round
    (``None``: the page cannot, and says to run ``alseg query`` with the server stopped).
    ``next_mode``: ``"button"`` (the expert starts the next round) or ``"auto"`` (the submit that
    completes the latest batch starts it).
    ``upload_deadline``: seconds for an upload's whole body (then 408); ``upload_slots``: upload
    bodies received and stored at once (one more waits ``busy_wait`` seconds, then 503);
    ``spool_bytes``: a body past this size is spooled to the project's ``.incoming/``.
    ``preview_sides``: the long sides (px) of the display-sized JPEGs offered for images larger
    than them (``/api/image/{id}?max_side=N``); ``()`` offers none (the page loads full images).
    """
    if next_mode not in NEXT_MODES:
        raise AlsegError(f"next_mode must be one of {', '.join(NEXT_MODES)}, not {next_mode!r}")
    if upload_slots < 1 or not upload_deadline > 0 or busy_wait < 0:
        raise AlsegError("upload_slots must be 1 or more, upload_deadline above 0 and busy_wait 0 or more")
    if any(not isinstance(side, int) or not 16 <= side <= 16384 for side in preview_sides):
        raise AlsegError(f"preview_sides must be whole numbers of pixels from 16 to 16384, not {preview_sides!r}")
    preview_sides = tuple(sorted(set(preview_sides)))
    slots: dict = {}  # the running event loop -> its semaphore (a test may serve one app from several loops)
    volumes = VolumeIndex(project)
    app = FastAPI(title="alseg review", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    # the last added runs first: Host and Origin are checked before the token
    app.add_middleware(TokenGuard, annotators=annotators, default_annotator=default_annotator)
    # with tokens, a write from another site carries none (the cookie is SameSite=Strict), so the
    # Origin check would only refuse the page itself behind a proxy that rewrites Host
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts, check_origin=annotators is None or not len(annotators))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.error, exc.id, exc.extra, exc.headers)

    @app.exception_handler(OSError)
    @app.exception_handler(sqlite3.Error)
    async def _storage_error(request: Request, exc: Exception):
        if _disk_full(exc):  # a thumbnail, a skip or an undo that found the disk full
            return _error(507, "disk full; nothing was changed (free space on the project's disk)")
        raise exc  # anything else is a bug: a 500 with its traceback logged

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        # the page reads every error as JSON; Starlette still logs the traceback after this answer
        return _error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    def annotator_of(request: Request) -> str:
        return getattr(request.state, "annotator", None) or default_annotator

    def job() -> dict | None:
        return turnover.state() if turnover is not None else None

    def lookup(id: str, round: int | None):
        try:
            return project.item(id, round=round)
        except AlsegError as exc:
            raise ApiError(404, exc.problem, id) from None

    def batch_path(id: str, kind: str, round: int | None) -> tuple[Path, object, object]:
        batch, item = lookup(id, round)
        name = getattr(item, kind)
        if not name:
            raise ApiError(404, f"this image has no {kind} file", id)
        folder = batch.folder.resolve()
        try:
            path = (folder / name).resolve(strict=True)
        except (OSError, RuntimeError):
            raise ApiError(404, f"the {kind} file is missing", id) from None
        if not path.is_relative_to(folder) or not path.is_file():
            raise ApiError(404, f"the {kind} file is not inside the batch folder", id)
        return path, batch, item

    def batch_file(id: str, kind: str, round: int | None) -> FileResponse:
        path, _, _ = batch_path(id, kind, round)
        media = _MEDIA.get(path.suffix.lower(), "application/octet-stream")
        # an exported batch's files never change; no-cache still revalidates (ETag) in case they do
        return FileResponse(path, media_type=media, headers={"Cache-Control": "private, no-cache"})

    def check_seconds(seconds: float | None, name: str = "seconds") -> float | None:
        if seconds is not None and not (math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS):
            raise ApiError(422, f"{name} must be a number from 0 to {MAX_SECONDS:.0f}")
        return seconds

    def check_count(value: int | None, name: str) -> int | None:
        if value is not None and not 0 <= value <= 1_000_000:
            raise ApiError(422, f"{name} must be a count from 0 to 1000000")
        return value

    def labelled_by(id: str) -> str | None:
        current = [h for h in project.history(id) if h.get("current") and h.get("role", "owner") == "owner"]
        return current[-1].get("annotator") if current else None

    @app.get("/api/batch")
    def get_batch(request: Request, round: int | None = None):
        try:
            batch = project.batch(round)
        except AlsegError as exc:  # a damaged manifest: the page says what is wrong and what to run
            raise ApiError(409, exc.problem) from None
        status = project.status()
        # what the page says about the model: its latest validation Dice against a constant mask
        # (with a warning when it is no better) and this round's pseudo-label gate
        model = {"health": status["model"], "warning": status["warning"], "gate": status["gate"]}
        common = {"rounds": project.rounds(), "annotator": annotator_of(request), "job": job(),
                  "next_mode": next_mode, "can_start_next": turnover is not None, "model": model,
                  "working_size": project.size}
        if batch is None:
            if round is not None:
                raise ApiError(404, f"round {round} has no exported batch")
            return {**common, "round": None, "latest": True, "labelled": 0, "total": 0, "complete": False,
                    "items": [], "message": "no batch is open yet"
                    + (": start the first one with 'Next batch'" if turnover is not None else
                       ": run `alseg query` to choose one")}
        labelled = project.labelled(batch.round)
        latest = project.batch()
        items = []
        for it in batch.items:
            url = lambda kind: f"/api/{kind}/{quote(it.id, safe='')}?round={batch.round}"
            done = it.id in labelled
            items.append({
                "id": it.id, "reason": it.reason, "score": it.score, "width": it.width, "height": it.height,
                "labelled": done, "labelled_by": labelled_by(it.id) if done else None,
                "uncertainty_scale": it.uncertainty_scale,
                # smaller first; the page shows the smallest that has a pixel for each screen pixel
                "previews": [{"side": side, "url": url("image") + f"&max_side={side}"}
                             for side in preview_sides if side < max(it.width, it.height)],
                "urls": {"image": url("image"), "thumb": url("thumb"),
                         "predicted": url("predicted") if it.predicted else None,
                         "uncertainty": url("uncertainty") if it.uncertainty else None, "mask": url("mask"),
                         # the page shows a slice scroller only for an image that has this
                         "volume": url("volume") if volumes.group_of(it.id) is not None else None},
            })
        done = sum(1 for it in items if it["labelled"])
        return {**common, "round": batch.round, "latest": latest is None or latest.round == batch.round,
                "labelled": done, "total": len(items), "complete": done == len(items), "items": items}

    def unchosen_slice(id: str, round: int | None):
        """The volume slice ``id`` when no round ever chose it (a neighbour shown for context), else None:
        a chosen one is served from its batch, and a damaged batch stays an error."""
        if round is not None:
            return None
        sample = volumes.sample(id)
        if sample is None:
            return None
        return None if project.selected_rounds(sample.id) else sample

    @app.get("/api/volume/{id:anytext}")
    def get_volume(id: str, round: int | None = None):
        sample = unchosen_slice(id, round)
        if sample is None:
            batch, item = lookup(id, round)
            id = item.id
        else:
            try:
                batch = project.batch()
            except AlsegError:  # a damaged latest batch: the neighbours are still shown, none marked
                batch = None
        group = volumes.group_of(id)
        if group is None:
            return {"id": id, "group": None, "round": None if batch is None else batch.round,
                    "slices": [], "current": None}
        in_batch = set() if batch is None else {it.id for it in batch.items}
        labelled = set(project.sample_ids(state="labelled"))
        slices = []
        for index, sid in volumes.slices(group):
            if batch is not None and sid in in_batch:
                url = f"/api/image/{quote(sid, safe='')}?round={batch.round}"
            else:  # found in the round that chose it, else decoded from the dataset
                url = f"/api/image/{quote(sid, safe='')}"
            slices.append({"id": sid, "index": index, "in_batch": sid in in_batch, "labelled": sid in labelled,
                           "url": url})
        current = next(k for k, s in enumerate(slices) if s["id"] == id)
        return {"id": id, "group": group, "round": None if batch is None else batch.round, "slices": slices,
                "current": current}

    @app.get("/api/image/{id:anytext}")
    def get_image(id: str, round: int | None = None, max_side: int | None = None):
        if max_side is not None and max_side not in preview_sides:
            offered = ", ".join(map(str, preview_sides)) or "none on this server"
            raise ApiError(422, f"max_side must be one of the preview sizes ({offered}), not {max_side}", id)
        sample = unchosen_slice(id, round)
        if sample is not None:
            data, media = volumes.image(sample, max_side)
            # the dataset's pixels do not change under a project; a neighbour scrolled past again comes from the cache
            return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=600"})
        if max_side is None:
            return batch_file(id, "image", round)
        source, batch, item = batch_path(id, "image", round)
        if max(item.width, item.height) <= max_side:  # no larger than asked: the image itself
            return batch_file(id, "image", round)
        path = batch.folder / "previews" / f"{Path(item.image).stem}-{max_side}.jpg"
        if not path.is_file() or path.stat().st_mtime < source.stat().st_mtime:
            from alseg.store import atomic_write_bytes

            # the server holds the writer lock; two requests at once both write whole files
            atomic_write_bytes(path, preview_jpeg(source, max_side))
        # no-cache (revalidated by ETag): a batch exported again must not show an old preview under its mask
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, no-cache"})

    @app.get("/api/predicted/{id:anytext}")
    def get_predicted(id: str, round: int | None = None):
        return batch_file(id, "predicted", round)

    @app.get("/api/uncertainty/{id:anytext}")
    def get_uncertainty(id: str, round: int | None = None):
        return batch_file(id, "uncertainty", round)

    @app.get("/api/thumb/{id:anytext}")
    def get_thumb(id: str, round: int | None = None):
        source, batch, item = batch_path(id, "image", round)
        path = batch.folder / "thumbs" / f"{Path(item.image).stem}.jpg"
        if not path.is_file() or path.stat().st_mtime < source.stat().st_mtime:
            from alseg.store import atomic_write_bytes

            # the server holds the writer lock; two requests at once both write whole files
            atomic_write_bytes(path, thumbnail_jpeg(source))
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/mask/{id:anytext}")
    def get_mask(id: str, round: int | None = None, version: int | None = None):
        from alseg.store import mask_png

        _, item = lookup(id, round)
        try:
            mask = project.stored_mask(item.id, version) if version is not None else project.stored_mask(item.id)
        except AlsegError as exc:
            raise ApiError(404, exc.problem, id) from None
        if mask is None:
            raise ApiError(404, "no mask is stored for this image yet" if version is None
                           else f"no version {version} of this image's mask", id)
        return Response(mask_png(mask), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.api_route("/api/mask/{id:anytext}", methods=["PUT", "POST"])
    async def put_mask(id: str, request: Request, round: int | None = None, seconds: float | None = None,
                       active_seconds: float | None = None, strokes: int | None = None, clicks: int | None = None,
                       allow_empty: bool = False, replace: bool = False):
        from alseg.annotate.ingest import NeedsConfirm

        check_seconds(seconds)
        check_seconds(active_seconds, "active_seconds")
        check_count(strokes, "strokes")
        check_count(clicks, "clicks")
        _, item = await run_in_threadpool(lookup, id, round)
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise ApiError(400, "bad Content-Length", headers=_CLOSE) from None
            if declared > max_upload_bytes:
                raise ApiError(413, f"upload of {declared} bytes is over the limit of {max_upload_bytes}", id,
                               headers=_CLOSE)
        effort = None
        if active_seconds is not None or strokes is not None or clicks is not None:
            effort = {"active_seconds": active_seconds, "strokes": strokes, "clicks": clicks}
        slot = upload_slot()
        if slot.locked():  # (wait_for with no time left would refuse even a slot that is free)
            try:
                await asyncio.wait_for(slot.acquire(), busy_wait)
            except TimeoutError:
                raise ApiError(503, f"busy: {upload_slots} uploads are being received; send it again in a "
                                    "moment", id, headers={"Retry-After": "2", **_CLOSE}) from None
        else:
            await slot.acquire()
        try:
            try:
                with await run_in_threadpool(spool_file) as spool:
                    await receive_body(request, spool, id)
                    result = await run_in_threadpool(
                        lambda: project.submit(item.id, read_all(spool), round=round, seconds=seconds,
                                               allow_empty=allow_empty, annotator=annotator_of(request),
                                               effort=effort, replace=replace))
            except NeedsConfirm as exc:
                raise ApiError(409, exc.problem, id, {"confirm": True}) from None
            except (AlsegError, OSError, sqlite3.Error) as exc:
                if _disk_full(exc):
                    raise ApiError(507, DISK_FULL, id) from None
                if isinstance(exc, AlsegError):
                    raise ApiError(422, exc.problem, id) from None
                raise
            except ClientDisconnect:
                # the client went away mid-body: nothing was stored, and nobody is left to answer
                return Response(status_code=400)
        finally:
            slot.release()
        if next_mode == "auto" and result.get("complete") and turnover is not None:
            await run_in_threadpool(start_next)
        return {**result, "job": job()}

    def upload_slot() -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if slots.get("loop") is not loop:
            slots.update(loop=loop, semaphore=asyncio.Semaphore(upload_slots))
        return slots["semaphore"]

    def spool_file():
        # past spool_bytes the body goes to a nameless file (O_TMPFILE): a killed server leaves nothing
        project.dir.incoming.mkdir(exist_ok=True)
        return tempfile.SpooledTemporaryFile(max_size=spool_bytes, dir=project.dir.incoming)

    def read_all(spool) -> bytes:
        spool.seek(0)
        return spool.read()

    async def receive_body(request: Request, spool, id: str) -> None:
        """The request's body into ``spool``, within ``upload_deadline`` and ``max_upload_bytes``."""
        size = 0
        try:
            async with asyncio.timeout(upload_deadline):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise ApiError(413, f"upload is over the limit of {max_upload_bytes} bytes", id,
                                       headers=_CLOSE)
                    spool.write(chunk)  # to memory, or (past spool_bytes) to the page cache: quick
        except TimeoutError:
            raise ApiError(408, f"the upload took longer than {upload_deadline:g} s and was dropped; "
                                "nothing was stored", id, headers=_CLOSE) from None
        if size == 0:
            raise ApiError(400, "empty upload: send the mask as PNG bytes", id)

    def start_next() -> bool:
        """Start the next round when the latest batch is complete; False when there is nothing to start."""
        if turnover.running():
            return True
        if not turnover.needed():
            return False
        turnover.start()
        return True

    @app.post("/api/undo/{id:anytext}")
    def undo(id: str, request: Request, round: int | None = None):
        _, item = lookup(id, round)
        try:
            return project.undo(item.id, annotator=annotator_of(request))
        except AlsegError as exc:
            raise ApiError(409, exc.problem, id) from None

    @app.get("/api/history/{id:anytext}")
    def history(id: str, round: int | None = None):
        _, item = lookup(id, round)
        return {"id": item.id, "history": project.history(item.id)}

    def record(id: str, seconds: float, action: str, request: Request, active_seconds: float | None,
               round: int | None) -> dict:
        check_seconds(seconds)
        check_seconds(active_seconds, "active_seconds")
        _, item = lookup(id, round)
        try:
            project.record_time(item.id, seconds, action=action, annotator=annotator_of(request),
                                active_seconds=active_seconds, round=round)
        except AlsegError as exc:
            raise ApiError(409, exc.problem, id) from None
        return {"id": item.id, "action": action, "seconds": seconds, "active_seconds": active_seconds}

    @app.post("/api/skip/{id:anytext}")
    def skip(id: str, request: Request, seconds: float = 0.0, active_seconds: float | None = None,
             round: int | None = None):
        return record(id, seconds, "skip", request, active_seconds, round)

    @app.post("/api/time/{id:anytext}")
    def view_time(id: str, request: Request, seconds: float, action: str = "view",
                  active_seconds: float | None = None, round: int | None = None):
        if action not in ("view", "skip"):
            raise ApiError(422, "action must be 'view' or 'skip'", id)
        return record(id, seconds, action, request, active_seconds, round)

    @app.post("/api/next", status_code=202)
    def next_round():
        if turnover is None:
            raise ApiError(409, "this server does not start rounds: stop it and run `alseg query`")
        if not start_next():
            state = turnover.state()
            if state["state"] == "failed":
                raise ApiError(409, f"the last attempt failed ({state['message']}) and nothing is left to start")
            raise ApiError(409, "the latest batch is not complete yet: label (or skip out of) its images first")
        return turnover.state()

    @app.get("/api/job")
    def get_job():
        if turnover is None:
            raise ApiError(404, "this server does not start rounds")
        return turnover.state()

    @app.get("/api/status")
    def get_status():
        return project.status()

    @app.api_route("/api/{rest:anytext}", methods=["GET", "PUT", "POST", "DELETE", "PATCH"])
    def unknown(rest: str):
        raise ApiError(404, "no such API endpoint")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def thumbnail_jpeg(source: Path) -> bytes:
    """A JPEG of the image in ``source``, at most ``THUMB_SIDE`` px on its long side."""
    from PIL import Image

    with Image.open(source) as im:
        im.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # a JPEG decodes at 1/2..1/8 scale: fast on large photos
        im = im.convert("L" if im.mode in ("L", "I;16", "I", "F", "1") else "RGB")
        im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


def preview_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size of a ``width`` x ``height`` image scaled to ``max_side`` px on its long side (never up)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def preview_jpeg(source: Path, max_side: int) -> bytes:
    """A JPEG of the image in ``source`` scaled to at most ``max_side`` px on its long side.

    A batch's images are 8-bit grey or RGB without an EXIF rotation (:func:`alseg.annotate.export.image_file`),
    so the preview's pixels cover exactly what the full image's do, and the page lays either over the mask.
    """
    from PIL import Image

    with Image.open(source) as im:
        size = preview_size(im.width, im.height, max_side)
        im.draft("RGB", size)  # a JPEG decodes at 1/2..1/8 scale, no smaller than asked: 24 MP at 6 MP
        im = im.convert("L" if im.mode in ("L", "I;16", "I", "F", "1") else "RGB")
        if im.size != size:
            im = im.resize(size, Image.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
    return buf.getvalue()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise AlsegError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # from now on: the URL printed next connects even before uvicorn starts accepting
    except OSError as exc:
        sock.close()
        raise AlsegError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    return sock


def serve(project_path, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False, log=print, *,
          token_file=None, annotator: str = DEFAULT_ANNOTATOR, next_mode: str = "button") -> None:
    """Run the review page for ``project_path`` until Ctrl-C, holding the project's writer lock.

    Every request needs a token when there are any: those of ``token_file`` (lines ``NAME TOKEN``),
    else the project's (``annotators.json``, made by ``alseg token``), on any address (a loopback
    server behind an HTTPS proxy too). Without tokens, a loopback server needs no login and every
    annotation is ``annotator``'s; off loopback one is made for ``annotator`` and the URL printed
    carries it, with the address other machines reach. With tokens the Host and Origin checks step
    aside (a request proves itself; the proxy's names need no list). ``next_mode``: see :func:`create_app`; the next round is made by
    a :class:`~alseg.annotate.turnover.Turnover` worker under this server's lock.

    Raises AlsegError when another process holds the lock or the port cannot be taken.
    ``port=0`` takes a free port (the URL logged names it).
    """
    import uvicorn

    from alseg.annotate.auth import Annotators, check_name, reachable_host
    from alseg.annotate.turnover import Turnover
    from alseg.project import Project

    check_name(annotator)
    if next_mode not in NEXT_MODES:
        raise AlsegError(f"next_mode must be one of {', '.join(NEXT_MODES)}, not {next_mode!r}")
    loopback = _is_loopback(host)
    annotators = Annotators.from_file(token_file, annotator) if token_file is not None else None
    project = Project(project_path, command="serve")
    turnover = None
    try:
        token = None
        if annotators is None:  # the project's tokens count on any address (behind an HTTPS proxy too)
            annotators = Annotators.load(project.dir.root)
            if not len(annotators):
                if loopback:
                    annotators = None
                else:
                    token = annotators.add(annotator)
        sock = _bind(host, port)
        try:
            turnover = Turnover(project.dir.root, project._fd, log=log)
            # with tokens a request proves itself, so the names it comes by (a proxy's) need no list
            served = LOOPBACK_HOSTS if loopback and annotators is None else None
            app = create_app(project, allowed_hosts=served, annotators=annotators,
                             default_annotator=annotator, turnover=turnover, next_mode=next_mode)
            shown = host if loopback else reachable_host(host)
            shown = f"[{shown.strip('[]')}]" if ":" in shown else shown
            url = f"http://{shown}:{sock.getsockname()[1]}/"
            state = "no batch is open yet"
            try:
                batch = project.batch()
            except AlsegError as exc:  # the page still starts, and says this
                batch, state = None, exc.problem
            if batch is not None:
                state = f"round {batch.round}: {len(project.labelled(batch.round))} of {len(batch.items)} labelled"
            if token is not None:
                log(f"alseg review page: {url}?token={token} ({state}); Ctrl-C to stop")
                log(f"a token was made for {annotator} (shown once; only its hash is kept in "
                    f"{annotators.path}); others get theirs with `alseg token`")
            else:
                log(f"alseg review page: {url} ({state}); Ctrl-C to stop")
                if annotators is not None:
                    log(f"each person opens it with their own token (?token=...): {', '.join(annotators.names())}")
            if not loopback:
                log(f"listening on {host}: reachable from other machines, with a token only")
            server = uvicorn.Server(server_config(app))
            if open_browser:
                opened = url if token is None else f"{url}?token={token}"
                threading.Thread(target=_open_when_started, args=(server, opened), daemon=True).start()
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                pass
        finally:
            sock.close()
    finally:
        if turnover is not None:
            turnover.close()
        project.close()
    log("alseg review page stopped; every submitted mask is stored")


def server_config(app, *, idle_seconds: float | None = None, max_connections: int | None = None):
    """The ``uvicorn.Config`` :func:`serve` runs ``app`` with (a test's server uses it too).

    ``idle_seconds`` (default ``IDLE_SECONDS``): how long a connection may stay open without sending
    a complete request head, when it opens and after each answer (uvicorn's own keep-alive timer
    starts only after an answer and stops at the first byte, so a connection that never sends a
    request, or sends one's head a byte at a time, would be held for good). ``max_connections``
    (default ``MAX_CONNECTIONS``): past this many open connections new requests get 503.
    """
    import uvicorn

    idle = IDLE_SECONDS if idle_seconds is None else idle_seconds
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http=_protocol(),
                          timeout_keep_alive=max(1, math.ceil(idle)),
                          limit_concurrency=MAX_CONNECTIONS if max_connections is None else max_connections,
                          timeout_graceful_shutdown=5)


_PROTOCOL: list = []


def _protocol():
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head (see :func:`server_config`)."""
    if _PROTOCOL:
        return _PROTOCOL[0]
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer = None
        _waiting_for = None  # the request cycle that was current when the timer started

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_request()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._waiting_for:  # a request's head came
                self._head_timer.cancel()
                self._head_timer = None

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()
            if self.cycle is before and not self.transport.is_closing():  # no pipelined request started
                self._await_request()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _await_request(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._waiting_for = self.cycle
            self._head_timer = self.loop.call_later(self.config.timeout_keep_alive, self._no_request)

        def _no_request(self) -> None:
            self._head_timer = None
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                self.transport.close()

    _PROTOCOL.append(HeadDeadlineProtocol)
    return HeadDeadlineProtocol


def _open_when_started(server, url: str) -> None:
    import time
    import webbrowser

    for _ in range(200):
        if server.started:
            webbrowser.open(url)
            return
        time.sleep(0.05)
