"""The review server's JSON API: listing, file serving, upload validation, safety, concurrency, lock."""
from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from annotate_fixtures import BATCH, NON_SQUARE, ServeProcess, ThreadServer, copy_project, decode, png, predicted, project_state
from alseg.annotate.server import LOOPBACK_HOSTS, create_app, serve
from alseg.errors import AlsegError
from alseg.project import Project
from alseg.store import RunStore, mask_png



@pytest.fixture
def client(opened):
    with TestClient(create_app(opened)) as c:
        yield c


def _items(p: Project):
    return p.batch().items


def _blob(item, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((item.height, item.width), bool)
    y, x = rng.integers(5, item.height - 20), rng.integers(5, item.width - 20)
    mask[y:y + 12, x:x + 14] = True
    mask[y + 3, x + 20] = True
    return mask


# ------------------------------------------------------------------ reading
def test_batch_lists_the_open_batch(client, opened):
    data = client.get("/api/batch").json()
    batch = opened.batch()
    assert data["round"] == batch.round == 1
    assert (data["labelled"], data["total"], data["complete"]) == (0, BATCH, False)
    assert data["working_size"] == 32
    assert [it["id"] for it in data["items"]] == [it.id for it in batch.items]
    for got, it in zip(data["items"], batch.items):
        assert (got["width"], got["height"], got["reason"], got["labelled"]) == (it.width, it.height, it.reason, False)
        assert got["urls"]["image"].startswith(f"/api/image/{it.id}")
        assert got["urls"]["predicted"].startswith(f"/api/predicted/{it.id}")
    sizes = {(it.width, it.height) for it in batch.items}
    assert (80, 56) in sizes  # a non-square image is in the batch


def test_files_have_their_real_type_and_the_image_size(client, opened):
    batch = opened.batch()
    for it in batch.items:
        for kind, media, fmt in (("image", "image/png", "PNG"), ("predicted", "image/png", "PNG"),
                                 ("uncertainty", "image/jpeg", "JPEG")):
            res = client.get(f"/api/{kind}/{it.id}")
            assert res.status_code == 200 and res.headers["content-type"] == media, (kind, res.text[:100])
            with Image.open(io.BytesIO(res.content)) as im:
                im.load()
                assert im.format == fmt and im.size == (it.width, it.height), (kind, it.id)
            assert res.content == (batch.folder / getattr(it, kind)).read_bytes()
        assert client.get(f"/api/mask/{it.id}").status_code == 404  # nothing stored yet
    page = client.get("/")
    assert page.status_code == 200 and 'src="app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/{name}").status_code == 200
    assert client.get("/api/status").json()["queued"] == BATCH


BAD_IDS = ["..%2F..%2Frun.db", "%2e%2e%2f%2e%2e%2frun.db", "..%2f..%2f..%2fevil.png", "/etc/passwd",
           "%2Fetc%2Fpasswd", "..%2F", "images%2Flesion_0014.png", "lesion_0014%00", "%2e%2e%2f"]


def test_path_tricks_in_ids_are_404_and_write_nothing(client, project_dir, opened, tmp_path):
    before = project_state(project_dir)
    absolute = str(project_dir / "run.db")
    ids = BAD_IDS + [absolute.replace("/", "%2F"), absolute]
    for bad in ids:
        for kind in ("image", "predicted", "uncertainty", "mask"):
            res = client.get(f"/api/{kind}/{bad}")
            assert res.status_code == 404 and "error" in res.json(), (kind, bad, res.status_code)
        res = client.put(f"/api/mask/{bad}?allow_empty=1", content=png(np.ones((56, 80), bool)))
        assert res.status_code == 404 and "error" in res.json(), (bad, res.text)
        assert client.post(f"/api/skip/{bad}?seconds=1").status_code == 404
    # the raw request line, as a browser or curl might send it without normalising
    with ThreadServer(create_app(opened)) as server:
        for path in ("/api/image/../../run.db", "/api/mask/../../../evil.png", "/api/image/%2e%2e/%2e%2e/run.db",
                     "/api/mask/..", "/api/image/%2e%2e", "/api/image/" + absolute):
            for method in ("GET", "PUT"):
                status, body = _raw(server.port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                 "Content-Length: 4\r\nConnection: close\r\n\r\nabcd")
                assert status == 404 and b"SQLite" not in body, (method, path, status)
    assert project_state(project_dir) == before
    assert not (tmp_path / "evil.png").exists() and not (project_dir.parent / "evil.png").exists()


def test_only_the_batch_s_own_files_are_served(project_dir, opened, client):
    """Nothing outside the batch folder is ever served: not through a manifest that points out of it
    (the batch is then refused as damaged, every image), nor the store's record of the batch, nor a
    link in the folder; a link affects only its own image."""
    batch = opened.batch()
    first, second = batch.items[0], batch.items[1]
    secret = (project_dir / "config.yaml").read_bytes()
    manifest = batch.folder / "manifest.csv"
    text = manifest.read_text()
    manifest.write_text(text.replace(first.image, "../../run.db").replace(second.image, str(project_dir / "config.yaml")))
    for it in batch.items[:3]:
        for query in ("", "?max_side=1024"):
            res = client.get(f"/api/image/{it.id}{query}")
            assert res.status_code == 404 and "damaged" in res.json()["error"], (it.id, query)
    manifest.write_text(text)
    # the store's record pointing out of the folder (the manifest listing the same ids) serves nothing either
    recorded = opened.store.batch_record(batch.round)
    recorded[0]["image"], recorded[1]["image"] = "../../run.db", str(project_dir / "config.yaml")
    opened.store.record_batch(batch.round, recorded)
    for it in batch.items[:2]:
        for query in ("", "?max_side=1024"):
            res = client.get(f"/api/image/{it.id}{query}")
            assert res.status_code == 404 and "error" in res.json(), (it.id, query)
            assert secret not in res.content
    # a link inside the folder to a file outside it: that image alone is 404
    outside = project_dir.parent / "secret.png"
    outside.write_bytes(png(np.ones((4, 4), bool)))
    link = batch.folder / batch.items[2].image
    link.unlink()
    link.symlink_to(outside)
    for kind in ("image", "thumb"):
        res = client.get(f"/api/{kind}/{batch.items[2].id}")
        assert res.status_code == 404 and "not inside the batch folder" in res.json()["error"], kind
    assert client.get(f"/api/image/{batch.items[3].id}").status_code == 200


# ------------------------------------------------------------------ uploads refused
def test_oversized_upload_is_413(opened, project_dir):
    before = project_state(project_dir)
    item = _items(opened)[0]
    limit = 4000
    with TestClient(create_app(opened, max_upload_bytes=limit)) as c:
        assert c.put(f"/api/mask/{item.id}", content=b"\0" * (limit + 1)).status_code == 413

        def chunks():  # no Content-Length: capped while reading
            for _ in range(10):
                yield b"\0" * 1000

        res = c.put(f"/api/mask/{item.id}", content=chunks())
        assert res.status_code == 413 and "limit" in res.json()["error"]
    # the declared length alone is refused, before the body is read: only 100 of the 50 MiB declared
    # are ever sent, so an answer at all (not the 408 of the 60 s body deadline) shows it; the socket's
    # 30 s is a hang guard, not a speed bound
    with ThreadServer(create_app(opened)) as server:
        status, body = _raw(server.port, f"PUT /api/mask/{item.id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         f"Content-Length: {50 * 1024 * 1024}\r\n\r\n" + "x" * 100, timeout=30)
        assert status == 413 and b"upload of 52428800 bytes is over the limit" in body
    assert project_state(project_dir) == before


@pytest.mark.parametrize("case", ["truncated", "not-png", "gradient", "wrong-size", "empty", "colour", "no-body"])
def test_invalid_masks_are_refused_with_the_reason(client, opened, project_dir, case):
    item = next(it for it in _items(opened) if (it.width, it.height) == NON_SQUARE)  # 80 x 56
    good = _blob(item)
    body, expect = {
        "truncated": (png(good)[: len(png(good)) // 2], "unreadable image"),
        "not-png": (b"<html>hello</html>", "unreadable image"),
        "gradient": (png(np.tile(np.arange(item.width, dtype=np.uint8) * 3, (item.height, 1))), "not binary"),
        "wrong-size": (png(np.ones((40, 30), bool)), f"mask is 30x40 but its image is {item.width}x{item.height}"),
        "empty": (png(np.zeros((item.height, item.width), bool)), "mask is empty"),
        "colour": (png(np.dstack([good * 255, good * 0, good * 0]).astype(np.uint8)), "colour channels"),
        "no-body": (b"", "empty upload"),
    }[case]
    assert (item.width, item.height) == (80, 56)
    before = project_state(project_dir)
    res = client.put(f"/api/mask/{item.id}?seconds=3", content=body)
    assert 400 <= res.status_code < 500
    assert expect in res.json()["error"], res.json()
    assert opened.stored_mask(item.id) is None
    assert project_state(project_dir) == before  # nothing written, the image still queued


def test_empty_mask_needs_allow_empty(client, opened):
    item = _items(opened)[1]
    empty = png(np.zeros((item.height, item.width), bool))
    assert client.put(f"/api/mask/{item.id}", content=empty).status_code == 422
    res = client.put(f"/api/mask/{item.id}?allow_empty=true", content=empty)
    assert res.status_code == 200 and res.json()["outcome"] == "stored"
    stored = opened.stored_mask(item.id)
    assert stored.shape == (item.height, item.width) and not stored.any()


def test_bad_seconds_are_refused(client, opened):
    item = _items(opened)[0]
    for bad in ("-1", "nan", "inf", "1e9", "soon"):
        res = client.put(f"/api/mask/{item.id}?seconds={bad}", content=png(_blob(item)))
        assert res.status_code == 422 and "seconds" in res.json()["error"], bad
        assert client.post(f"/api/skip/{item.id}?seconds={bad}").status_code == 422
    assert opened.stored_mask(item.id) is None


# ------------------------------------------------------------------ uploads stored
def test_valid_upload_is_stored_exactly(client, opened, project_dir):
    items = _items(opened)
    item = items[0]
    sent = _blob(item, seed=1)
    res = client.put(f"/api/mask/{item.id}?seconds=2.5", content=png(sent))
    assert res.status_code == 200, res.text
    body = res.json()
    assert (body["id"], body["outcome"], body["labelled"], body["total"], body["complete"]) == (
        item.id, "stored", 1, BATCH, False)
    assert item.id not in body["queued"] and len(body["queued"]) == BATCH - 1
    assert np.array_equal(opened.stored_mask(item.id), sent)
    assert np.array_equal(decode(client.get(f"/api/mask/{item.id}").content) > 127, sent)
    listed = client.get("/api/batch").json()
    assert listed["labelled"] == 1 and [it["labelled"] for it in listed["items"]][0] is True
    # the same again changes nothing; POST works as PUT; a different mask replaces it once confirmed
    assert client.post(f"/api/mask/{item.id}", content=png(sent)).json()["outcome"] == "unchanged"
    other = _blob(item, seed=2)
    assert client.put(f"/api/mask/{item.id}?replace=1", content=png(other)).json()["outcome"] == "replaced"
    # a mask at the working size is accepted too (0/1 values)
    second = items[1]
    small = np.zeros((32, 32), np.uint8)
    small[8:20, 10:22] = 1
    assert client.put(f"/api/mask/{second.id}", content=png(small)).json()["outcome"] == "stored"
    with RunStore.open_readonly(project_dir) as store:
        assert np.array_equal(store.mask(item.id), other)
        assert np.array_equal(store.mask(second.id), small > 0)
        assert sorted(store.queued(1)) == sorted(it.id for it in items[2:])


def test_expert_seconds_sent_are_recorded(client, opened):
    items = _items(opened)
    assert opened.status()["expert_seconds"] == 0
    assert client.put(f"/api/mask/{items[0].id}?seconds=2.5", content=png(_blob(items[0]))).status_code == 200
    res = client.post(f"/api/skip/{items[1].id}?seconds=4")
    assert res.status_code == 200 and res.json()["action"] == "skip"
    assert client.post(f"/api/time/{items[2].id}?seconds=1.25&action=view").status_code == 200
    assert client.post(f"/api/time/{items[2].id}?seconds=1&action=delete").status_code == 422
    assert opened.status()["expert_seconds"] == pytest.approx(7.75)
    assert client.get("/api/status").json()["expert_seconds"] == pytest.approx(7.75)
    assert items[1].id in client.get("/api/batch").json()["items"][1]["id"]
    assert client.get("/api/batch").json()["items"][1]["labelled"] is False  # skipped stays queued


def test_concurrent_uploads_of_one_image_leave_the_last_complete_mask(opened):
    item = _items(opened)[2]
    masks = [_blob(item, seed=10), _blob(item, seed=11)]
    assert not np.array_equal(*masks)
    bodies = [png(m) for m in masks]
    import httpx

    with ThreadServer(create_app(opened)) as server:
        for attempt in range(4):
            barrier = threading.Barrier(2)
            results = [None, None]

            def send(k):
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    barrier.wait()
                    results[k] = c.put(f"/api/mask/{item.id}?replace=1", content=bodies[k]).status_code

            threads = [threading.Thread(target=send, args=(k,)) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert results == [200, 200], results
            stored = opened.stored_mask(item.id)
            assert any(np.array_equal(stored, m) for m in masks)
            last = [a for a in opened.store.annotations(item.id) if a["sha256"]][-1]
            assert last["sha256"] == hashlib.sha256(mask_png(stored)).hexdigest()  # the last one stored wins
    assert opened.store.mask_ids().count(item.id) == 1


# ------------------------------------------------------------------ cross-site and host checks
def test_cross_site_writes_and_foreign_hosts_are_refused(opened):
    item = _items(opened)[0]
    app = create_app(opened, allowed_hosts=LOOPBACK_HOSTS)
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        assert c.get("/api/batch").status_code == 200
        assert c.get("/api/batch", headers={"host": "localhost:8765"}).status_code == 200
        assert c.get("/api/batch", headers={"host": "evil.example:8765"}).status_code == 403  # DNS rebinding
        res = c.put(f"/api/mask/{item.id}", content=png(_blob(item)), headers={"origin": "http://evil.example"})
        assert res.status_code == 403 and "another site" in res.json()["error"]
        assert c.post(f"/api/skip/{item.id}?seconds=9", headers={"origin": "null"}).status_code == 403
        assert opened.stored_mask(item.id) is None and opened.status()["expert_seconds"] == 0
        same = c.put(f"/api/mask/{item.id}", content=png(_blob(item)), headers={"origin": "http://127.0.0.1:8765"})
        assert same.status_code == 200


# ------------------------------------------------------------------ the real server process
def _raw(port: int, request: str, timeout: float = 30) -> tuple[int, bytes]:  # timeout: a hang guard
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request.encode("latin-1"))
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    return len(head) + 4 + int(m.group(1)) if m else 1 << 30


# `alseg serve` with two kill points around the store's transaction of an upload (the ALSEG_FAULT
# mechanism of alseg.faults, placed here because store.py imports nothing of alseg above rundir):
# `mask-uncommitted` with every row of the upload written inside the transaction and COMMIT not yet
# run; `mask-committed` right after the commit, before the server answers.
_SERVE_WITH_STORE_KILL_POINTS = """
import contextlib, sys
from alseg.faults import point
from alseg.store import RunStore

store_version, transaction = RunStore.store_version, RunStore.transaction

def storing(self, *args, **kwargs):
    self._storing_version = True
    try:
        result = store_version(self, *args, **kwargs)
    finally:
        self._storing_version = False
    point("mask-committed")
    return result

@contextlib.contextmanager
def committing(self):
    with transaction(self) as conn:
        yield conn
        if getattr(self, "_storing_version", False):
            point("mask-uncommitted")

RunStore.store_version, RunStore.transaction = storing, committing
sys.argv = ["alseg", "serve", *sys.argv[1:]]
from alseg.cli import entry
entry()
"""


def _start_server(project: Path, fault: str | None = None) -> tuple[subprocess.Popen, int]:
    """``alseg serve PROJECT`` on a free port, answering; with ``fault``, the server with the store's
    kill points and ALSEG_FAULT set to it. ``proc.lines`` collects its log; ``proc.log_ended`` is
    set when the log is closed (the process has exited)."""
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("ALSEG_FAULT", None)
    if fault is None:
        args = [sys.executable, "-m", "alseg", "serve", str(project), "--port", "0"]
    else:
        args = [sys.executable, "-c", _SERVE_WITH_STORE_KILL_POINTS, str(project), "--port", "0"]
        env["ALSEG_FAULT"] = fault
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    found = threading.Event()
    ended = threading.Event()
    port = []

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m and not port:
                port.append(int(m.group(1)))
                found.set()
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    proc.lines = lines  # type: ignore[attr-defined]
    proc.log_ended = ended  # type: ignore[attr-defined]
    if not found.wait(90):
        proc.kill()
        raise AssertionError(f"alseg serve did not start: {''.join(lines)}")
    deadline = time.monotonic() + 30
    while True:  # the URL is logged just before uvicorn listens
        try:
            if _raw(port[0], "GET /api/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")[0] == 200:
                return proc, port[0]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"alseg serve does not answer: {''.join(lines)}")
        time.sleep(0.1)


def _unread_by_server(client: socket.socket) -> int | None:
    """Bytes the client sent that the server has not yet taken off its socket (the receive queue of
    the server's end of this loopback connection, from /proc/net/tcp); None when not found."""
    here, there = client.getsockname()[1], client.getpeername()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if (local, remote) == (there, here):
            return int(fields[4].split(":")[1], 16)
    return None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alseg", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "400"})


def test_server_holds_the_lock_and_a_kill_mid_upload_leaves_nothing(project_dir):
    with RunStore.open_readonly(project_dir) as store:
        item_id = store.queued(1)[0]
    proc, port = _start_server(project_dir)
    try:
        busy = _cli("ingest", str(project_dir))
        assert busy.returncode == 2, busy.stderr
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by process {proc.pid}" in lines[0] and "serve" in lines[0], busy.stderr
        with pytest.raises(AlsegError, match=f"in use by process {proc.pid}"):
            Project(project_dir)
        # an upload cut off half way, then the server killed
        body = png(np.ones((56, 80), bool)) + b"\0" * 200_000
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall((f"PUT /api/mask/{item_id}?seconds=5 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[: len(body) // 2])
        # killed once the server has taken the half body off the socket (uvicorn stops reading past
        # its buffer until the handler drains it: so the handler is receiving it); the bound is a hang guard
        deadline = time.monotonic() + 60
        while _unread_by_server(s) != 0:
            assert time.monotonic() < deadline, "the server never read the upload"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with RunStore.open_readonly(project_dir) as store:
        assert store.mask(item_id) is None and item_id in store.queued(1) and len(store.queued(1)) == BATCH
        assert store.expert_seconds() == {}
    incoming = project_dir / ".incoming"
    assert not incoming.exists() or not list(incoming.iterdir())
    assert not list((project_dir / "rounds" / "001" / "masks").iterdir())
    done = _cli("ingest", str(project_dir), "--json")  # the lock died with the server
    assert done.returncode == 0, done.stderr
    with Project(project_dir) as p:
        assert len(p.store.queued(1)) == BATCH


def _upload_cut_by_a_kill(port: int, item_id: str, body: bytes) -> bytes:
    """PUT ``body`` whole and read until the server closes the connection: what it answered, if anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall((f"PUT /api/mask/{item_id}?seconds=5 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def _get_json(port: int, path: str) -> tuple[int, dict]:
    import json

    status, body = _raw(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout=30)
    return status, json.loads(body)


@pytest.mark.parametrize("fault, kept", [("mask-uncommitted", False), ("mask-committed", True)])
def test_a_server_killed_inside_the_store_transaction_keeps_the_whole_upload_or_nothing(project_dir, fault, kept):
    """SIGKILL with the upload's rows written in the store's transaction but not committed: after a
    restart the image is still queued with nothing of the upload kept; killed just after the commit:
    labelled with the complete mask, its time recorded. Never half."""
    proc, port = _start_server(project_dir, fault=fault)
    try:
        _, listed = _get_json(port, "/api/batch")
        item = next(it for it in listed["items"] if (it["width"], it["height"]) == NON_SQUARE)
        sent = np.zeros((item["height"], item["width"]), bool)
        sent[10:30, 12:50] = True
        answer = _upload_cut_by_a_kill(port, item["id"], png(sent))
        assert proc.wait(60) == -signal.SIGKILL, "".join(proc.lines)
        assert answer == b"", answer  # killed before it could answer
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with RunStore.open_readonly(project_dir) as store:  # the database as the kill left it
        queued, mask, annotations = store.queued(1), store.mask(item["id"]), store.annotations(item["id"])
        seconds = store.expert_seconds()
    if kept:
        assert np.array_equal(mask, sent) and item["id"] not in queued and len(queued) == BATCH - 1
        assert [(a["action"], a["seconds"]) for a in annotations] == [("stored", 5)]
    else:
        assert mask is None and item["id"] in queued and len(queued) == BATCH
        assert annotations == [] and seconds == {}
    assert not list((project_dir / "rounds" / "001" / "masks").iterdir())  # masks live in run.db only
    # restarted, the server shows the same and takes the upload again
    proc, port = _start_server(project_dir)
    try:
        incoming = project_dir / ".incoming"
        assert not incoming.exists() or not list(incoming.iterdir())
        _, listed = _get_json(port, "/api/batch")
        shown = next(it for it in listed["items"] if it["id"] == item["id"])
        assert (shown["labelled"], listed["labelled"]) == ((True, 1) if kept else (False, 0))
        status, body = _raw(port, f"GET /api/mask/{item['id']} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  "Connection: close\r\n\r\n", timeout=30)
        if kept:
            assert status == 200 and np.array_equal(decode(body) > 127, sent)
        else:
            assert status == 404
        status, body = _raw(port, f"PUT /api/mask/{item['id']}?seconds=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  f"Content-Length: {len(png(sent))}\r\nConnection: close\r\n\r\n"
                                  + png(sent).decode("latin-1"), timeout=30)
        assert status == 200 and (b'"outcome":"unchanged"' if kept else b'"outcome":"stored"') in body, body
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with RunStore.open_readonly(project_dir) as store:
        assert np.array_equal(store.mask(item["id"]), sent) and len(store.queued(1)) == BATCH - 1
        assert store.mask_ids().count(item["id"]) == 1


def test_server_stops_cleanly_on_ctrl_c(project_dir):
    proc, port = _start_server(project_dir)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.log_ended.wait(30), "the server's log was not closed"  # every line read, not a guess at when
    assert any("stopped" in line for line in proc.lines), proc.lines
    with Project(project_dir):  # the lock is free again
        pass


def test_serve_refuses_a_held_lock_and_a_taken_port(project_dir):
    with Project(project_dir, command="ingest"):
        with pytest.raises(AlsegError, match=f"in use by process {os.getpid()}"):
            serve(project_dir, port=0, log=lambda text: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(AlsegError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(project_dir, port=port, log=lambda text: None)
    with Project(project_dir):  # serve closed the project it opened
        pass


def test_no_open_batch_is_reported(tmp_path, template):
    """A project whose batch is labelled still serves the page; the batch shows as complete."""
    project = copy_project(template[0], tmp_path / "p2")
    with Project(project) as p:
        truth = template[1]
        for it in p.batch().items:
            assert p.submit(it.id, png(truth[it.id]), allow_empty=True)["outcome"] == "stored"
        with TestClient(create_app(p)) as c:
            data = c.get("/api/batch").json()
            assert data["complete"] is True and data["labelled"] == data["total"] == BATCH
            it = p.batch().items[0]
            assert np.array_equal(decode(c.get(f"/api/mask/{it.id}").content) > 127, truth[it.id])
            assert predicted(p.batch(), it).shape == truth[it.id].shape


def test_a_project_without_any_batch_yet_says_so(tmp_path, template):
    """Before the first `alseg query` the page has nothing to show: round null, no items, and what to
    do next (run `alseg query`, or with a turnover the page's own button); no file of any round."""
    from alseg.annotate.turnover import Turnover
    from alseg.project import init_project

    made = template[0].parent  # the template's own images and the lab's first masks
    overrides = {"data": {"size": 32}, "model": {"width": 4}, "train": {"epochs": 1},
                 "active": {"round_epochs": 1, "mc_passes": 3}}
    init_project(tmp_path / "fresh", made / "images", made / "masks", preset="demo", overrides=overrides,
                 pretrain=False)
    with Project(tmp_path / "fresh", command="serve") as p:
        assert p.batch() is None
        some = sorted(p.store.sample_ids(state="pool"))[0]  # an image of the pool
        with TestClient(create_app(p)) as c:
            data = c.get("/api/batch").json()
            assert (data["round"], data["latest"], data["labelled"], data["total"], data["complete"],
                    data["items"]) == (None, True, 0, 0, False, [])
            assert data["message"] == "no batch is open yet: run `alseg query` to choose one"
            assert data["can_start_next"] is False and data["working_size"] == 32
            res = c.get("/api/batch?round=1")
            assert res.status_code == 404 and "round 1 has no exported batch" in res.json()["error"]
            for kind in ("image", "predicted", "uncertainty", "mask", "thumb"):
                assert c.get(f"/api/{kind}/{some}").status_code == 404, kind
            res = c.put(f"/api/mask/{some}", content=png(np.ones((64, 64), bool)))
            assert 400 <= res.status_code < 500 and "error" in res.json()
            assert c.get("/").status_code == 200  # the page itself still loads
        with TestClient(create_app(p, turnover=Turnover(p.dir.root, p._fd, log=lambda text: None))) as c:
            data = c.get("/api/batch").json()
            assert data["round"] is None and data["can_start_next"] is True
            assert data["message"] == "no batch is open yet: start the first one with 'Next batch'"
        assert p.batch() is None and not (tmp_path / "fresh" / "rounds").exists()


# ------------------------------------------------------------------ the workplace: rounds, replace, undo, tokens
def test_thumbnails_are_small_cached_jpegs(client, opened):
    batch = opened.batch()
    for it in batch.items:
        res = client.get(f"/api/thumb/{it.id}?round={batch.round}")
        assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
        assert "max-age" in res.headers["cache-control"]
        with Image.open(io.BytesIO(res.content)) as im:
            assert im.format == "JPEG" and max(im.size) <= 192
            assert im.size[0] / im.size[1] == pytest.approx(it.width / it.height, rel=0.05)
        cached = batch.folder / "thumbs" / f"{Path(it.image).stem}.jpg"
        assert cached.read_bytes() == res.content
    assert client.get("/api/thumb/nope").status_code == 404


def test_a_large_jpeg_thumbnail_is_small_and_a_jpeg_source_stays_jpeg(tmp_path):
    from alseg.annotate.export import image_file
    from alseg.annotate.server import thumbnail_jpeg
    from alseg.data.imageio import read_image

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    pixels = (rng.random((1500, 2400, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(photo, quality=85)
    with Image.open(io.BytesIO(thumbnail_jpeg(photo))) as im:
        assert im.format == "JPEG" and im.size == (192, 120)
    assert image_file(photo, read_image(photo)) == (".jpg", photo.read_bytes())  # the bytes, not a re-encode
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the pixels as decoded (upright) are re-encoded, without the tag
    Image.fromarray(pixels[:64, :96]).save(rotated, exif=exif)
    decoded = read_image(rotated)
    suffix, data = image_file(rotated, decoded)
    with Image.open(io.BytesIO(data)) as im:
        assert suffix == ".jpg" and im.format == "JPEG" and im.getexif().get(0x0112) is None
        assert im.size == (decoded.shape[1], decoded.shape[0])
    flat = tmp_path / "scan.png"
    Image.fromarray(pixels[:64, :64, 0]).save(flat)
    assert image_file(flat, read_image(flat))[0] == ".png"


def _large_photo(width: int, height: int) -> np.ndarray:
    """Smooth colour gradients with a few edges: what a scaled copy should look like, shrunk."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.stack([xx / width * 255, yy / height * 255, ((xx // 97 + yy // 61) % 2) * 120 + 60], axis=2)
    return out.astype(np.uint8)


def test_a_preview_is_a_cached_jpeg_of_the_image_at_most_max_side(opened, project_dir):
    from alseg.annotate.server import preview_size

    batch = opened.batch()
    wide = next(it for it in batch.items if (it.width, it.height) == NON_SQUARE)
    square = next(it for it in batch.items if (it.width, it.height) == (64, 64))
    with TestClient(create_app(opened, preview_sides=(48, 64))) as c:
        listed = {it["id"]: it for it in c.get("/api/batch").json()["items"]}
        # offered only where smaller than the image: 48 for both, 64 for the 80x56 one alone
        assert [p["side"] for p in listed[wide.id]["previews"]] == [48, 64]
        assert [p["side"] for p in listed[square.id]["previews"]] == [48]
        url = listed[wide.id]["previews"][0]["url"]
        assert url == f"/api/image/{wide.id}?round={batch.round}&max_side=48"
        res = c.get(url)
        assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(res.content)) as im:
            assert im.format == "JPEG" and im.size == preview_size(80, 56, 48) == (48, 34)
            shown = np.asarray(im.convert("RGB"), float)
        with Image.open(batch.folder / wide.image) as im:  # the image itself, scaled: not another one
            expect = np.asarray(im.convert("RGB").resize((48, 34), Image.BILINEAR), float)
        assert np.abs(shown - expect).mean() < 12
        other = np.asarray(Image.open(batch.folder / square.image).convert("RGB").resize((48, 34)), float)
        assert np.abs(shown - other).mean() > np.abs(shown - expect).mean() + 5
        # cached under rounds/RRR/previews/, served from there until the image is newer
        cached = batch.folder / "previews" / f"{Path(wide.image).stem}-48.jpg"
        assert cached.read_bytes() == res.content
        before = cached.stat()
        assert c.get(url).content == res.content
        assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        os.utime(cached, ns=(before.st_atime_ns, before.st_mtime_ns - 10**10))  # older than the image
        assert c.get(url).status_code == 200  # written again (a fresh file: its time is the image's or later)
        assert cached.stat().st_mtime_ns >= (batch.folder / wide.image).stat().st_mtime_ns
        assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temporary left
        # as large as the image or larger: the image itself, its own bytes and type
        res = c.get(f"/api/image/{square.id}?max_side=64")
        assert res.status_code == 200 and res.content == (batch.folder / square.image).read_bytes()
        assert not (batch.folder / "previews" / f"{Path(square.image).stem}-64.jpg").exists()
        # sizes not offered are 422, naming those that are; unknown ids 404
        for bad in ("1024", "47", "0", "-48", "big"):
            res = c.get(f"/api/image/{wide.id}?max_side={bad}")
            assert res.status_code == 422 and "max_side" in res.json()["error"], bad
        assert "48, 64" in c.get(f"/api/image/{wide.id}?max_side=1024").json()["error"]
        assert c.get("/api/image/nope?max_side=48").status_code == 404
        assert c.head(url).status_code == 200
    with TestClient(create_app(opened, preview_sides=())) as c:  # none offered: the page loads full images
        assert all(it["previews"] == [] for it in c.get("/api/batch").json()["items"])
        assert c.get(f"/api/image/{wide.id}?max_side=48").status_code == 422
    with pytest.raises(AlsegError, match="preview_sides"):
        create_app(opened, preview_sides=(0,))


def test_a_preview_of_a_large_photo_is_drafted_and_scaled(tmp_path):
    from alseg.annotate.server import preview_jpeg

    photo = tmp_path / "photo.jpg"
    pixels = _large_photo(2400, 1600)
    Image.fromarray(pixels).save(photo, quality=92)
    with Image.open(io.BytesIO(preview_jpeg(photo, 1024))) as im:
        assert im.format == "JPEG" and im.size == (1024, 683)
        shown = np.asarray(im.convert("RGB"), float)
    expect = np.asarray(Image.fromarray(pixels).resize((1024, 683), Image.LANCZOS), float)
    assert np.abs(shown - expect).mean() < 4
    grey = tmp_path / "scan.png"
    Image.fromarray(pixels[:, :, 0]).save(grey)
    with Image.open(io.BytesIO(preview_jpeg(grey, 600))) as im:
        assert im.mode == "L" and im.size == (600, 400)


def test_batch_lists_rounds_annotator_and_thumbs(client, opened):
    data = client.get("/api/batch").json()
    assert data["rounds"] == opened.rounds() and data["rounds"][-1]["round"] == 1
    assert (data["annotator"], data["job"], data["next_mode"], data["latest"]) == ("local", None, "button", True)
    assert all(it["urls"]["thumb"].startswith(f"/api/thumb/{it['id']}?round=1") for it in data["items"])
    assert client.get("/api/batch?round=1").json()["items"] == data["items"]
    assert client.get("/api/batch?round=7").status_code == 404
    assert client.get(f"/api/image/{data['items'][0]['id']}?round=7").status_code == 404


def test_a_replace_needs_confirmation_and_undo_restores(client, opened):
    it = _items(opened)[0]
    first, second = _blob(it, 1), _blob(it, 2)
    res = client.put(f"/api/mask/{it.id}?round=1&seconds=3&active_seconds=2&strokes=4&clicks=1", content=png(first))
    assert res.status_code == 200 and res.json()["outcome"] == "stored"
    res = client.put(f"/api/mask/{it.id}?round=1", content=png(second))
    assert res.status_code == 409 and res.json()["confirm"] is True and res.json()["id"] == it.id
    assert np.array_equal(opened.stored_mask(it.id), first)
    res = client.put(f"/api/mask/{it.id}?round=1&replace=1", content=png(second))
    assert res.status_code == 200 and res.json()["outcome"] == "replaced"
    history = client.get(f"/api/history/{it.id}").json()["history"]
    assert [h["version"] for h in history] == [1, 2] and [h["current"] for h in history] == [False, True]
    assert (history[0]["active_seconds"], history[0]["strokes"], history[0]["clicks"]) == (2, 4, 1)
    assert np.array_equal(decode(client.get(f"/api/mask/{it.id}?version=1").content) > 127, first)
    assert client.get(f"/api/mask/{it.id}?version=9").status_code == 404
    labelled = client.get("/api/batch").json()["items"][0]
    assert labelled["labelled"] and labelled["labelled_by"] == "local"
    assert client.post(f"/api/undo/{it.id}").status_code == 200
    assert np.array_equal(opened.stored_mask(it.id), first)
    assert client.post(f"/api/undo/{it.id}").status_code == 200
    assert opened.stored_mask(it.id) is None and client.get("/api/batch").json()["labelled"] == 0
    assert client.post(f"/api/undo/{it.id}").status_code == 409  # nothing left to undo


def test_bad_effort_figures_are_refused(client, opened):
    it = _items(opened)[0]
    for query in ("active_seconds=-1", "active_seconds=nan", "strokes=-2", "clicks=abc"):
        res = client.put(f"/api/mask/{it.id}?{query}", content=png(_blob(it)))
        assert res.status_code == 422, query
    assert opened.stored_mask(it.id) is None


def test_tokens_name_the_annotator_and_are_required(opened):
    from alseg.annotate.auth import Annotators

    annotators = Annotators()
    token = annotators.add("bea")
    it = _items(opened)[0]
    with TestClient(create_app(opened, annotators=annotators)) as c:
        assert c.get("/api/batch").status_code == 401
        assert c.put(f"/api/mask/{it.id}", content=png(_blob(it))).status_code == 401
        assert c.get("/api/batch", headers={"Authorization": "Bearer wrong-token-wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert c.get("/api/batch", headers=auth).json()["annotator"] == "bea"
        assert c.put(f"/api/mask/{it.id}", content=png(_blob(it)), headers=auth).status_code == 200
    assert [h["annotator"] for h in opened.history(it.id)] == ["bea"]


def test_without_a_turnover_the_next_round_is_refused(client):
    res = client.post("/api/next")
    assert res.status_code == 409 and "alseg query" in res.json()["error"]
    assert client.get("/api/job").status_code == 404
    assert client.get("/api/batch").json()["can_start_next"] is False


def test_serve_off_loopback_makes_a_token_and_prints_the_reachable_url(project_dir):
    from alseg.annotate.auth import Annotators, reachable_host

    with ServeProcess(project_dir, options="host='0.0.0.0', annotator='carla'") as server:
        url = re.search(r"(http://\S+)/\?token=(\S+) ", server.first)
        assert url, server.first
        assert "127.0.0.1" not in url.group(1) and reachable_host("0.0.0.0") in url.group(1)
        assert Annotators.load(project_dir).name_for(url.group(2)) == "carla"
        port = int(url.group(1).rsplit(":", 1)[1])
        status, _ = _raw(port, "GET /api/batch HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 401
        status, body = _raw(port, f"GET /api/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {url.group(2)}\r\n"
                                  "Connection: close\r\n\r\n")
        assert status == 200 and b'"annotator":"carla"' in body
