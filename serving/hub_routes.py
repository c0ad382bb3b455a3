"""The hub API: the registry, its scores and jobs over HTTP, while the server owns the catalog.

Two layers, one set of functions underneath:

* resource routes (``/v1/bases``, ``/v1/adapters``, ``/v1/adapters/{name}/aliases/{alias}``,
  ``/v1/evals``, ``/v1/runs``, ``/v1/leaderboard``, ``/v1/merges``, ``/v1/exports``,
  ``/v1/reviews``, ``/v1/jobs``, ``/v1/store/objects/{sha256}``) for people, scripts and the
  web page;
* ``POST /v1/ops/NAME``: every ``@op`` catalog function (``hub/ops.py``), one route each with
  a body model built from its signature. ``loradex`` commands and long jobs running in their
  own processes (train, eval, merge, export) read and write the catalog through these, so a
  result is recorded exactly as when they open the file themselves.

Every handler runs the library call in a worker thread: a slow write never stalls the
event loop that streams tokens.
"""
import inspect
from typing import Any, Optional

import duckdb
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from pydantic import ConfigDict, create_model

from loradex.hub.errors import NotFound
from loradex.hub.ops import encode, load_all
from loradex.serving.deps import get_state
from loradex.serving.errors import BadRequest
from loradex.serving.hub_protocol import (
    AddBaseRequest,
    AdapterDetail,
    AdapterVersion,
    AliasMove,
    BaseRow,
    Job,
    JobRequest,
    RecordEvalRequest,
    ReviewExportRequest,
    ReviewImportRequest,
    SetAliasRequest,
    VerifyResult,
)


def _json(value: Any, status: int = 200) -> Response:
    from loradex.hub.render import to_jsonable

    return Response(encode(to_jsonable(value)), status_code=status, media_type="application/json")


def actor_of(request: Request, given: Optional[str] = None) -> str:
    """Who is calling: what the client says (``X-Loradex-Actor`` or a field), else its address."""
    if given:
        return given
    header = request.headers.get("x-loradex-actor")
    if header:
        return header
    client = request.client
    return f"http:{client.host}" if client else "http"


async def _run(fn, *args, **kwargs):
    return await run_in_threadpool(fn, *args, **kwargs)


# -- bases ----------------------------------------------------------------------------------
bases = APIRouter(prefix="/v1/bases", tags=["bases"])


@bases.get("", response_model=list[BaseRow], summary="List base models")
async def list_bases(state=Depends(get_state)):
    from loradex.hub.bases import list_bases as fn

    return _json(await _run(fn, state.catalog))


@bases.post("", response_model=BaseRow, status_code=201, summary="Add a base model")
async def add_base(body: AddBaseRequest, request: Request, state=Depends(get_state)):
    from loradex.hub.bases import add_base as fn

    try:  # a server path as the source: the same rules as the bases.add op
        _confine_server_paths(request, state, "bases.add", {"source": body.source})
    except ARGUMENT_ERRORS as exc:
        raise BadRequest(f"unusable source ({type(exc).__name__}: {exc})", param="source") from exc
    return _json(await _run(fn, state.catalog, state.store, body.name, body.source), 201)


# -- adapters and aliases -------------------------------------------------------------------------
adapters = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@adapters.get("", response_model=list[AdapterVersion], summary="List adapter versions")
async def list_adapters(state=Depends(get_state), base: Optional[str] = Query(None)):
    """Every ready version with its aliases, its score under this server's configuration and whether it is loaded."""
    return _json(await _run(adapter_listing, state, base))


def adapter_listing(state, base: Optional[str]) -> list[dict]:
    """Ready versions with aliases, whether loaded, and their score under the configuration this server runs.

    ``score`` is None when a version has no eval under this server's configuration
    (``score_note`` then says so and which command scores it as served).
    """
    from loradex.evals.config import config_key, config_label
    from loradex.evals.record import describe_score, scores_for_config
    from loradex.hub.registry import list_adapters
    from loradex.hub.render import to_jsonable

    rows = list_adapters(state.catalog, base=base)
    cfg = state.served_config
    scores = scores_for_config(state.catalog, cfg, version_ids=[r["id"] for r in rows]) if cfg and rows else {}
    loaded = set()
    if state.engine is not None:
        loaded = {(e["adapter"], e["version"]) for e in state.engine.cache.loaded()}
    out = []
    for row in rows:
        item = to_jsonable({k: row[k] for k in ("adapter", "version", "base", "aliases", "rank", "alpha",
                                                 "target_modules", "param_count", "size_bytes", "digest",
                                                 "quantization", "created_at")})
        ref = f"{row['adapter']}@{row['version']}"
        item["ref"] = ref
        score = scores.get(row["id"])
        item["score"] = to_jsonable(score)
        item["served_config"] = {"key": config_key(cfg), "label": config_label(cfg)} if cfg else None
        item["score_note"] = describe_score(ref, score, cfg) if cfg else "the base is still loading"
        item["loaded"] = (row["adapter"], row["version"]) in loaded
        out.append(item)
    return out


@adapters.get("/{ref}/score", summary="A version's score under this server's configuration (or why there is none)")
async def served_score(ref: str, state=Depends(get_state)):
    from loradex.hub.registry import resolve

    row = await _run(resolve, state.catalog, ref)
    listing = await _run(adapter_listing, state, row["base"])
    return _json(next(i for i in listing if i["ref"] == f"{row['adapter']}@{row['version']}"))


@adapters.post("", status_code=201, summary="Register an adapter (server path as JSON, or a multipart upload)")
async def register(request: Request, state=Depends(get_state)):
    from loradex.serving.routes import register_from_request

    return _json(await register_from_request(state, request), 201)


@adapters.get("/{ref}", response_model=AdapterDetail, summary="An adapter: versions, files, run, scores, reviews, merges, exports")
async def show(ref: str, state=Depends(get_state)):
    from loradex.hub.queries import adapter_detail

    return _json(await _run(adapter_detail, state.catalog, ref, served_config=state.served_config))


@adapters.delete("/{ref}", summary="Delete NAME@VERSION (refused while aliased unless force)")
async def delete(ref: str, state=Depends(get_state), force: bool = Query(False)):
    row = await _run(_delete, state, ref, force)
    return _json({"adapter": row["adapter"], "version": row["version"], "deleted": True})


def _delete(state, ref: str, force: bool) -> dict:
    from loradex.hub.registry import delete_version

    row = delete_version(state.catalog, state.store, ref, force=force)
    forget(state, row)
    return row


def forget(state, row: dict) -> None:
    """A deleted version leaves the serving cache too."""
    if state.engine is not None:
        state.engine.forget(row)


@adapters.get("/{ref}/verify", response_model=list[VerifyResult], summary="Re-hash stored files (sha256)")
async def verify(ref: str, state=Depends(get_state)):
    from loradex.hub.registry import verify as fn

    return _json(await _run(fn, state.catalog, state.store, ref))


@adapters.put("/{name}/aliases/{alias}", response_model=AliasMove,
              summary="Point an alias at a version (production runs the promotion gate)")
async def set_alias(name: str, alias: str, body: SetAliasRequest, request: Request, state=Depends(get_state)):
    """409 ``gate_refused`` with the gate's numbers when ``production`` fails the gate and ``force`` is not set."""
    from loradex.hub.registry import set_alias as fn

    return _json(await _run(fn, state.catalog, f"{name}@{body.version}", alias, force=body.force,
                            reason=body.reason, actor=actor_of(request, body.actor),
                            served_config=state.served_config))


@adapters.delete("/{name}/aliases/{alias}", summary="Remove an alias")
async def remove_alias(name: str, alias: str, request: Request, state=Depends(get_state)):
    from loradex.hub.registry import remove_alias as fn

    await _run(fn, state.catalog, name, alias, actor=actor_of(request))
    return _json({"adapter": name, "alias": alias, "removed": True})


@adapters.get("/{name}/aliases", summary="Alias moves of an adapter, newest first (who, when, forced, reason)")
async def alias_history(name: str, state=Depends(get_state)):
    from loradex.hub.queries import alias_events

    return _json(await _run(alias_events, state.catalog, name))


# -- evals, training runs, leaderboard, merges, exports, reviews --------------------------------
scores = APIRouter(prefix="/v1", tags=["scores"])


@scores.get("/evals", summary="Eval runs, newest first")
async def list_evals(state=Depends(get_state), adapter: Optional[str] = Query(None)):
    from loradex.hub.queries import eval_runs

    return _json(await _run(eval_runs, state.catalog, adapter))


@scores.get("/evals/{run_id}", summary="One eval run with its per-sample rows")
async def show_eval(run_id: int, state=Depends(get_state)):
    from loradex.evals.record import get_run, get_samples

    run = await _run(get_run, state.catalog, run_id)
    return _json({"run": run, "samples": await _run(get_samples, state.catalog, run_id)})


@scores.post("/evals", status_code=201, summary="Record an eval run computed elsewhere")
async def record_eval(body: RecordEvalRequest, state=Depends(get_state)):
    from loradex.evals.record import store_run

    try:
        return _json(await _run(store_run, state.catalog, body.run, body.samples), 201)
    except ARGUMENT_ERRORS as exc:  # a run dict without the fields evaluate() records
        raise BadRequest(f"the eval run is incomplete ({type(exc).__name__}: {exc}); send what `loradex eval` "
                         f"records (see GET /v1/evals/ID)", param="run") from exc


@scores.get("/runs", summary="Training runs, newest first")
async def list_runs(state=Depends(get_state), adapter: Optional[str] = Query(None)):
    from loradex.hub.queries import training_runs

    return _json(await _run(training_runs, state.catalog, adapter))


@scores.get("/runs/{run_id}", summary="One training run: config, data, outcome, cost")
async def show_run(run_id: int, state=Depends(get_state)):
    from loradex.training.records import get_run

    return _json(await _run(get_run, state.catalog, run_id))


@scores.get("/runs/{run_id}/curve", summary="A training run's loss curve")
async def run_curve(run_id: int, state=Depends(get_state)):
    from loradex.hub.queries import loss_curve

    return _json(await _run(loss_curve, state.catalog, run_id))


@scores.get("/leaderboard", summary="Adapter versions ranked by eval score per data set, with CIs and lift")
async def leaderboard(state=Depends(get_state), data: Optional[str] = Query(None, description="data sha256 (prefix)")):
    from loradex.evals.config import config_key
    from loradex.evals.leaderboard import build

    sections = await _run(build, state.catalog, data)
    served = config_key(state.served_config)
    for sec in sections:  # `served`: the section measured what this server runs
        sec["served"] = served is not None and sec["config_key"] == served
    return _json({"sections": sections})


@scores.get("/merges", summary="Merged models, newest first")
async def list_merges(state=Depends(get_state), adapter: Optional[str] = Query(None)):
    from loradex.hub.queries import merges

    return _json(await _run(merges, state.catalog, adapter))


@scores.get("/exports", summary="Exports, newest first")
async def list_exports(state=Depends(get_state), adapter: Optional[str] = Query(None)):
    from loradex.hub.queries import exports

    return _json(await _run(exports, state.catalog, adapter))


@scores.get("/reviews", summary="Human review rounds, newest first")
async def list_reviews(state=Depends(get_state), adapter: Optional[str] = Query(None)):
    from loradex.hub.queries import reviews

    return _json(await _run(reviews, state.catalog, adapter))


@scores.post("/reviews/export", status_code=201, summary="Write a blinded A/B review sheet (a path on the server)")
async def review_export(body: ReviewExportRequest, state=Depends(get_state)):
    from loradex.evals.review import export_sheet

    return _json(await _run(export_sheet, state.catalog, body.ref, body.out, n=body.n, seed=body.seed), 201)


@scores.post("/reviews/import", summary="Import a filled review sheet (a path on the server)")
async def review_import(body: ReviewImportRequest, state=Depends(get_state)):
    from loradex.evals.review import import_sheet

    return _json(await _run(import_sheet, state.catalog, body.sheet))


# -- jobs and the store ---------------------------------------------------------------------------
jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@jobs.post("", response_model=Job, status_code=202, summary="Start a merge, export or eval job")
async def start_job(body: JobRequest, request: Request, state=Depends(get_state)):
    """Returns at once with the job's id; poll ``GET /v1/jobs/{id}``."""
    return _json(await _run(state.jobs.submit, body.kind, body.params, actor_of(request)), 202)


@jobs.get("", response_model=list[Job], summary="Jobs, newest first")
async def list_jobs(state=Depends(get_state), job_state: Optional[str] = Query(None, alias="state")):
    from loradex.hub.jobs import list_jobs as fn

    return _json(await _run(fn, state.catalog, job_state))


@jobs.get("/{job_id}", response_model=Job, summary="A job's state, progress and result or error")
async def get_job(job_id: int, state=Depends(get_state)):
    from loradex.hub.jobs import get_job as fn

    return _json(await _run(fn, state.catalog, job_id))


store = APIRouter(prefix="/v1/store", tags=["store"])


@store.get("/objects/{sha256}", summary="A stored file by its sha256 (for serving replicas)")
async def get_object(sha256: str, state=Depends(get_state)):
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise BadRequest("sha256 must be 64 lowercase hex digits", param="sha256")
    path = state.store.object_path(sha256)
    if not path.is_file():
        raise NotFound(f"no stored object with sha256 {sha256}")
    return FileResponse(path, media_type="application/octet-stream")


server = APIRouter(prefix="/v1", tags=["server"])


@server.get("/server", summary="What this server runs: base, quantization, dtype, device, and its config key")
async def server_info(state=Depends(get_state)):
    """Scores shown by this server (``/v1/models``, ``/v1/adapters``, the gate) are those measured under ``config``."""
    from loradex.evals.config import config_key, config_label

    cfg = state.served_config
    eng = state.engine
    return _json({"base": state.config.engine.base, "ready": state.ready, "config": cfg, "config_key": config_key(cfg),
                  "config_label": config_label(cfg) if cfg else None,
                  "quantize": eng.loaded.quantize if eng else state.config.engine.quantize,
                  "dtype": cfg["dtype"] if cfg else None, "device": cfg["device"] if cfg else None,
                  "kernels": eng.loaded.info.get("kernels") if eng else None})


# -- every catalog operation, one route each ------------------------------------------------------
AFTER_OP = {"adapters.delete": forget}  # what the server does besides the catalog write
# what an op raises when a client's arguments (typed only as dicts/strings) do not fit it: a 400, not a 500.
# Domain errors (LoradexError) keep their own status; anything else stays a 500 (a bug).
ARGUMENT_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError, duckdb.InvalidInputException,
                   duckdb.ConversionException, duckdb.ConstraintException, duckdb.BinderException)
# op arguments that name a file or folder on the server's disk (read or written there)
SERVER_PATH_ARGS = {"adapters.register": ("path",), "bases.add": ("source",), "reviews.export": ("out",),
                    "reviews.import": ("path",), "exports.plan": ("out",)}


def _confine_server_paths(request: Request, state, name: str, kwargs: dict) -> None:
    """Paths in op arguments: free for a client on this machine (the CLI), else only under --allow-path-register.

    A remote client (with the API key) must not read or write arbitrary files of the server through an op,
    exactly as ``POST /v1/adapters`` by path is refused (serving/routes.py ``_check_server_path``).
    """
    import ipaddress
    import os

    from loradex.serving.routes import _check_server_path

    client = request.client.host if request.client else ""
    try:
        local = ipaddress.ip_address(client).is_loopback
    except ValueError:
        local = client == "localhost"
    if local and not state.config.confine_local_paths:
        return
    for arg in SERVER_PATH_ARGS.get(name, ()):
        value = kwargs.get(arg)
        if value is None:
            continue
        value = str(value)
        value = value.removeprefix("gguf:")
        if arg == "source" and value and not value.startswith(("/", ".", "~")) and not os.path.lexists(value):
            continue  # a Hugging Face model id, not a server path
        _check_server_path(state.config, value)


def ops_router() -> APIRouter:
    router = APIRouter(prefix="/v1/ops", tags=["ops"])
    for name, entry in sorted(load_all().items()):
        router.add_api_route(f"/{name}", _op_endpoint(entry), methods=["POST"], name=f"op:{name}",
                             summary=(entry.doc.splitlines() or [name])[0],
                             description=f"`{entry.fn.__module__}.{entry.fn.__name__}`" + (" (writes)" if entry.write else ""))
    return router


def _body_model(entry):
    fields = {}
    for p in entry.params():
        hint = entry.hints.get(p.name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hint, default)
    extra = "allow" if entry.takes_extra() else "forbid"
    try:
        return create_model(f"Op_{entry.name.replace('.', '_')}", __config__=ConfigDict(extra=extra, arbitrary_types_allowed=True),
                            **fields)
    except Exception:  # a type pydantic cannot describe: take the fields as plain JSON
        return create_model(f"Op_{entry.name.replace('.', '_')}", __config__=ConfigDict(extra=extra),
                            **{k: (Any, d) for k, (_, d) in fields.items()})


def _op_endpoint(entry):
    model = _body_model(entry)

    async def endpoint(request: Request, body=Body(...)):
        state = get_state(request)
        payload = await request.json()
        if not isinstance(payload, dict):
            raise BadRequest(f"{entry.name}: the body must be a JSON object of arguments")
        kwargs = entry.load_args(payload)
        if "served_config" in entry.signature.parameters and kwargs.get("served_config") is None:
            kwargs["served_config"] = state.served_config  # ops that judge "as served" judge as this server serves
        try:
            _confine_server_paths(request, state, entry.name, kwargs)
            result = await _run(entry.call_local, state.catalog, state.store, kwargs)
        except ARGUMENT_ERRORS as exc:  # the client's arguments did not have the shape the op works on
            raise BadRequest(f"{entry.name}: unusable arguments ({type(exc).__name__}: {exc})",
                             code="invalid_op_arguments") from exc
        after = AFTER_OP.get(entry.name)
        if after is not None:
            await _run(after, state, result)
        return _json(entry.dump_result(result))

    endpoint.__signature__ = inspect.Signature([
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model, default=Body(...)),
    ])
    return endpoint


def routers() -> list[APIRouter]:
    return [bases, adapters, scores, jobs, store, server, ops_router()]
