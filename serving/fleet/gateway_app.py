"""``loradex gateway``'s HTTP edge: OpenAI-compatible forwarding to N replicas.

    client -> POST /v1/chat/completions {"model": "pirate@production", ...}
      1. AliasTable: pirate@production -> pirate@5 (registry, bounded by --alias-ttl)
      2. Pool.pick: a healthy replica that already served pirate@5, else the least loaded
      3. forward with model="pirate@5"; JSON or server-sent events passed through as they come
      4. a replica that refuses the connection or drops it before the first byte:
         marked down, the request goes to the next one (nothing was sent to the client yet)

Routes: ``/v1/chat/completions``, ``/v1/completions`` (streaming or not), ``/v1/models``
(the backends' lists merged), ``/metrics`` (Prometheus text, per adapter), ``/v1/gateway``
(backends, held resolutions), ``/health``. Replicas may be ``loradex serve`` or
``vllm serve`` with the loradex plugin: both take the adapter in the OpenAI ``model`` field.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from loradex.hub.errors import LoradexError
from loradex.hub.remote import raise_remote
from loradex.serving.errors import BadRequest, Unauthorized, to_http
from loradex.serving.fleet.aliases import AliasTable
from loradex.serving.fleet.backends import Backend, Pool
from loradex.serving.fleet.config import GatewayConfig
from loradex.serving.fleet.errors import NoBackend, RegistryUnavailable
from loradex.serving.metrics import LATENCY_BUCKETS, Metrics

log = logging.getLogger("loradex.gateway")
RETRY_STATUSES = (502, 503)  # a replica still loading or shutting down: try the next one
PASSED_HEADERS = ("authorization", "content-type", "accept")
RETURNED_HEADERS = ("retry-after", "x-loradex-error", "x-loradex-exit")  # a backend's error stays typed


def gateway_metrics(pool: Pool) -> Metrics:
    m = Metrics(prefix="loradex_gateway")
    m.counter("requests_total", "Requests answered, by adapter (NAME@V, or the base), backend and status",
              ("adapter", "backend", "status"))
    m.counter("routing_total", "Routing decisions, by adapter and decision (affinity|new|spill)",
              ("adapter", "decision"))
    m.counter("retries_total", "Attempts moved to another backend, by backend and reason", ("backend", "reason"))
    m.counter("resolutions_total", "Model names resolved, by how (immutable|passthrough|fresh|held|stale)", ("how",))
    m.counter("alias_moves_total", "Alias moves seen at the registry, by name", ("name",))
    m.counter("errors_total", "Requests that failed at the gateway, by adapter and error", ("adapter", "error"))
    m.histogram("request_latency_seconds", "Time from arrival to the last byte, by adapter", ("adapter",))
    m.histogram("time_to_first_byte_seconds", "Time from arrival to the first byte from a backend, by adapter",
                ("adapter",), LATENCY_BUCKETS)
    m.gauge("backend_up", "1 while a backend passes its health checks",
            lambda: [((b.url,), 1.0 if b.healthy else 0.0) for b in pool.backends], ("backend",))
    m.gauge("backend_in_flight", "Requests in flight per backend",
            lambda: [((b.url,), float(b.in_flight)) for b in pool.backends], ("backend",))
    m.gauge("backend_adapters", "Adapters a backend has served (affinity set)",
            lambda: [((b.url,), float(len(b.served))) for b in pool.backends], ("backend",))
    return m


class Gateway:
    """Everything one gateway process holds; built in the app's lifespan, never at import."""

    def __init__(self, config: GatewayConfig, client: httpx.AsyncClient):
        self.config = config
        self.client = client
        self.pool = Pool(config.backends, max_skew=config.max_skew)
        self.metrics = gateway_metrics(self.pool)
        self.aliases = AliasTable(self.lookup, ttl_s=config.alias_ttl_s, max_stale_s=config.max_stale_s,
                                  on_move=self.on_move)
        self._tasks: set[asyncio.Task] = set()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    # -- the registry ----------------------------------------------------------------
    async def lookup(self, ref: str) -> str | None:
        """NAME@V for ``ref`` at the registry; None when no adapter has that name."""
        url = self.config.registry.rstrip("/")
        try:
            resp = await self.client.post(f"{url}/v1/ops/adapters.resolve", json={"ref": ref}, headers=self.auth(),
                                          timeout=10.0)
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"the registry at {url} did not answer ({type(exc).__name__})") from None
        if resp.status_code >= 500:
            raise RegistryUnavailable(f"the registry at {url} answered {resp.status_code}")
        if resp.status_code != 200:
            raise_remote(resp.status_code, resp.headers, resp.content, url)  # NotFound for an unknown name
        row = resp.json()
        return f"{row['adapter']}@{row['version']}"

    def on_move(self, name: str, old: str | None, new: str | None) -> None:
        """An alias moved: count it, and drop the moved name on vLLM replicas that may hold it directly."""
        log.info("gateway: %s moved %s -> %s", name, old, new)
        self.metrics.inc("alias_moves_total", name)
        for b in self.pool.backends:
            if b.kind == "vllm" and b.healthy:
                self._spawn(self._unload(b, name))

    async def _unload(self, backend: Backend, name: str) -> None:
        # Clients that bypass the gateway and ask vLLM for NAME@ALIAS got the version it first resolved;
        # unloading makes vLLM ask the loradex resolver again at its next request for that name.
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(backend.url + "/v1/unload_lora_adapter", json={"lora_name": name},
                                   headers=self.auth(), timeout=10.0)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- health ----------------------------------------------------------------------
    async def check(self, backend: Backend) -> None:
        try:
            resp = await self.client.get(backend.url + "/health", timeout=2.0)
            ok = resp.status_code == 200
            reason = f"/health answered {resp.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, f"/health failed ({type(exc).__name__})"
        if not ok:
            if self.pool.mark_down(backend, reason):
                log.warning("gateway: backend %s is down: %s", backend.url, reason)
            return
        kind = None
        if backend.kind == "unknown":
            # vLLM's OpenAI server answers /version; loradex serve does not
            with contextlib.suppress(httpx.HTTPError):
                kind = "vllm" if (await self.client.get(backend.url + "/version", timeout=2.0)).status_code == 200 \
                    else "loradex"
        if self.pool.mark_up(backend, kind):
            log.info("gateway: backend %s is up (%s)", backend.url, backend.kind)

    async def health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(b) for b in self.pool.backends))
            await asyncio.sleep(self.config.health_interval_s)

    # -- forwarding --------------------------------------------------------------------
    async def forward(self, request: Request, path: str) -> Response:
        started = time.monotonic()
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        asked = body.get("adapter") or body.get("model")
        if not isinstance(asked, str) or not asked:
            raise BadRequest("model is required", param="model")
        res = await self.aliases.resolve(asked)
        self.metrics.inc("resolutions_total", res.how)
        body.pop("adapter", None)
        body["model"] = res.model
        label = res.adapter or res.model
        stream = bool(body.get("stream"))
        headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_HEADERS}
        payload = json.dumps(body).encode()
        extra = {"X-Loradex-Model": res.model, "X-Loradex-Resolution": res.how}
        if res.how == "stale":
            extra["Warning"] = (f'110 loradex-gateway "registry unreachable; {asked} resolved '
                                f'{res.age_s:.0f}s ago (bound {self.config.max_stale_s:g}s)"')
        tried: set[str] = set()
        last: tuple[int, bytes, str] | None = None  # the last retryable answer, returned if no backend does better
        while True:
            try:
                backend, decision = self.pool.pick(res.adapter, tried)
            except NoBackend:
                self.metrics.inc("errors_total", label, "NoBackend")
                if last is not None:
                    return Response(last[1], status_code=last[0], headers=extra, media_type=last[2])
                raise
            tried.add(backend.url)
            backend.in_flight += 1
            resp = None
            try:
                req = self.client.build_request("POST", backend.url + path, content=payload, headers=headers)
                resp = await self.client.send(req, stream=True)
                if resp.status_code in RETRY_STATUSES:
                    last = (resp.status_code, await resp.aread(), resp.headers.get("content-type", "application/json"))
                    await resp.aclose()
                    self.metrics.inc("retries_total", backend.url, f"status_{resp.status_code}")
                    backend.in_flight -= 1
                    continue
                chunks = resp.aiter_raw()
                first = await anext(chunks, b"")  # a replica that dies before its first byte is retried
            except httpx.HTTPError as exc:
                backend.in_flight -= 1
                if resp is not None:
                    await resp.aclose()
                if self.pool.mark_down(backend, f"{type(exc).__name__} on {path}"):
                    log.warning("gateway: backend %s failed (%s); retrying elsewhere", backend.url, type(exc).__name__)
                self.metrics.inc("retries_total", backend.url, type(exc).__name__)
                continue
            self.metrics.inc("routing_total", label, decision)
            self.metrics.observe("time_to_first_byte_seconds", time.monotonic() - started, label)
            extra["X-Loradex-Backend"] = backend.url
            extra.update({k: v for k, v in resp.headers.items() if k.lower() in RETURNED_HEADERS})
            if not stream or resp.status_code != 200:
                try:
                    rest = b"".join([c async for c in chunks])
                except httpx.HTTPError as exc:  # dropped after the first byte of a JSON answer: retry it whole
                    backend.in_flight -= 1
                    await resp.aclose()
                    self.pool.mark_down(backend, f"{type(exc).__name__} mid-answer on {path}")
                    self.metrics.inc("retries_total", backend.url, type(exc).__name__)
                    continue
                backend.in_flight -= 1
                await resp.aclose()
                self._finished(backend, res.adapter, label, resp.status_code, started)
                return Response(first + rest, status_code=resp.status_code, headers=extra,
                                media_type=resp.headers.get("content-type", "application/json"))
            return StreamingResponse(self._relay(backend, resp, first, chunks, res.adapter, label, started),
                                     status_code=200, headers=extra,
                                     media_type=resp.headers.get("content-type", "text/event-stream"))

    async def _relay(self, backend: Backend, resp: httpx.Response, first: bytes, chunks, adapter, label, started):
        status = 200
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as exc:
            # bytes already went to the client: the stream cannot move; end it with an error event
            status = 502
            self.pool.mark_down(backend, f"{type(exc).__name__} mid-stream")
            self.metrics.inc("errors_total", label, type(exc).__name__)
            err = {"error": {"message": f"backend {backend.url} failed mid-stream ({type(exc).__name__})",
                             "type": "server_error", "param": None, "code": "backend_failed"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            backend.in_flight -= 1
            await resp.aclose()
            self._finished(backend, adapter, label, status, started)

    def _finished(self, backend: Backend, adapter: str | None, label: str, status: int, started: float) -> None:
        if status == 200 and adapter is not None and backend.healthy:
            backend.served.add(adapter)
        self.metrics.inc("requests_total", label, backend.url, str(status))
        self.metrics.observe("request_latency_seconds", time.monotonic() - started, label)

    async def models(self, request: Request) -> dict:
        """The healthy backends' /v1/models, merged by id (first backend's card wins)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}

        async def one(b: Backend):
            try:
                resp = await self.client.get(b.url + "/v1/models", headers=headers, timeout=10.0)
                return resp.json().get("data", []) if resp.status_code == 200 else []
            except (httpx.HTTPError, ValueError):
                return []

        live = [b for b in self.pool.backends if b.healthy]
        if not live:
            raise NoBackend("no healthy backend to list models from", retry_after=2)
        cards: dict[str, dict] = {}
        for data in await asyncio.gather(*(one(b) for b in live)):
            for card in data:
                cards.setdefault(card.get("id"), card)
        return {"object": "list", "data": list(cards.values())}

    def status(self) -> dict:
        return {"registry": self.config.registry, "registry_ok": self.aliases.registry_ok,
                "alias_ttl_s": self.config.alias_ttl_s, "max_stale_s": self.config.max_stale_s,
                "backends": [b.view() for b in self.pool.backends], "resolutions": self.aliases.snapshot()}


def create_app(config: GatewayConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        timeout = httpx.Timeout(config.request_timeout_s, connect=5.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            gw = app.state.gateway = Gateway(config, client)
            await asyncio.gather(*(gw.check(b) for b in gw.pool.backends))
            health = asyncio.create_task(gw.health_loop())
            try:
                yield
            finally:
                health.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await health

    app = FastAPI(title="loradex gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    def check_key(request: Request) -> None:
        if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise Unauthorized("missing or incorrect API key: send 'Authorization: Bearer KEY'")

    @app.exception_handler(LoradexError)
    async def loradex_error(request: Request, exc: LoradexError):
        status, body, headers = to_http(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        return await request.app.state.gateway.forward(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        return await request.app.state.gateway.forward(request, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return await request.app.state.gateway.models(request)

    @app.get("/v1/gateway")
    async def status(request: Request):
        check_key(request)
        return request.app.state.gateway.status()

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request)
        return PlainTextResponse(request.app.state.gateway.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    return app
