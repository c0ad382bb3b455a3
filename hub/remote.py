"""The catalog through a running server: ``RemoteCatalog`` and ``connect``.

While ``loradex serve`` owns the catalog file no other process can open it, so
``connect(settings)`` hands back a ``RemoteCatalog`` for the server's URL (read
from the owner file the server writes beside the catalog). Every ``@op``
function (``hub/ops.py``) given one sends itself to ``POST /v1/ops/NAME``; raw
SQL on it is refused, which keeps SQL on the side that holds the file.

A serving replica (``loradex serve --registry URL``) uses the same class for a
registry on another machine, and ``materialize`` to copy the artifacts it needs
into its own store, by sha256, from ``GET /v1/store/objects/SHA``.

The API key, when the server needs one, comes from ``LORADEX_API_KEY``.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

from loradex.hub.errors import CatalogLocked, IntegrityError, LoradexError, RemoteUnsupported

OP_TIMEOUT_S = 900.0  # provisioning the default base on a cold server takes about a minute


def _error_classes() -> dict[str, type]:
    found: dict[str, type] = {}
    todo = [LoradexError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def raise_remote(status: int, headers, body: bytes, url: str) -> None:
    """Turn a server's error answer back into the exception the server raised."""
    try:
        err = json.loads(body)["error"]
        message = err["message"]
    except (ValueError, KeyError, TypeError):
        err, message = {}, f"HTTP {status} from {url}"
    name = headers.get("X-Loradex-Error") if headers is not None else None
    cls = _error_classes().get(name or "", None)
    if cls is None:
        exc = LoradexError(message)
        code = headers.get("X-Loradex-Exit") if headers is not None else None
        if code and code.isdigit():
            exc.exit_code = int(code)
        raise exc
    exc = cls.__new__(cls)
    LoradexError.__init__(exc, message)
    if err.get("param") is not None:
        exc.param = err["param"]
    raise exc


class RemoteCatalog:
    """The catalog of the server at ``url``, reached through its ops API."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = OP_TIMEOUT_S, *,
                 owner: str | None = None):
        self.url = url.rstrip("/")
        self.owner = owner or f"the loradex server at {self.url}"
        self.path = self.url
        self.api_key = api_key if api_key is not None else os.environ.get("LORADEX_API_KEY") or None
        self.timeout = timeout
        self.version_lock = threading.RLock()

    # -- the ops channel -------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None, *, timeout: float | None = None,
                content_type: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise_remote(exc.code, exc.headers, exc.read(), self.url)
        except (urllib.error.URLError, OSError) as exc:
            raise CatalogLocked(f"{self.owner} did not answer ({getattr(exc, 'reason', exc)}); "
                                f"wait for it to start, or stop it to use the catalog file directly") from None

    def call_op(self, name: str, payload: dict, *, write: bool = False):
        from loradex.hub.ops import encode

        with self.request("POST", f"/v1/ops/{name}", encode(payload)) as resp:
            return json.loads(resp.read() or b"null")

    def get_json(self, path: str):
        with self.request("GET", path) as resp:
            return json.loads(resp.read() or b"null")

    # -- what a Catalog has that a remote one must not be asked for -------------------
    def _refuse(self, *_a, **_k):
        raise RemoteUnsupported(
            f"this operation needs the catalog file, which the server at {self.url} owns; "
            f"stop the server or use its API")

    query = one = execute = cursor = transaction = _refuse

    def close(self) -> None:
        pass

    def __enter__(self) -> "RemoteCatalog":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def __repr__(self) -> str:
        return f"RemoteCatalog({self.url!r})"


def is_remote(catalog) -> bool:
    return isinstance(catalog, RemoteCatalog)


def connect(settings, *, wait_s: float | None = None):
    """The catalog for a short command: the file itself, or the owning server's API."""
    from loradex.hub.catalog import Catalog

    registry = os.environ.get("LORADEX_REGISTRY")
    if registry:
        return RemoteCatalog(registry)
    try:
        return Catalog.open(settings.catalog_path, wait_s=settings.lock_wait_s if wait_s is None else wait_s)
    except CatalogLocked as exc:
        holder = getattr(exc, "holder", None) or {}
        if holder.get("role") == "server" and holder.get("url"):
            return RemoteCatalog(holder["url"], owner=f"catalog {settings.catalog_path} is owned by `loradex serve` "
                                                      f"(pid {holder.get('pid', '?')}) at {holder['url']}, which")
        raise


def materialize(catalog, store, relpath: str, files: dict[str, str], what: str) -> Path:
    """A verified local folder for a stored snapshot, fetching missing files by sha256 from a remote registry."""
    from loradex.hub.store import file_sha256, manifest_digest

    try:
        return store.verified_path(relpath, files, what)
    except IntegrityError:
        if not is_remote(catalog):
            raise
    tmp = store.new_tmp()
    try:
        folder = tmp / "snapshot"
        for name, sha in files.items():
            dest = folder / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            local = store.object_path(sha)
            if local.is_file():
                shutil.copyfile(local, dest)
            else:
                with catalog.request("GET", f"/v1/store/objects/{sha}") as resp, open(dest, "wb") as out:
                    shutil.copyfileobj(resp, out, 1 << 20)
            # checked before anything enters the store: a bad fetch leaves no object or snapshot behind
            if file_sha256(dest) != sha:
                raise IntegrityError(f"{what}: {name} fetched from {catalog.url} does not match its recorded sha256")
        snap = store.put_folder(folder, list(files), move=True)
        if snap.digest != manifest_digest(files):
            raise IntegrityError(f"{what}: files fetched from {catalog.url} do not match their recorded sha256")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store.verified_path(snap.relpath, files, what)
