"""Who may use a project's review page, and who each request comes from.

A project's annotators are names with a secret token each. Only the tokens' SHA-256 hashes are
kept, in ``PROJECT/annotators.json`` (mode 0600); the token itself is shown once, when it is made
(``alseg token PROJECT NAME``, or ``alseg serve`` binding off loopback with no token yet). A
token can also come from a file the lab keeps (``serve --token-file``: lines ``NAME TOKEN``, or
one bare token for the default annotator).

:class:`TokenGuard` is the ASGI middleware the review app puts in front of every route. With
annotators configured, a request needs a valid token, from ``Authorization: Bearer TOKEN``, the
``alseg_token`` cookie, or ``?token=TOKEN`` (which sets the cookie, so that the page's ``<img>``
requests carry it); without one it gets 401. Either way ``request.state.annotator`` names who
is asking, and every annotation is recorded under that name. Cookies are per site, so a page of
another site (or a DNS-rebound name) cannot borrow an expert's session.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

from alseg.errors import AlsegError

FILE_NAME = "annotators.json"
COOKIE = "alseg_token"
DEFAULT_ANNOTATOR = "local"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    """An annotator name: 1-64 letters, digits, ``._@-`` (it appears in files and tables)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AlsegError(f"annotator name {name!r} must be 1-64 letters, digits or ._@- (starting with a letter or digit)")
    return name


class Annotators:
    """Token hashes -> annotator names; persisted in ``PROJECT/annotators.json`` when it has a home."""

    def __init__(self, by_digest: dict[str, str] | None = None, path: Path | None = None):
        self._by_digest = dict(by_digest or {})
        self.path = path

    @classmethod
    def load(cls, project_dir: str | Path) -> "Annotators":
        """The project's annotators (none yet when the file does not exist)."""
        path = Path(project_dir) / FILE_NAME
        if not path.exists():
            return cls({}, path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = {e["sha256"]: check_name(e["name"]) for e in data["annotators"]}
        except (OSError, ValueError, KeyError, TypeError, AlsegError) as exc:
            raise AlsegError(f"cannot read the annotators file ({exc}); delete it and make new tokens "
                             "with `alseg token`", path) from None
        if any(not re.fullmatch(r"[0-9a-f]{64}", d) for d in entries):
            raise AlsegError("the annotators file holds a malformed hash; delete it and make new tokens", path)
        return cls(entries, path)

    @classmethod
    def from_file(cls, token_file: str | Path, default_name: str = DEFAULT_ANNOTATOR) -> "Annotators":
        """Tokens kept by the lab in a text file: ``NAME TOKEN`` per line, or one bare token."""
        path = Path(token_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AlsegError(f"cannot read the token file ({getattr(exc, 'strerror', None) or exc})", path) from None
        entries: dict[str, str] = {}
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        for line in lines:
            parts = line.split()
            if len(parts) == 1 and len(lines) == 1:
                name, token = check_name(default_name), parts[0]
            elif len(parts) == 2:
                name, token = check_name(parts[0]), parts[1]
            else:
                raise AlsegError("each line of a token file is `NAME TOKEN` (or the file holds one bare token)", path)
            if len(token) < 16:
                raise AlsegError(f"the token of {name} is shorter than 16 characters; use a long random one", path)
            entries[_digest(token)] = name
        if not entries:
            raise AlsegError("the token file holds no token", path)
        return cls(entries, None)

    def add(self, name: str) -> str:
        """A new token for ``name`` (shown once; only its hash is saved). Replaces that name's old tokens."""
        check_name(name)
        token = secrets.token_urlsafe(24)
        self._by_digest = {d: n for d, n in self._by_digest.items() if n != name}
        self._by_digest[_digest(token)] = name
        if self.path is not None:
            self._save()
        return token

    def _save(self) -> None:
        data = {"annotators": [{"name": n, "sha256": d} for d, n in sorted(self._by_digest.items(), key=lambda x: x[1])],
                "updated": time.time()}
        # mkstemp makes the file 0600 from the start: the hashes never sit readable by others
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.tmp-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def name_for(self, token: str | None) -> str | None:
        if not token:
            return None
        return self._by_digest.get(_digest(token))

    def names(self) -> list[str]:
        return sorted(set(self._by_digest.values()))

    def __len__(self) -> int:
        return len(self._by_digest)


def _json_401(problem: str) -> tuple[bytes, bytes]:
    return json.dumps({"error": problem}).encode(), b"application/json"


def _html_401(problem: str) -> tuple[bytes, bytes]:
    page = ("<!doctype html><meta charset='utf-8'><title>alseg review: token needed</title>"
            f"<p>{problem}</p>").encode()
    return page, b"text/html; charset=utf-8"


class TokenGuard:
    """ASGI middleware: names the annotator of each request; with annotators configured, requires a token."""

    def __init__(self, app, annotators: Annotators | None = None, default_annotator: str = DEFAULT_ANNOTATOR):
        self.app = app
        self.annotators = annotators if annotators is not None and len(annotators) else None
        self.default = check_name(default_annotator)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        if self.annotators is None:
            state["annotator"] = self.default
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        from_query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[-1]
        candidates = [from_query]
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        if "cookie" in headers:
            cookie = SimpleCookie()
            try:
                cookie.load(headers["cookie"])
            except Exception:  # a malformed Cookie header is no token, not a server error
                cookie = SimpleCookie()
            if COOKIE in cookie:
                candidates.append(cookie[COOKIE].value)
        name = next((n for n in map(self.annotators.name_for, candidates) if n is not None), None)
        if name is None:
            problem = ("this review page needs a token: open the address `alseg serve` printed "
                       "(http://HOST:PORT/?token=...), or ask whoever runs it for yours")
            body, kind = (_json_401 if scope["path"].startswith("/api/") else _html_401)(problem)
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                    (b"cache-control", b"no-store"), (b"www-authenticate", b"Bearer")]})
            return await send({"type": "http.response.body", "body": body})
        state["annotator"] = name
        if from_query is None or self.annotators.name_for(from_query) is None:
            return await self.app(scope, receive, send)
        cookie_header = f"{COOKIE}={from_query}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(b"set-cookie", cookie_header)]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def reachable_host(bound: str) -> str:
    """The address other machines reach a server bound to ``bound`` by (for the printed URL)."""
    import socket

    if bound not in ("0.0.0.0", "::", ""):
        return bound
    try:  # the address of the interface that routes outwards (a UDP connect sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
            if address and not address.startswith("127."):
                return address
    except OSError:
        pass
    return socket.gethostname()
