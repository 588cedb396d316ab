"""Tokens and annotator names for the review page (alseg.annotate.auth)."""
from __future__ import annotations

import json
import os
import stat

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from alseg.annotate.auth import COOKIE, Annotators, TokenGuard, check_name
from alseg.errors import AlsegError


def _app(annotators, default="local") -> TestClient:
    app = FastAPI()

    @app.get("/api/who")
    def who(request: Request):
        return {"annotator": request.state.annotator}

    @app.get("/")
    def page(request: Request):
        return {"page": request.state.annotator}

    app.add_middleware(TokenGuard, annotators=annotators, default_annotator=default)
    return TestClient(app)


def test_tokens_are_kept_as_hashes_only_and_privately(tmp_path):
    people = Annotators.load(tmp_path)
    assert len(people) == 0
    alice, bob = people.add("alice"), people.add("bob")
    path = tmp_path / "annotators.json"
    text = path.read_text()
    assert alice not in text and bob not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Annotators.load(tmp_path)
    assert again.name_for(alice) == "alice" and again.name_for(bob) == "bob"
    assert again.name_for("not-a-token") is None and again.name_for(None) is None
    renewed = again.add("alice")  # a new token for a name replaces the old one
    third = Annotators.load(tmp_path)
    assert third.name_for(alice) is None and third.name_for(renewed) == "alice"
    assert third.names() == ["alice", "bob"]


def test_a_damaged_annotators_file_is_one_line(tmp_path):
    (tmp_path / "annotators.json").write_text("{not json")
    with pytest.raises(AlsegError, match="cannot read the annotators file"):
        Annotators.load(tmp_path)


def test_token_file_forms(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("s3cret-token-of-the-lab-0001\n")
    assert Annotators.from_file(one, "expert").name_for("s3cret-token-of-the-lab-0001") == "expert"
    many = tmp_path / "many.txt"
    many.write_text("# the lab's experts\nalice aaaaaaaaaaaaaaaaaaaa\nbob bbbbbbbbbbbbbbbbbbbb\n")
    people = Annotators.from_file(many)
    assert people.name_for("bbbbbbbbbbbbbbbbbbbb") == "bob" and people.names() == ["alice", "bob"]
    short = tmp_path / "short.txt"
    short.write_text("alice abc\n")
    with pytest.raises(AlsegError, match="shorter than 16"):
        Annotators.from_file(short)
    bad = tmp_path / "bad.txt"
    bad.write_text("a b c\nd e f\n")
    with pytest.raises(AlsegError, match="NAME TOKEN"):
        Annotators.from_file(bad)
    with pytest.raises(AlsegError, match="cannot read"):
        Annotators.from_file(tmp_path / "missing.txt")


def test_names_are_safe_for_files_and_tables():
    assert check_name("dr.smith@lab-2") == "dr.smith@lab-2"
    for bad in ("", "-x", "a b", "x" * 65, "../etc", "a\nb"):
        with pytest.raises(AlsegError):
            check_name(bad)


def test_without_tokens_every_request_is_the_default_annotator():
    client = _app(None, default="ana")
    assert client.get("/api/who").json() == {"annotator": "ana"}


def test_with_tokens_every_route_needs_one(tmp_path):
    people = Annotators.load(tmp_path)
    token = people.add("alice")
    client = _app(people)
    refused = client.get("/api/who")
    assert refused.status_code == 401 and "token" in refused.json()["error"]
    page = client.get("/")
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert client.get("/api/who", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/who", headers={"Authorization": f"Bearer {token}"}).json() == {"annotator": "alice"}
    # the page's address carries the token once; the cookie it sets serves the page's <img> requests
    first = client.get(f"/?token={token}")
    assert first.status_code == 200 and first.json() == {"page": "alice"}
    set_cookie = first.headers["set-cookie"]
    assert f"{COOKIE}={token}" in set_cookie and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert client.get("/api/who").json() == {"annotator": "alice"}  # by the cookie
    client.cookies.clear()
    assert client.get("/api/who").status_code == 401
    assert client.get("/api/who", headers={"Cookie": 'x="unterminated'}).status_code == 401


def test_token_command_prints_a_token_that_the_project_accepts(tmp_path, capsys):
    from alseg.cli import main
    from alseg.data.synthetic import make_synthetic
    from alseg.project import init_project

    src = make_synthetic(tmp_path / "s", n=12, size=32)
    project = tmp_path / "p"
    init_project(project, src / "images", preset="demo", pretrain=False,
                 overrides={"data": {"size": 32}, "model": {"width": 4}})
    capsys.readouterr()
    assert main(["token", str(project), "alice", "--json"]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    assert Annotators.load(project).name_for(token) == "alice"
    assert main(["token", str(project), "a b"]) == 2
    assert "annotator name" in capsys.readouterr().err


def test_a_loopback_server_behind_a_proxy_asks_for_the_projects_tokens(project_dir):
    """Tokens made with `alseg token` count on 127.0.0.1 too: an HTTPS proxy in front forwards
    another Host and Origin, which the token, not a list of names, then vouches for."""
    from annotate_fixtures import ServeProcess
    from test_server_hardening import _request

    path = project_dir
    token = Annotators.load(path).add("alice")
    with ServeProcess(path) as server:
        port = server.port(r"http://127\.0\.0\.1:(\d+)/ ")
        get = "GET /api/batch HTTP/1.1\r\nHost: {}\r\n{}Connection: close\r\n\r\n"
        status, _, _ = _request(port, get.format(f"127.0.0.1:{port}", ""))
        assert status == 401  # on loopback too, once the project has tokens
        proxied = get.format("lab.example.org", f"Origin: https://lab.example.org\r\nAuthorization: Bearer {token}\r\n")
        status, _, body = _request(port, proxied)
        assert status == 200 and b'"annotator":"alice"' in body
        put = (f"POST /api/skip/x HTTP/1.1\r\nHost: lab.example.org\r\nOrigin: https://lab.example.org\r\n"
               f"Authorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        status, _, body = _request(port, put)
        assert status != 403, body  # the proxy's Origin is not refused: the token vouches (404: no such image)

