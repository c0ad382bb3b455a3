"""HTTP edge: the exception handlers, the API-key check, the /adapters routes, and ``install(app)``.

``install`` adds everything to an app: the handlers (every error goes through
``serving.errors.to_http``, so clients get OpenAI's error shape and the right
status), the OpenAI-compatible routes of ``serving.openai_routes`` and the
/adapters routes below, all but /health behind ``require_key``.
"""
from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loradex.hub.errors import LoradexError
from loradex.serving import openai_routes
from loradex.serving.deps import get_state
from loradex.serving.errors import BadRequest, Unauthorized, error_body, to_http
from loradex.serving.protocol import RegisterRequest


def require_key(request: Request) -> None:
    """401 unless 'Authorization: Bearer KEY' matches the configured key (when one is set)."""
    key = get_state(request).config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
    if not secrets.compare_digest(given.strip().encode(), key.encode()):
        raise Unauthorized("incorrect API key")


def _error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = to_http(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Add the routes and the exception handlers to ``app``."""

    @app.exception_handler(LoradexError)
    async def _loradex_error(request: Request, exc: LoradexError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query")]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return JSONResponse(error_body(f"invalid request: {param or 'body'}: {msg}", "invalid_request_error", param,
                                       "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, None, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _error_response(exc)

    router = APIRouter(dependencies=[Depends(require_key)])

    @router.get("/adapters")
    async def list_adapters(request: Request, base: str | None = Query(None)):
        state = get_state(request)
        from loradex.serving.hub_routes import adapter_listing

        return {"adapters": await run_in_threadpool(adapter_listing, state, base)}

    @router.post("/adapters", status_code=201, summary="Register an adapter (same as POST /v1/adapters)")
    async def register(request: Request):
        return JSONResponse(_jsonable(await register_from_request(get_state(request), request)), status_code=201)

    @router.delete("/adapters/{ref}", summary="Delete NAME@VERSION (same as DELETE /v1/adapters/{ref})")
    async def delete(ref: str, request: Request, force: bool = Query(False)):
        from loradex.serving.hub_routes import _delete

        row = await run_in_threadpool(_delete, get_state(request), ref, force)
        return {"adapter": row["adapter"], "version": row["version"], "deleted": True}

    app.include_router(openai_routes.open_router)
    app.include_router(openai_routes.router, dependencies=[Depends(require_key)])
    app.include_router(router)


# -- helpers of the /adapters routes ----------------------------------------------------

async def register_from_request(state, request: Request) -> dict:
    """Register from JSON ``{path, name[, base, description, allow_noop]}`` (a path on this machine) or an upload."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return await _register_upload(state, request)
    try:
        data = await request.json()
    except ValueError:
        raise BadRequest("POST /adapters takes JSON {path, name[, base, description]} or a multipart "
                         "upload with an archive in 'file' and a 'name' field", param=None) from None
    try:
        req = RegisterRequest.model_validate(data)
    except Exception as exc:
        raise RequestValidationError(getattr(exc, "errors", lambda: [])()) from None
    from loradex.hub.registry import register_adapter

    _check_server_path(state.config, req.path)
    return await run_in_threadpool(register_adapter, state.catalog, state.store, req.path, req.name,
                                   base=req.base, allow_noop=req.allow_noop, description=req.description,
                                   source=f"server-path:{req.path}")


def _check_server_path(config, path: str) -> None:
    """A folder on the server may be registered only under a root the operator allowed."""
    import os
    from pathlib import Path

    from loradex.serving.errors import PathNotAllowed

    roots = [Path(r).expanduser().resolve() for r in config.allow_path_register]
    if not roots:
        raise PathNotAllowed("registering a folder on the server is off; upload the adapter as an archive "
                             "(multipart 'file'), or start the server with --allow-path-register DIR")
    if path.startswith("hf:"):
        raise PathNotAllowed("hf: references are not registered through the API; use `loradex register` on the server")
    real = Path(os.path.realpath(Path(path).expanduser()))  # links followed, so none leads outside
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise PathNotAllowed(f"{path} is not under a folder this server allows (--allow-path-register)")


async def _register_upload(state, request: Request) -> dict:
    import shutil
    from pathlib import Path

    from loradex.hub.registry import register_adapter
    from loradex.serving.uploads import extract_archive

    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("file")
    name = form.get("name")
    if upload is None or isinstance(upload, str):
        raise BadRequest("multipart upload needs the archive in a 'file' field", param="file")
    if not isinstance(name, str) or not name:
        raise BadRequest("multipart upload needs a 'name' field", param="name")
    base = form.get("base") if isinstance(form.get("base"), str) else None
    description = form.get("description") if isinstance(form.get("description"), str) else None
    tmp = state.store.new_tmp()
    try:
        archive = Path(tmp) / "upload.bin"
        with open(archive, "wb") as out:
            while chunk := await upload.read(1 << 20):
                out.write(chunk)

        def work():
            folder = extract_archive(archive, Path(tmp) / "x", state.config.max_upload_bytes)
            return register_adapter(state.catalog, state.store, folder, name, base=base, description=description,
                                    source=f"upload:{upload.filename or 'archive'}")

        return await run_in_threadpool(work)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(data: Any) -> Any:
    from loradex.hub.render import to_jsonable

    return to_jsonable(data)
