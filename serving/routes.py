"""HTTP routes: OpenAI-compatible /v1/*, the simple API, health, readiness and metrics.

Thin: parse with ``serving.protocol``, resolve and run through the engine,
shape the answer. Every error goes through ``serving.errors.to_http``, so
clients get OpenAI's error shape and the right status.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub.errors import LoradexError
from serving.errors import BadRequest, Cancelled, Unauthorized, error_body, to_http
from serving.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    ModelCard,
    ModelList,
    RegisterRequest,
    new_id,
    now,
)

DISCONNECT_POLL_S = 1.0


def get_state(request: Request):
    return request.app.state.server


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

    open_router = APIRouter()
    router = APIRouter(dependencies=[Depends(require_key)])

    @open_router.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(request: Request):
        state = get_state(request)
        eng = state.require_engine()
        return {"ready": True, **eng.stats()}

    @router.get("/metrics")
    async def metrics(request: Request):
        return PlainTextResponse(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/models")
    async def list_models(request: Request):
        state = get_state(request)
        eng = state.require_engine()
        return (await run_in_threadpool(_model_cards, state, eng)).model_dump()

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        state = get_state(request)
        eng = state.require_engine()
        target = await run_in_threadpool(eng.resolve, model)
        root = eng.base_name
        return ModelCard(id=model, created=now(), root=root, parent=None if target.row is None else root).model_dump()

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, adapter: str | None = Query(None)):
        state = get_state(request)
        eng = state.require_engine()
        body.refuse_unsupported()
        prompts = body.prompts()
        _check_limits(state, body, len(prompts))
        target = await run_in_threadpool(eng.resolve, body.model, adapter or body.adapter)
        jobs = []
        for prompt in prompts:
            ids = eng.encode(prompt)
            for _ in range(body.n):
                jobs.append(ids)
        params = _params(eng, body, jobs, body.max_tokens, "prompt")
        rid, created = new_id("cmpl"), now()

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": target.model,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        def usage_chunk(usage: dict) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": target.model,
                    "choices": [], "usage": usage}

        run = await _Run.start(eng, target, jobs, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(request, run, lambda i, t, f: [chunk(i, t, f)] if (t or f) else [],
                        usage_chunk if include_usage else None)
        texts, finishes, usage = await run.collect(request)
        return {"id": rid, "object": "text_completion", "created": created, "model": target.model,
                "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finishes[i]}
                            for i in range(len(jobs))],
                "usage": usage}

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request, adapter: str | None = Query(None)):
        state = get_state(request)
        eng = state.require_engine()
        body.refuse_unsupported()
        _check_limits(state, body, 1)
        target = await run_in_threadpool(eng.resolve, body.model, adapter or body.adapter)
        ids = eng.encode(messages=body.template_messages())
        jobs = [ids] * body.n
        params = _params(eng, body, jobs, body.max_completion_tokens or body.max_tokens, "messages")
        rid, created = new_id("chatcmpl"), now()
        started: set[int] = set()

        def chunks(index: int, text: str, finish: str | None) -> list[dict]:
            out = []
            if index not in started:
                started.add(index)
                out.append({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            if text or finish:
                out.append({"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish})
            return [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": target.model,
                     "choices": [c]} for c in out]

        def usage_chunk(usage: dict) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": target.model,
                    "choices": [], "usage": usage}

        run = await _Run.start(eng, target, jobs, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(request, run, chunks, usage_chunk if include_usage else None)
        texts, finishes, usage = await run.collect(request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": target.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                             "finish_reason": finishes[i]} for i in range(len(jobs))],
                "usage": usage}

    @router.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        state = get_state(request)
        eng = state.require_engine()
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("give exactly one of prompt or messages", param="prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > state.config.max_stop:
            raise BadRequest(f"at most {state.config.max_stop} stop strings", param="stop")
        target = await run_in_threadpool(eng.resolve, None, body.adapter)
        if body.messages is not None:
            ids = eng.encode(messages=[{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                       for m in body.messages])
        else:
            ids = eng.encode(body.prompt)
        params = eng.params_for(len(ids), max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=stops, seed=body.seed, prompt_field="messages" if body.messages else "prompt")
        run = await _Run.start(eng, target, [ids], [params])
        texts, finishes, usage = await run.collect(request)
        return {"text": texts[0], "adapter": target.label if target.row is not None else None, "model": target.model,
                "path": target.path, "finish_reason": finishes[0], "usage": usage}

    @router.get("/adapters")
    async def list_adapters(request: Request, base: str | None = Query(None)):
        state = get_state(request)
        return {"adapters": await run_in_threadpool(_adapter_listing, state, base)}

    @router.post("/adapters", status_code=201, summary="Register an adapter (same as POST /v1/adapters)")
    async def register(request: Request):
        return JSONResponse(_jsonable(await register_from_request(get_state(request), request)), status_code=201)

    @router.delete("/adapters/{ref}", summary="Delete NAME@VERSION (same as DELETE /v1/adapters/{ref})")
    async def delete(ref: str, request: Request, force: bool = Query(False)):
        from serving.hub_routes import _delete

        row = await run_in_threadpool(_delete, get_state(request), ref, force)
        return {"adapter": row["adapter"], "version": row["version"], "deleted": True}

    app.include_router(open_router)
    app.include_router(router)


# -- helpers -----------------------------------------------------------------------

def _check_limits(state, body, n_prompts: int) -> None:
    cfg = state.config
    if body.n > cfg.max_n:
        raise BadRequest(f"n={body.n} is over this server's limit of {cfg.max_n}", param="n")
    if n_prompts > cfg.max_prompts:
        raise BadRequest(f"{n_prompts} prompts in one request; at most {cfg.max_prompts}", param="prompt")
    if n_prompts == 0:
        raise BadRequest("prompt must not be empty", param="prompt")
    stops = body.stop_list()
    if len(stops) > cfg.max_stop:
        raise BadRequest(f"{len(stops)} stop strings; at most {cfg.max_stop}", param="stop")


def _params(eng, body, jobs: list[list[int]], max_tokens: int | None, prompt_field: str) -> list:
    out = []
    for i, ids in enumerate(jobs):
        seed = None if body.seed is None else body.seed + i
        out.append(eng.params_for(len(ids), max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=body.stop_list(), seed=seed, prompt_field=prompt_field))
    return out


class _Run:
    """Several sequences (prompts x n) of one request, their events merged on one queue."""

    def __init__(self, jobs: list[list[int]]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []
        self.jobs = jobs
        self.pending: list = []  # events read ahead while checking for an early error

    @classmethod
    async def start(cls, eng, target, jobs: list[list[int]], params: list) -> "_Run":
        run = cls(jobs)
        loop = asyncio.get_running_loop()
        for i, (ids, p) in enumerate(zip(jobs, params)):
            def sink(ev, i=i):
                try:
                    loop.call_soon_threadsafe(run.queue.put_nowait, (i, ev))
                except RuntimeError:
                    pass
            try:
                run.handles.append(eng.submit(ids, target, p, sink))
            except BaseException:
                run.cancel()
                raise
        # Wait for the first event, so that a failure to start (bad adapter file) is an HTTP error, not a stream.
        first = await run.queue.get()
        if first[1].error is not None:
            run.cancel()
            raise first[1].error
        run.pending.append(first)
        return run

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Any]]:
        done: set[int] = set()
        while len(done) < len(self.jobs):
            if self.pending:
                item = self.pending.pop(0)
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.cancel()
                        raise Cancelled("client disconnected") from None
                    continue
            i, ev = item
            if ev.done:
                done.add(i)
            yield i, ev

    async def collect(self, request: Request) -> tuple[list[str], list[str], dict]:
        texts = [""] * len(self.jobs)
        finishes = ["stop"] * len(self.jobs)
        completion = 0
        try:
            async for i, ev in self.events(request):
                if ev.error is not None:
                    raise ev.error
                texts[i] += ev.text
                if ev.finish_reason:
                    finishes[i] = ev.finish_reason
                    completion += ev.usage["completion_tokens"]
        finally:
            self.cancel()
        return texts, finishes, _usage(self.jobs, completion)


def _usage(jobs: list[list[int]], completion: int) -> dict:
    prompt = sum(len(ids) for ids in _distinct(jobs))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _distinct(jobs: list[list[int]]) -> list[list[int]]:
    out, last = [], None
    for ids in jobs:  # n copies of a prompt are adjacent and are the same list object
        if ids is not last:
            out.append(ids)
        last = ids
    return out


def _sse(request: Request, run: _Run, to_chunks, usage_chunk) -> StreamingResponse:
    async def body():
        completion = 0
        try:
            async for i, ev in run.events(request):
                if ev.error is not None:
                    status, err, _ = to_http(ev.error)
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                if ev.finish_reason:
                    completion += ev.usage["completion_tokens"]
                for c in to_chunks(i, ev.text, ev.finish_reason):
                    yield f"data: {json.dumps(c)}\n\n"
            if usage_chunk is not None:
                yield f"data: {json.dumps(usage_chunk(_usage(run.jobs, completion)))}\n\n"
            yield "data: [DONE]\n\n"
        except Cancelled:
            return
        finally:
            run.cancel()  # client gone or stream finished: free the batch slots

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _model_cards(state, eng) -> ModelList:
    from hub.registry import list_adapters

    created = now()
    base = eng.base_name
    cards = [ModelCard(id=base, created=created, root=base)]
    seen: set[str] = set()
    for row in list_adapters(state.catalog, base=base):
        ids = []
        if row["adapter"] not in seen:
            seen.add(row["adapter"])
            ids.append(row["adapter"])  # the bare name means the latest version
        ids.append(f"{row['adapter']}@{row['version']}")
        ids += [f"{row['adapter']}@{a}" for a in (row.get("aliases") or [])]
        ts = int(row["created_at"].timestamp()) if row.get("created_at") else created
        cards += [ModelCard(id=i, created=ts, root=base, parent=base) for i in ids]
    return ModelList(data=cards)


def _adapter_listing(state, base: str | None) -> list[dict]:
    from hub.registry import list_adapters

    rows = list_adapters(state.catalog, base=base)
    scores: dict[int, dict] = {}
    for ev in state.catalog.query(
            "SELECT id, adapter_version_id, metrics, paired, win_rate, n, created_at FROM eval_runs "
            "WHERE adapter_version_id IS NOT NULL ORDER BY id"):
        scores[ev["adapter_version_id"]] = {"eval_run": ev["id"], "n": ev["n"], "metrics": ev["metrics"],
                                            "lift": ev["paired"], "win_rate": ev["win_rate"]}
    loaded = set()
    if state.engine is not None:
        loaded = {(e["adapter"], e["version"]) for e in state.engine.cache.loaded()}
    out = []
    for row in rows:
        item = _jsonable({k: row[k] for k in ("adapter", "version", "base", "aliases", "rank", "alpha", "target_modules",
                                              "param_count", "size_bytes", "digest", "quantization", "created_at")})
        item["ref"] = f"{row['adapter']}@{row['version']}"
        item["scores"] = scores.get(row["id"])
        item["loaded"] = (row["adapter"], row["version"]) in loaded
        out.append(item)
    return out


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
    from hub.registry import register_adapter

    return await run_in_threadpool(register_adapter, state.catalog, state.store, req.path, req.name,
                                   base=req.base, allow_noop=req.allow_noop, description=req.description,
                                   source=f"server-path:{req.path}")


async def _register_upload(state, request: Request) -> dict:
    import shutil
    from pathlib import Path

    from hub.registry import register_adapter
    from serving.uploads import extract_archive

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
    from hub.render import to_jsonable

    return to_jsonable(data)
