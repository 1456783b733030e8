"""The service's guards: loopback unless a key is set, browsers only by the server's own names and pages, the API
key on every data route, client-named paths only inside the roots, and request body size limits."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from tunelab.config import UserError

from .errors import error_response
from .origins import BrowserPolicy, is_loopback
from .settings import ServeSettings

KEY_COOKIE = "tunelab_api_key"  # the dashboard keeps the key here (set by dashboard.keep_key)
UPLOAD_PATHS = ("/v1/files",)  # routes whose body may be as large as max_upload_mb; the rest get max_body_mb


def check_bind(settings: ServeSettings) -> None:
    if not is_loopback(settings.host) and not settings.api_key:
        raise UserError(f"refusing to listen on {settings.host} without an API key: anyone who can reach it could "
                        "run jobs and read models. Pass --api-key KEY (or bind --host 127.0.0.1)")


def key_matches(given: str | None, key: str) -> bool:
    # compare_digest: the time taken does not reveal how much of a guess was right
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def request_key(conn: HTTPConnection) -> str | None:
    auth = conn.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return conn.headers.get("x-api-key") or conn.cookies.get(KEY_COOKIE)


def is_public(path: str, public: set[str]) -> bool:
    """Paths served without the key (no data behind them). An entry ending in '/' covers everything under it,
    except '/' itself: that is the dashboard's home page alone, never the whole server."""
    return path in public or any(p.endswith("/") and p != "/" and path.startswith(p) for p in public)


class Guard:
    """ASGI middleware: 403 for a Host or Origin a web page could be behind (every route, /healthz and the
    dashboard's pages included), 401 without the key (when one is set), 413 for a body over the limit."""

    def __init__(self, app, settings: ServeSettings, public: set[str]):
        self.app, self.settings, self.public = app, settings, public
        self.browsers = BrowserPolicy(settings.host, settings.allowed_hosts, settings.allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        conn = HTTPConnection(scope)
        host = conn.headers.get("host")
        refusal = self.browsers.host_refusal(host) or self.browsers.origin_refusal(
            scope["method"], scope["scheme"], host, conn.headers.get("origin"), conn.headers.get("referer"))
        if refusal:
            return await error_response(403, refusal)(scope, receive, send)
        key = self.settings.api_key
        if key and not is_public(scope["path"], self.public) and not key_matches(request_key(conn), key):
            given = request_key(conn) is not None
            message = "invalid API key" if given else ("missing API key: send 'Authorization: Bearer KEY' "
                                                       "(or X-API-Key: KEY)")
            return await error_response(401, message)(scope, receive, send)
        mb = self.settings.max_upload_mb if scope["path"] in UPLOAD_PATHS else self.settings.max_body_mb
        limit = int(mb * 1024 * 1024)
        too_large = f"request body is larger than the server's limit of {mb:g} MB"
        length = conn.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(413, too_large)(scope, receive, send)
        seen = 0

        async def counted():  # a body without Content-Length (chunked) is counted as it arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, too_large)
            return message

        return await self.app(scope, counted, send)


def resolve_inside(name: str, roots: list[Path], what: str) -> Path:
    """The existing file or dir a client named, resolved (symlinks followed) and required to lie inside a root.

    A relative name is looked up against the server's working directory, then against each root."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what}: a path is required")
    raw = Path(name)
    if ".." in raw.parts:
        raise UserError(f"{what}: '..' is not allowed in paths ({name})")
    if any(c in name for c in "*?["):
        raise UserError(f"{what}: glob patterns are not accepted by the service; name one file ({name})")
    candidates = [raw] if raw.is_absolute() else [Path(os.getcwd()) / raw, *(root / raw for root in roots)]
    outside = None
    for candidate in candidates:
        if not candidate.exists():
            continue
        real = candidate.resolve()
        if any(real.is_relative_to(root) for root in roots):
            return real
        outside = real
    if outside is not None:
        raise UserError(f"{what}: {name} resolves outside the server's data roots; the server reads only under "
                        f"--home and --data-root")
    raise UserError(f"{what}: not found: {name}")
