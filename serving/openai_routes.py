"""The OpenAI-compatible routes (/v1/*), the simple /generate API, health, readiness and metrics.

Thin: parse with ``serving.protocol``, resolve and run through the engine
(``serving.deps.get_engine``), shape the answer. Streamed answers are
server-sent events (``serving.streaming``); JSON answers have a
``response_model``. ``serving.routes.install`` adds these routers to the app,
``router`` behind the API key and ``open_router`` (``/health``) without it.
Errors are raised as typed exceptions and become OpenAI-shaped bodies in the
app's exception handlers.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from loradex.serving.deps import get_engine, get_state
from loradex.serving.errors import BadRequest
from loradex.serving.protocol import (
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    Ready,
    new_id,
    now,
)
from loradex.serving.streaming import Run, sse_response

STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}}

open_router = APIRouter()
router = APIRouter()


@open_router.get("/health", response_model=Health)
async def health():
    return Health()


@router.get("/ready", response_model=Ready)
async def ready(eng=Depends(get_engine)):
    return Ready(**eng.stats())


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state=Depends(get_state)):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=ModelList)
async def list_models(state=Depends(get_state), eng=Depends(get_engine)):
    return await run_in_threadpool(_model_cards, state, eng)


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, eng=Depends(get_engine)):
    target = await run_in_threadpool(eng.resolve, model)
    root = eng.base_name
    return ModelCard(id=model, created=now(), root=root, parent=None if target.row is None else root)


@router.post("/v1/completions", response_model=CompletionResponse, responses=STREAMED)
async def completions(body: CompletionRequest, request: Request, adapter: str | None = Query(None),
                      state=Depends(get_state), eng=Depends(get_engine)):
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
    head = {"id": rid, "object": "text_completion", "created": created, "model": target.model}

    def chunks(index: int, text: str, finish: str | None) -> list[dict]:
        if not (text or finish):
            return []
        return [{**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}]

    run = await Run.start(eng, target, jobs, params, request)
    if body.stream:
        return sse_response(request, run, chunks, _usage_chunk(body, head))
    texts, finishes, usage = await run.collect(request)
    return CompletionResponse(**head, usage=usage, choices=[
        {"index": i, "text": texts[i], "finish_reason": finishes[i]} for i in range(len(jobs))])


@router.post("/v1/chat/completions", response_model=ChatResponse, responses=STREAMED)
async def chat(body: ChatRequest, request: Request, adapter: str | None = Query(None),
               state=Depends(get_state), eng=Depends(get_engine)):
    body.refuse_unsupported()
    _check_limits(state, body, 1)
    target = await run_in_threadpool(eng.resolve, body.model, adapter or body.adapter)
    ids = eng.encode(messages=body.template_messages())
    jobs = [ids] * body.n
    params = _params(eng, body, jobs, body.max_completion_tokens or body.max_tokens, "messages")
    rid, created = new_id("chatcmpl"), now()
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": target.model}
    started: set[int] = set()

    def chunks(index: int, text: str, finish: str | None) -> list[dict]:
        out = []
        if index not in started:  # each choice's first chunk carries the role
            started.add(index)
            out.append({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        if text or finish:
            out.append({"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish})
        return [{**head, "choices": [c]} for c in out]

    run = await Run.start(eng, target, jobs, params, request)
    if body.stream:
        return sse_response(request, run, chunks, _usage_chunk(body, head))
    texts, finishes, usage = await run.collect(request)
    return ChatResponse(id=rid, created=created, model=target.model, usage=usage, choices=[
        {"index": i, "message": {"content": texts[i]}, "finish_reason": finishes[i]} for i in range(len(jobs))])


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, state=Depends(get_state), eng=Depends(get_engine)):
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
                            stop=stops, seed=body.seed, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                            prompt_field="messages" if body.messages else "prompt")
    run = await Run.start(eng, target, [ids], [params], request)
    texts, finishes, usage = await run.collect(request)
    return GenerateResponse(text=texts[0], adapter=target.label if target.row is not None else None,
                            model=target.model, path=target.path, finish_reason=finishes[0], usage=usage)


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
        seed = None if body.seed is None else body.seed + i  # n samples of one prompt differ, reproducibly
        out.append(eng.params_for(len(ids), max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=body.stop_list(), seed=seed, min_tokens=body.min_tokens,
                                  ignore_eos=body.ignore_eos, prompt_field=prompt_field))
    return out


def _usage_chunk(body, head: dict):
    """The stream's final usage chunk (``stream_options.include_usage``), or None when not asked for."""
    if not (body.stream_options and body.stream_options.include_usage):
        return None
    return lambda usage: {**head, "choices": [], "usage": usage}


def _model_cards(state, eng) -> ModelList:
    from loradex.hub.registry import list_adapters

    from loradex.evals.config import config_label
    from loradex.evals.record import describe_score, scores_for_config

    created = now()
    base = eng.base_name
    cfg = state.served_config
    cards = [ModelCard(id=base, created=created, root=base, served_as=config_label(cfg))]
    seen: set[str] = set()
    rows = list_adapters(state.catalog, base=base)
    scores = scores_for_config(state.catalog, cfg, version_ids=[r["id"] for r in rows]) if rows else {}
    for row in rows:
        score = scores.get(row["id"])
        extra = {"version": row["version"], "served_as": config_label(cfg), "score": score,
                 "score_note": describe_score(f"{row['adapter']}@{row['version']}", score, cfg)}
        ids = []
        if row["adapter"] not in seen:
            seen.add(row["adapter"])
            ids.append(row["adapter"])  # the bare name means the latest version
        ids.append(f"{row['adapter']}@{row['version']}")
        ids += [f"{row['adapter']}@{a}" for a in (row.get("aliases") or [])]
        ts = int(row["created_at"].timestamp()) if row.get("created_at") else created
        cards += [ModelCard(id=i, created=ts, root=base, parent=base, **extra) for i in ids]
    return ModelList(data=cards)
