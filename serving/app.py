"""The FastAPI app: factory, lifespan, settings dependency, auth and body-size limits.

``create_app(config)`` builds an app; nothing is created at import time. The
lifespan opens the catalog as its long-lived owner (``role="server"``), starts
loading the engine in the background (``/health`` answers at once, ``/ready``
once the base is loaded) and, on shutdown, lets in-flight requests finish for
``drain_s`` before cancelling the rest and releasing the catalog.

Run it with ``loradex serve`` (``serving/cli.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from functools import lru_cache
from typing import Callable

from fastapi import FastAPI

from loradex.serving.config import EngineConfig, ServerConfig
from loradex.serving.errors import NotReady, PayloadTooLarge, to_http
from loradex.serving.metrics import serving_metrics

log = logging.getLogger("loradex.serve")


@lru_cache
def get_config() -> ServerConfig:
    """Settings from the environment (tests override this dependency or pass a config)."""
    engine = EngineConfig(base=os.environ.get("LORADEX_SERVE_BASE") or EngineConfig.base,
                          quantize=os.environ.get("LORADEX_SERVE_QUANTIZE") or EngineConfig.quantize)
    return ServerConfig(engine=engine, api_key=os.environ.get("LORADEX_API_KEY") or None)


class ServerState:
    """What the routes need: config, catalog, store, metrics and (once loaded) the engine."""

    def __init__(self, config: ServerConfig, catalog, store, settings, on_fatal: Callable[[BaseException], None] | None):
        self.config = config
        self.catalog = catalog
        self.store = store
        self.settings = settings
        self.metrics = serving_metrics()
        self.engine = None
        self.jobs = None  # a JobRunner when this server owns the catalog (not on a replica)
        self.load_error: BaseException | None = None
        self._on_fatal = on_fatal
        self._thread = threading.Thread(target=self._load, name="loradex-load", daemon=True)
        self.metrics.gauge("ready", "1 once the base model is loaded", lambda: [((), 1.0 if self.ready else 0.0)])
        self.metrics.gauge("active_rows", "Requests in the running batch", lambda: [((), float(self._stat("active")))])
        self.metrics.gauge("waiting_requests", "Requests waiting for a batch slot", lambda: [((), float(self._stat("waiting")))])
        self.metrics.gauge("adapters_loaded", "Adapters in the serving cache",
                           lambda: [((), float(len(self.engine.cache.entries)) if self.engine else 0.0)])

    def _stat(self, key: str) -> int:
        eng = self.engine
        if eng is None:
            return 0
        return eng.counts()[key]

    def start(self) -> None:
        self._thread.start()

    def _load(self) -> None:
        from loradex.serving.engine import Engine

        try:
            self.engine = Engine.load(self.config.engine, catalog=self.catalog, store=self.store,
                                      settings=self.settings, metrics=self.metrics)
            log.info("base %s loaded (%s, %s); serving", self.engine.base_name, self.engine.loaded.quantize,
                     self.engine.device)
        except BaseException as exc:  # reported by /ready; the CLI stops the server
            self.load_error = exc
            log.error("could not load the engine: %s", exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)

    def wait_loaded(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def served_config(self) -> dict | None:
        """The serving configuration scores are looked up by (base + digest, quantize, dtype, device), once loaded."""
        eng = self.engine
        if eng is None:
            return None
        if getattr(self, "_served_config", None) is None:
            from loradex.evals.config import SERVE_ENGINE, serving_config

            loaded = eng.loaded
            self._served_config = serving_config(loaded.record, loaded.quantize, loaded.dtype, eng.device, SERVE_ENGINE)
        return self._served_config

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready

    def require_engine(self):
        if self.engine is None:
            if self.load_error is not None:
                raise NotReady(f"the engine failed to load: {self.load_error}", retry_after=60)
            raise NotReady("the base model is still loading", retry_after=5)
        if not self.engine.ready:
            raise NotReady("the server is shutting down", retry_after=5)
        return self.engine

    def shutdown(self) -> None:
        self._thread.join(timeout=600)
        if self.engine is not None:
            self.engine.shutdown(drain_s=self.config.drain_s)


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over the limit (413), by Content-Length or while streaming."""

    def __init__(self, app, limit_for: Callable[[dict], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, PayloadTooLarge(f"request body of {int(length)} bytes is over the limit of {limit}"))
        seen = 0
        over: list[PayloadTooLarge] = []
        answered = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over.append(PayloadTooLarge(f"request body is over the limit of {limit} bytes"))
                    raise over[-1]
            return message

        async def guarded_send(message):
            # a chunked body over the limit: the framework turns the receive error into its own 400;
            # the client gets the 413 instead
            nonlocal answered
            if over:
                if not answered:
                    answered = True
                    await _send_error(send, over[0])
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except PayloadTooLarge as exc:
            if not answered:
                answered = True
                await _send_error(send, exc)


class CountRequests:
    """Pure ASGI middleware: count responses by route template and status (streams untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state = getattr(scope["app"].state, "server", None) if "app" in scope else None
            if state is not None:
                path = getattr(scope.get("route"), "path", None) or "unmatched"
                state.metrics.inc("http_requests_total", path, str(status["code"]))


async def _send_error(send, exc: BaseException) -> None:
    import json

    status, body, headers = to_http(exc)
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def create_app(config: ServerConfig | None = None, *, settings=None, catalog=None, store=None,
               on_fatal: Callable[[BaseException], None] | None = None, registry_routes: bool = True) -> FastAPI:
    """Build the app. ``catalog``/``store`` default to the ones under ``settings`` (opened as server).

    ``registry_routes=False`` (a replica reading a remote registry) serves models only.
    """
    from loradex.serving.routes import install

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from loradex.hub.catalog import Catalog
        from loradex.hub.registry import cleanup_stale
        from loradex.hub.remote import is_remote
        from loradex.hub.settings import Settings
        from loradex.hub.store import Store

        cfg = app.dependency_overrides.get(get_config, get_config)()
        st = settings or Settings()
        owned = catalog is None
        cat = catalog or Catalog.open(st.catalog_path, wait_s=st.lock_wait_s, role="server",
                                      url=f"http://{cfg.host}:{cfg.port}")
        sto = store or Store(st.store)
        try:
            if owned:
                cleanup_stale(cat, sto)
            state = ServerState(cfg, cat, sto, st, on_fatal)
            app.state.server = state
            if not is_remote(cat):
                from loradex.serving.jobs import JobRunner

                state.jobs = JobRunner(cat, sto, st)
                failed = state.jobs.start()
                if failed:
                    log.warning("%d job(s) left unfinished by a previous server were marked failed", failed)
            state.start()
            yield
            state.shutdown()
            if state.jobs is not None:
                state.jobs.stop()
        finally:
            if owned:
                cat.close()

    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN (the schema stays at /openapi.json)
    app = FastAPI(title="loradex", description="One quantized base, many LoRA adapters, OpenAI-compatible.",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if config is not None:
        app.dependency_overrides[get_config] = lambda: config

    def limit_for(scope: dict) -> int:
        cfg = app.dependency_overrides.get(get_config, get_config)()
        if scope.get("method") == "POST" and scope.get("path") in ("/adapters", "/v1/adapters"):
            return cfg.max_upload_bytes
        return cfg.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    install(app)
    if registry_routes:
        from fastapi import Depends

        from loradex.serving.hub_routes import routers
        from loradex.serving.routes import require_key

        for router in routers():
            app.include_router(router, dependencies=[Depends(require_key)])
        from loradex.serving.web import api_routes, routes as web

        app.include_router(api_routes.router, dependencies=[Depends(require_key)])
        app.include_router(web.router)  # the page's shell and assets: open, like /health; its data calls need the key

    from fastapi import Depends as _Depends
    from fastapi.responses import JSONResponse

    from loradex.serving.routes import require_key as _require_key

    @app.get("/openapi.json", include_in_schema=False, dependencies=[_Depends(_require_key)])
    async def openapi_schema():  # behind the key like every route but /health
        return JSONResponse(app.openapi())

    app.add_middleware(CountRequests)
    return app
