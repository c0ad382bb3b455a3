"""The page's shell and static assets: ``GET /`` and ``GET /web/static/{file}``.

Open without the API key (like ``/health``): they hold no data. The page's own
requests go to the hub API (``/v1/...``) with the key the user typed, kept in
the tab's sessionStorage. Only files under ``static/`` with a known suffix are
served; every response forbids loading anything from another origin (CSP).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from loradex.hub.errors import NotFound

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# same-origin only: a page that tried to load a font or script from a CDN would fail loudly in tests
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(tags=["web"], include_in_schema=False)


@router.get("/")
async def index():
    return FileResponse(STATIC / "index.html", media_type=TYPES[".html"], headers=HEADERS)


@router.get("/web/static/{name:path}")
async def static(name: str):
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or path.suffix not in TYPES or not path.is_file():
        raise NotFound(f"no web asset {name!r}")
    return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)
