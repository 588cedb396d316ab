"""The review server against hostile or unlucky clients (issue 32: 6, 13, 14, 15): a full disk, tokens on
every route, slow and many uploads, idle connections, odd ids, HEAD, aborted uploads, odd Host headers,
and the real ``serve`` refusing a foreign Host.

Servers here bind port 0 and read the port they got (no free-port-then-bind race).
"""
from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import threading
import time
import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient

from annotate_fixtures import ServeProcess, png, project_state
from alseg.annotate import server as server_module
from alseg.annotate.auth import Annotators
from alseg.annotate.server import LOOPBACK_HOSTS, create_app, server_config


def _blob(item) -> np.ndarray:
    mask = np.zeros((item.height, item.width), bool)
    mask[10:25, 12:30] = True
    return mask


class LiveServer:
    """uvicorn serving ``app`` from a thread, configured as ``serve`` configures it, on a port-0 socket."""

    def __init__(self, app, **config):
        import uvicorn

        self.sock = server_module._bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(server_config(app, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.errors: list[logging.LogRecord] = []

    def __enter__(self) -> "LiveServer":
        errors = self.errors

        class Keep(logging.Handler):
            def emit(self, record):
                errors.append(record)

        self.handler = Keep(logging.ERROR)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        logging.getLogger("uvicorn.error").addHandler(self.handler)  # after uvicorn configured its logging
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("uvicorn.error").removeHandler(self.handler)
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=15)


def _read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    want = int(headers.get("content-length", 0))
    while len(body) < want:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _request(port: int, text: str) -> tuple[int, dict, bytes]:
    with _connect(port) as s:
        s.sendall(text.encode("latin-1"))
        return _read_response(s)


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``s`` (recv gives b"") within ``seconds``."""
    s.settimeout(seconds)
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _upload_head(item_id: str, length: int) -> bytes:
    return (f"PUT /api/mask/{item_id}?seconds=3 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


# ------------------------------------------------------------------ 6: a full disk during an upload
DISK_FULL_ERRORS = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "sqlite-full": lambda: sqlite3.OperationalError("database or disk is full"),
}


@pytest.mark.parametrize("where", ["submit", "store"])
@pytest.mark.parametrize("error", sorted(DISK_FULL_ERRORS))
def test_a_full_disk_during_an_upload_is_507_json_and_stores_nothing(opened, project_dir, monkeypatch, error, where):
    item = opened.batch().items[0]
    before = project_state(project_dir)
    calls = []

    def full(*args, **kwargs):
        calls.append(args[0])
        raise DISK_FULL_ERRORS[error]()

    # "store": the real submit validates the upload (a file in .incoming/) and fails where it stores it
    target = opened if where == "submit" else opened.store
    monkeypatch.setattr(target, "submit" if where == "submit" else "store_version", full)
    with TestClient(create_app(opened)) as c:
        res = c.put(f"/api/mask/{item.id}?seconds=4", content=png(_blob(item)))
        assert calls == [item.id]
        assert res.status_code == 507, res.text
        assert res.headers["content-type"] == "application/json"
        assert res.json()["error"].startswith("disk full; nothing was stored") and res.json()["id"] == item.id
        assert project_state(project_dir) == before
        assert not list((project_dir / ".incoming").iterdir())
        monkeypatch.undo()  # space freed: the same upload goes through
        assert c.put(f"/api/mask/{item.id}?seconds=4", content=png(_blob(item))).json()["outcome"] == "stored"
    assert np.array_equal(opened.stored_mask(item.id), _blob(item))


def test_a_full_disk_while_the_body_is_spooled_is_507(opened, project_dir, monkeypatch):
    import tempfile

    class FullSpool(tempfile.SpooledTemporaryFile):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server_module.tempfile, "SpooledTemporaryFile", FullSpool)
    item = opened.batch().items[0]
    before = project_state(project_dir)
    with TestClient(create_app(opened)) as c:
        res = c.put(f"/api/mask/{item.id}", content=png(_blob(item)))
        assert res.status_code == 507 and res.json()["error"].startswith("disk full"), res.text
        # a thumbnail that cannot be written is 507 too, as JSON, not a 500 page
        monkeypatch.setattr("alseg.store.atomic_write_bytes", lambda path, data: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
        res = c.get(f"/api/thumb/{item.id}")
        assert res.status_code == 507 and res.json()["error"].startswith("disk full"), res.text
    assert project_state(project_dir) == before


def test_a_bug_is_a_json_500_and_still_raises(opened, monkeypatch):
    """The page reads every error as JSON; a bug still shows its traceback (here: raised into the test)."""
    monkeypatch.setattr(opened, "status", lambda: {}["no such key"])
    with TestClient(create_app(opened), raise_server_exceptions=False) as c:
        res = c.get("/api/status")
        assert res.status_code == 500 and res.json()["error"].startswith("internal error (KeyError)"), res.text
    with TestClient(create_app(opened)) as c, pytest.raises(KeyError):
        c.get("/api/status")


# ------------------------------------------------------------------ 13: with tokens, every route checks one
def test_with_a_token_every_path_and_method_needs_it(opened, project_dir):
    annotators = Annotators()
    token = annotators.add("dana")
    item = opened.batch().items[0]
    before = project_state(project_dir)
    with TestClient(create_app(opened, annotators=annotators)) as c:
        for method, path in [("GET", "/"), ("GET", "/index.html"), ("GET", "/app.js"), ("GET", "/style.css"),
                             ("HEAD", "/"), ("HEAD", "/app.js"), ("HEAD", "/api/batch"), ("OPTIONS", "/"),
                             ("OPTIONS", "/api/batch"), ("OPTIONS", f"/api/mask/{item.id}"), ("GET", "/no-such-file"),
                             ("GET", "/api/no-such-route"), ("DELETE", "/api/batch"), ("GET", "/api/batch"),
                             ("GET", "/api/status"), ("GET", f"/api/image/{item.id}"), ("GET", f"/api/thumb/{item.id}"),
                             ("GET", "/api/openapi.json"), ("GET", "/docs"), ("PUT", f"/api/mask/{item.id}"),
                             ("POST", f"/api/skip/{item.id}?seconds=5"), ("POST", f"/api/undo/{item.id}"),
                             ("POST", "/api/next")]:
            res = c.request(method, path, content=png(_blob(item)) if method == "PUT" else None)
            assert res.status_code == 401, (method, path, res.status_code)
            assert res.headers["www-authenticate"] == "Bearer"
        # DNS rebinding onto a server bound off loopback (any Host is served there): the attacker's page is
        # same-origin with itself, so only the token stops it, and its browser has no cookie for that name
        rebound = {"host": "evil.example:8765", "origin": "http://evil.example:8765"}
        assert c.put(f"/api/mask/{item.id}", content=png(_blob(item)), headers=rebound).status_code == 401
        assert c.post(f"/api/skip/{item.id}?seconds=5", headers=rebound).status_code == 401
        assert c.get("/api/batch", headers=rebound).status_code == 401
        assert project_state(project_dir) == before
        auth = {"Authorization": f"Bearer {token}"}
        assert c.get("/", headers=auth).status_code == 200
        assert c.head("/api/batch", headers=auth).status_code == 200
        assert c.get("/api/no-such-route", headers=auth).status_code == 404  # past the token: the real answer
        assert c.options("/api/batch", headers=auth).status_code == 405


# ------------------------------------------------------------------ 14: slow, many and big uploads
def test_a_slow_upload_body_is_cut_off_at_the_deadline(opened, project_dir):
    item = opened.batch().items[0]
    before = project_state(project_dir)
    with LiveServer(create_app(opened, upload_deadline=1.0)) as server, _connect(server.port) as s:
        start = time.monotonic()
        s.sendall(_upload_head(item.id, 5000) + b"\x89PNG" + b"\0" * 96)  # 100 of 5000 bytes, then nothing
        status, headers, body = _read_response(s)
        took = time.monotonic() - start
        assert status == 408 and b"took longer than 1 s" in body and headers["connection"] == "close", body
        assert 0.9 < took < 6
        assert _closed_within(s, 5)
        assert not server.errors
    assert project_state(project_dir) == before


def test_upload_bodies_are_capped_in_number_and_spooled_not_held(opened, project_dir):
    """Two stalled 2 MB uploads take the two slots without holding their bytes in memory; a third is told
    the server is busy; when the stalled ones go away (no traceback) an upload goes through."""
    item = opened.batch().items[0]
    before = project_state(project_dir)
    part = b"\0" * (2 * 1024 * 1024)
    app = create_app(opened, upload_slots=2, busy_wait=0.3, spool_bytes=64 * 1024, max_upload_bytes=8 * 1024 * 1024,
                     upload_deadline=60)
    with LiveServer(app) as server:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            stalled = [_connect(server.port) for _ in range(2)]
            for s in stalled:
                s.sendall(_upload_head(item.id, 3 * len(part)) + part)
            time.sleep(1.5)  # the server reads what was sent, then waits for the rest
            held = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        assert held < 1024 * 1024, f"{held} bytes held for 4 MB of stalled uploads"
        start = time.monotonic()
        status, headers, body = _request(server.port, _upload_head(item.id, 10).decode() + "0123456789")
        assert status == 503 and b'"error":"busy' in body and headers["retry-after"] == "2", body
        assert time.monotonic() - start < 5
        for s in stalled:
            s.close()
        time.sleep(0.5)
        data = png(_blob(item))
        status, _, body = _request(server.port, _upload_head(item.id, len(data)).decode("latin-1")
                                   + data.decode("latin-1"))
        assert status == 200 and b'"outcome":"stored"' in body, body
        assert not server.errors, [r.getMessage() for r in server.errors]
    assert project_state(project_dir)["masks"] == before["masks"] + [item.id]
    assert not list((project_dir / ".incoming").iterdir())


def test_server_config_bounds_connections():
    config = server_config(None)
    assert config.limit_concurrency == server_module.MAX_CONNECTIONS
    assert config.timeout_keep_alive == server_module.IDLE_SECONDS


def test_idle_and_slow_headed_connections_are_closed(opened):
    """uvicorn's keep-alive timer runs only between requests: a connection that never sends one, or sends its
    head a byte at a time, must be closed too; one that is answered stays open for its next request."""
    with LiveServer(create_app(opened), idle_seconds=1) as server:
        with _connect(server.port) as idle, _connect(server.port) as slow, _connect(server.port) as used:
            used.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_response(used)[0] == 200
            for _ in range(4):
                slow.sendall(b"G")
                time.sleep(0.4)
            assert _closed_within(idle, 3) and _closed_within(slow, 3)
            assert _closed_within(used, 3)  # idle after its answer
        with _connect(server.port) as s:
            s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_response(s)[0] == 200
            time.sleep(0.5)
            s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_response(s)[0] == 200  # a keep-alive connection in use is served as usual


# ------------------------------------------------------------------ 15: ids, HEAD, aborted uploads, Host
def test_an_id_with_a_newline_can_be_viewed_and_labelled(opened, monkeypatch):
    item = opened.batch().items[0]
    odd = "case 7\nleft"
    real_item = opened.item
    # the project's ids come from file names; one with a newline stands for this batch item
    monkeypatch.setattr(opened, "item", lambda id, round=None: real_item(item.id if id == odd else id, round))
    with TestClient(create_app(opened)) as c:
        quoted = "case%207%0Aleft"
        for kind in ("image", "thumb", "predicted", "uncertainty"):
            res = c.get(f"/api/{kind}/{quoted}?round=1")
            assert res.status_code == 200, (kind, res.text)
        assert c.get(f"/api/mask/{quoted}").status_code == 404
        res = c.put(f"/api/mask/{quoted}?seconds=2", content=png(_blob(item)))
        assert res.status_code == 200 and res.json()["outcome"] == "stored", res.text
        assert c.get(f"/api/mask/{quoted}").status_code == 200
        assert c.get(f"/api/history/{quoted}").json()["id"] == item.id
        assert c.post(f"/api/time/{quoted}?seconds=1").status_code == 200
        assert c.get("/api/no%0Asuch").json()["error"] == "no such API endpoint"
    assert np.array_equal(opened.stored_mask(item.id), _blob(item))


def test_head_is_answered_like_get_without_a_body(opened):
    item = opened.batch().items[0]
    with TestClient(create_app(opened)) as c:
        for path in ("/", "/app.js", "/api/batch", "/api/status", f"/api/image/{item.id}", f"/api/thumb/{item.id}",
                     f"/api/predicted/{item.id}", "/api/no-such-route", f"/api/mask/{item.id}"):
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
            assert head.headers["content-type"] == got.headers["content-type"], path
            assert head.content == b"" and got.content, path
            if "content-length" in got.headers:
                assert head.headers["content-length"] == got.headers["content-length"], path
            assert head.headers["x-content-type-options"] == "nosniff"


def test_an_aborted_upload_logs_nothing_and_stores_nothing(opened, project_dir):
    item = opened.batch().items[0]
    before = project_state(project_dir)
    with LiveServer(create_app(opened)) as server:
        for size in (1000, 3 * 1024 * 1024):  # in memory, and spooled to disk
            s = _connect(server.port)
            s.sendall(_upload_head(item.id, 2 * size) + b"\0" * size)
            time.sleep(0.5)
            s.close()
        time.sleep(0.5)
        status, _, _ = _request(server.port, "GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200
        assert not server.errors, [r.getMessage() for r in server.errors]
    assert project_state(project_dir) == before
    assert not list((project_dir / ".incoming").iterdir())


MALFORMED_HOSTS = ["127.0.0.1:8765@evil.example", "127.0.0.1@evil.example", "localhost:80@evil.example:80",
                   "127.0.0.1/evil.example", "127.0.0.1:80/x", "127.0.0.1 evil.example", "127.0.0.1:80x",
                   "127.0.0.1:", "127.0.0.1:99999", "[::1", "::1", "evil.example#127.0.0.1"]


@pytest.mark.parametrize("allowed", [LOOPBACK_HOSTS, None], ids=["loopback", "any-host"])
def test_a_host_header_that_is_not_name_and_port_is_refused(opened, project_dir, allowed):
    item = opened.batch().items[0]
    before = project_state(project_dir)
    with TestClient(create_app(opened, allowed_hosts=allowed), base_url="http://127.0.0.1:8765") as c:
        for host in MALFORMED_HOSTS:
            res = c.get("/api/batch", headers={"host": host})
            assert res.status_code == 400 and "malformed Host" in res.json()["error"], (host, res.status_code)
            res = c.put(f"/api/mask/{item.id}", content=png(_blob(item)), headers={"host": host})
            assert res.status_code == 400, host
        assert project_state(project_dir) == before
        for host in ("127.0.0.1:8765", "localhost", "LocalHost:1", "[::1]:8765"):
            assert c.get("/api/batch", headers={"host": host}).status_code == 200, host


def test_the_real_serve_refuses_a_foreign_host_and_closes_idle_connections(project_dir):
    with ServeProcess(project_dir, setup="s.IDLE_SECONDS = 1") as server:
        port = server.port(r"http://127\.0\.0\.1:(\d+)/ ")
        get = "GET /api/batch HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n"
        status, _, body = _request(port, get.format(f"127.0.0.1:{port}"))
        assert status == 200 and b'"round":1' in body
        status, _, body = _request(port, get.format(f"evil.example:{port}"))
        assert status == 403 and b"not served here" in body
        status, _, body = _request(port, get.format(f"127.0.0.1:{port}@evil.example"))
        assert status == 400 and b"malformed Host" in body
        with _connect(port) as idle:
            assert _closed_within(idle, 4)
    assert "stopped" in server.rest
