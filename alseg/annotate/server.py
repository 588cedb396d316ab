"""The review server: a local web page on which the expert corrects the open batch's predicted masks.

``alseg serve PROJECT`` opens the project (holding its writer lock for the server's lifetime),
serves the page shipped in ``alseg/annotate/static/`` and a small JSON API:

======  ==============================  =====================================================
GET     ``/api/batch``                  the open batch: round, progress, items and their URLs
GET     ``/api/image/{id}``             the image (PNG, original size)
GET     ``/api/predicted/{id}``         the model's predicted mask (0/255 PNG, original size)
GET     ``/api/uncertainty/{id}``       the uncertainty overlay (PNG)
GET     ``/api/mask/{id}``              the stored expert mask (0/255 PNG), 404 if none
PUT     ``/api/mask/{id}``              store a mask: body PNG bytes; query ``seconds``,
                                        ``allow_empty``; also POST
POST    ``/api/skip/{id}``              record the expert's ``seconds`` on an image, not labelled
POST    ``/api/time/{id}``              record ``seconds`` of viewing (``action=view``)
GET     ``/api/status``                 the project's status (as ``alseg status --json``)
======  ==============================  =====================================================

Errors are JSON ``{"error": "..."}`` with a 4xx status. Safety: ids are looked up in the batch,
never joined into paths; only the files the batch's manifest records are served, and only when
they resolve inside the batch folder; every upload is size-capped (413 before it is read whole)
and validated by :meth:`alseg.project.Project.submit`, which stores it atomically. Requests
whose ``Origin`` is another site are refused (no cross-site submits), and on a loopback address
so are requests for another ``Host`` (DNS rebinding).
"""
from __future__ import annotations

import ipaddress
import math
import socket
import threading
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from alseg.errors import AlsegError

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_SECONDS = 24 * 3600.0  # one recorded stretch of expert time; more is a clock gone wrong
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_KINDS = ("image", "predicted", "uncertainty")
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                                 b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
]


class ApiError(Exception):
    def __init__(self, status: int, error: str, id: str | None = None):
        self.status, self.error, self.id = status, error, id


def _error(status: int, error: str, id: str | None = None) -> JSONResponse:
    body = {"error": error} if id is None else {"error": error, "id": id}
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


class _Guard:
    """ASGI middleware: refuse cross-site writes and foreign Host headers; add security headers."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        problem = None
        if self.allowed is not None and _hostname(host) not in self.allowed:
            problem = f"host {host!r} is not served here (open the page at 127.0.0.1)"
        elif scope["method"] not in ("GET", "HEAD", "OPTIONS") and "origin" in headers:
            origin = urlsplit(headers["origin"])
            if origin.netloc.lower() != host.lower():
                problem = "request from another site refused (open the review page itself)"
        if problem is not None:
            return await _error(403, problem)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _hostname(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:80`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(project, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The review app over an open :class:`alseg.project.Project` (which the caller closes).

    ``allowed_hosts``: the Host names served (``None``: any; :func:`serve` passes the loopback
    names when it binds a loopback address).
    """
    app = FastAPI(title="alseg review", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.error, exc.id)

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

    def open_batch():
        batch = project.batch()
        if batch is None:
            raise ApiError(404, "no batch is open: run `alseg query` first")
        return batch

    def lookup(id: str):
        batch = open_batch()
        for item in batch.items:
            if item.id == id:
                return batch, item
        raise ApiError(404, "not an image of the open batch", id)

    def batch_file(id: str, kind: str) -> FileResponse:
        batch, item = lookup(id)
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
        media = "image/png" if path.suffix.lower() == ".png" else "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})

    def check_seconds(seconds: float | None) -> float | None:
        if seconds is not None and not (math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS):
            raise ApiError(422, f"seconds must be a number from 0 to {MAX_SECONDS:.0f}")
        return seconds

    @app.get("/api/batch")
    def get_batch():
        batch = project.batch()
        status = project.status()
        # what the page says about the model: its latest validation Dice against a constant mask
        # (with a warning when it is no better) and this round's pseudo-label gate
        model = {"health": status["model"], "warning": status["warning"], "gate": status["gate"]}
        if batch is None:
            return {"round": None, "working_size": project.size, "labelled": 0, "total": 0, "complete": False,
                    "items": [], "message": "no batch is open: run `alseg query` to choose one", "model": model}
        labelled = project.labelled(batch.round)
        items = []
        for it in batch.items:
            url = lambda kind: f"/api/{kind}/{quote(it.id, safe='')}?round={batch.round}"
            items.append({
                "id": it.id, "reason": it.reason, "score": it.score, "width": it.width, "height": it.height,
                "labelled": it.id in labelled, "uncertainty_scale": it.uncertainty_scale,
                "urls": {"image": url("image"), "predicted": url("predicted") if it.predicted else None,
                         "uncertainty": url("uncertainty") if it.uncertainty else None, "mask": url("mask")},
            })
        done = sum(1 for it in items if it["labelled"])
        return {"round": batch.round, "working_size": project.size, "labelled": done, "total": len(items),
                "complete": done == len(items), "items": items, "model": model}

    @app.get("/api/image/{id:path}")
    def get_image(id: str):
        return batch_file(id, "image")

    @app.get("/api/predicted/{id:path}")
    def get_predicted(id: str):
        return batch_file(id, "predicted")

    @app.get("/api/uncertainty/{id:path}")
    def get_uncertainty(id: str):
        return batch_file(id, "uncertainty")

    @app.get("/api/mask/{id:path}")
    def get_mask(id: str):
        from alseg.store import mask_png

        _, item = lookup(id)
        mask = project.stored_mask(item.id)
        if mask is None:
            raise ApiError(404, "no mask is stored for this image yet", id)
        return Response(mask_png(mask), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.api_route("/api/mask/{id:path}", methods=["PUT", "POST"])
    async def put_mask(id: str, request: Request, seconds: float | None = None, allow_empty: bool = False):
        check_seconds(seconds)
        _, item = await run_in_threadpool(lookup, id)
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise ApiError(400, "bad Content-Length") from None
            if declared > max_upload_bytes:
                raise ApiError(413, f"upload of {declared} bytes is over the limit of {max_upload_bytes}", id)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise ApiError(413, f"upload is over the limit of {max_upload_bytes} bytes", id)
        if not body:
            raise ApiError(400, "empty upload: send the mask as PNG bytes", id)
        try:
            return await run_in_threadpool(project.submit, item.id, bytes(body), seconds=seconds,
                                           allow_empty=allow_empty)
        except AlsegError as exc:
            raise ApiError(422, exc.problem, id) from None

    def record(id: str, seconds: float, action: str) -> dict:
        check_seconds(seconds)
        _, item = lookup(id)
        try:
            project.record_time(item.id, seconds, action=action)
        except AlsegError as exc:
            raise ApiError(409, exc.problem, id) from None
        return {"id": item.id, "action": action, "seconds": seconds}

    @app.post("/api/skip/{id:path}")
    def skip(id: str, seconds: float = 0.0):
        return record(id, seconds, "skip")

    @app.post("/api/time/{id:path}")
    def view_time(id: str, seconds: float, action: str = "view"):
        if action not in ("view", "skip"):
            raise ApiError(422, "action must be 'view' or 'skip'", id)
        return record(id, seconds, action)

    @app.get("/api/status")
    def get_status():
        return project.status()

    @app.api_route("/api/{rest:path}", methods=["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH"])
    def unknown(rest: str):
        raise ApiError(404, "no such API endpoint")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


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
    except OSError as exc:
        sock.close()
        raise AlsegError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    return sock


def serve(project_path, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False, log=print) -> None:
    """Run the review page for ``project_path`` until Ctrl-C, holding the project's writer lock.

    Raises AlsegError when another process holds the lock or the port cannot be taken.
    ``port=0`` takes a free port (the URL logged names it).
    """
    import uvicorn

    from alseg.project import Project

    project = Project(project_path, command="serve")
    try:
        sock = _bind(host, port)
        try:
            loopback = _is_loopback(host)
            app = create_app(project, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
            shown = host if loopback or host not in ("0.0.0.0", "::") else "127.0.0.1"
            shown = f"[{shown.strip('[]')}]" if ":" in shown else shown
            url = f"http://{shown}:{sock.getsockname()[1]}/"
            batch = project.batch()
            if batch is None:
                state = "no batch is open; run `alseg query` first"
            else:
                state = f"round {batch.round}: {len(project.labelled(batch.round))} of {len(batch.items)} labelled"
            log(f"alseg review page: {url} ({state}); Ctrl-C to stop")
            if not loopback:
                log(f"warning: listening on {host}, reachable from other machines; the page has no login")
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
            if open_browser:
                threading.Thread(target=_open_when_started, args=(server, url), daemon=True).start()
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                pass
        finally:
            sock.close()
    finally:
        project.close()
    log("alseg review page stopped; every submitted mask is stored")


def _open_when_started(server, url: str) -> None:
    import time
    import webbrowser

    for _ in range(200):
        if server.started:
            webbrowser.open(url)
            return
        time.sleep(0.05)
