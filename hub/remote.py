"""Forward catalog commands to a running ``loradex serve`` that owns the catalog.

While the server holds the DuckDB file no other process can open it, so
``loradex register``, ``list`` and ``delete`` send their work to the server's
HTTP API instead (the URL comes from the owner file the server writes beside
the catalog). The API key, if the server needs one, is read from
``LORADEX_API_KEY``.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from hub.errors import Conflict, InvalidAdapter, LoradexError, NotFound

_BY_STATUS = {404: NotFound, 409: Conflict, 400: InvalidAdapter, 422: InvalidAdapter}


def call(base_url: str, method: str, path: str, body: dict | None = None, timeout: float = 120.0):
    """JSON request to the server; its OpenAI-shaped errors become LoradexError subclasses."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base_url.rstrip("/") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    key = os.environ.get("LORADEX_API_KEY")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise _BY_STATUS.get(exc.code, LoradexError)(f"server at {base_url}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LoradexError(f"the catalog is owned by a server at {base_url}, which did not answer: {exc}") from None


def server_url(exc) -> str | None:
    holder = getattr(exc, "holder", None) or {}
    return holder.get("url") if holder.get("role") == "server" else None
