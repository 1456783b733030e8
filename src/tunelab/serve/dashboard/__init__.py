"""The web dashboard: a few HTML pages and their assets, served by the API's own process.

Every page is the same static shell; `app.js` reads the URL and fills it from the JSON API, so the dashboard
shows exactly what an API client sees and holds no data itself (the shell may be served without the API key;
the data routes behind it are not)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from ..security import KEY_COOKIE, key_matches

STATIC = Path(__file__).parent / "static"
# The servable files, fixed at import: a request names one of them and can never reach any other path.
ASSETS = {path.name: path for path in STATIC.iterdir() if path.is_file() and path.name != "index.html"}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
PAGES = ("/", "/new", "/endpoints", "/datasets", "/jobs/{job_id}")
# What the API-key guard lets through without a key (security.is_public: a trailing '/' covers a prefix): the
# shell and its assets, and the route that checks a key and keeps it; the pages then call the API with it.
PUBLIC = {"/", "/new", "/endpoints", "/datasets", "/jobs/", "/assets/", "/dashboard/key"}
NO_CACHE = {"Cache-Control": "no-cache"}  # an upgraded server serves its new pages at once

router = APIRouter(include_in_schema=False)


def shell() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)


for _page in PAGES:
    router.add_api_route(_page, shell, methods=["GET"])


@router.get("/assets/{name}")
def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise HTTPException(404, f"no dashboard asset named {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"), headers=NO_CACHE)


class KeyForm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str


@router.post("/dashboard/key", status_code=204)
def keep_key(form: KeyForm, request: Request) -> Response:
    """Set the key cookie from the server, so that it is HttpOnly (no script on the page can read it) and
    SameSite=Strict (no other site's request carries it); a wrong key is refused and not kept."""
    key = request.app.state.settings.api_key
    if not key:
        raise HTTPException(400, "this server has no API key; nothing to keep")
    if not key_matches(form.key, key):
        raise HTTPException(401, "invalid API key")
    response = Response(status_code=204)
    response.set_cookie(KEY_COOKIE, form.key, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response
