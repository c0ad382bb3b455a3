"""``loradex serve``: the HTTP server over one base and the catalog's adapters.

    loradex serve [--base BASE] [--quantize nf4|int8|none] [--host 127.0.0.1] [--port 8000]
                  [--max-loaded N] [--pin NAME@V ...] [--api-key KEY | env LORADEX_API_KEY] [--route-merged]

While it runs the server owns the catalog file, and every other ``loradex``
command (train, eval, merge, export, alias ...) reads and writes the catalog
through its API (``/v1/ops/*``), with the same output and exit codes.
``--registry URL`` serves as a replica of another loradex server instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal

from loradex.hub.bases import DEFAULT_BASE


def add_commands(sub, common) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve the base and its adapters over an OpenAI-compatible HTTP API",
                       description=__doc__.replace("``", "`"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=DEFAULT_BASE, help=f"base model name, or a merged model's base name (default {DEFAULT_BASE})")
    p.add_argument("--quantize", default="nf4", help="base weights: nf4 (default), int8 or none")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="compute dtype override: fp32, bf16, fp16")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env LORADEX_API_KEY)")
    p.add_argument("--max-loaded", type=int, default=8, help="adapters kept in memory at once, LRU-evicted (default 8)")
    p.add_argument("--pin", action="append", default=[], metavar="NAME[@V]", help="load at start and never evict (repeatable)")
    p.add_argument("--max-batch", type=int, default=16, help="rows per forward pass at most (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="wait for more requests when idle (default 10)")
    p.add_argument("--max-queued", type=int, default=64, help="waiting requests at most before 429 (default 64)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens allowed (default 2048)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request sets none (default 256)")
    p.add_argument("--max-context", type=int, default=None, help="prompt + new tokens at most (default: the base's)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest JSON body (default 1 MiB)")
    p.add_argument("--allow-path-register", action="append", default=[], metavar="DIR",
                   help="let POST /adapters register folders under DIR on this machine (repeatable; off by default)")
    p.add_argument("--confine-local-paths", action="store_true",
                   help="confine server paths in /v1/ops/* calls from this machine too (remote callers always are)")
    p.add_argument("--max-upload-bytes", type=int, default=512 << 20, help="largest adapter archive upload (default 512 MiB)")
    p.add_argument("--max-n", type=int, default=4, help="largest n per request (default 4)")
    p.add_argument("--route-merged", action="store_true",
                   help="serve an adapter version from its merged model (loradex merge) when one exists")
    p.add_argument("--max-merged", type=int, default=2, help="merged models loaded at most for --route-merged (default 2)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="run each row's forward alone: answers do not depend on batch size or neighbours (slower)")
    p.add_argument("--drain-s", type=float, default=30.0, help="on shutdown, time for in-flight requests (default 30)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.add_argument("--registry", metavar="URL",
                   help="serve as a replica of the loradex server at URL: read its catalog through its API and fetch "
                        "adapters by sha256 into the local store (the base must be at the same path here)")
    p.set_defaults(func=cmd_serve)


def build_config(args):
    from loradex.serving.config import EngineConfig, ServerConfig

    engine = EngineConfig(base=args.base, quantize=args.quantize, device=args.device, dtype=args.dtype,
                          max_loaded=args.max_loaded, pin=list(args.pin), max_batch=args.max_batch,
                          batch_window_ms=args.batch_window_ms, max_queued=args.max_queued,
                          max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                          max_context=args.max_context, route_merged=args.route_merged, max_merged=args.max_merged,
                          batch_invariant=args.batch_invariant)
    return ServerConfig(engine=engine, host=args.host, port=args.port,
                        api_key=args.api_key or os.environ.get("LORADEX_API_KEY") or None,
                        max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes,
                        allow_path_register=list(args.allow_path_register),
                        confine_local_paths=args.confine_local_paths, max_n=args.max_n,
                        drain_s=args.drain_s)


def _bind(host: str, port: int):
    """The listening socket, bound now; InvalidConfig in one line when the port is taken."""
    import errno
    import socket

    from loradex.hub.errors import InvalidConfig

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InvalidConfig(f"--port {port}: port in use on {host}; stop what listens there or pick another --port") from None
        raise InvalidConfig(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(ctx) -> int:
    import uvicorn

    from loradex.hub.bases import get_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.errors import LoradexError
    from loradex.hub.registry import cleanup_stale
    from loradex.serving.app import create_app

    config = build_config(ctx.args)
    sock = _bind(config.host, config.port)  # a busy port is one line, before the catalog or the model is touched
    ctx.close_catalog()  # the server opens the catalog itself, as its owner
    failure: list[BaseException] = []
    server_box: list = []

    def on_fatal(exc: BaseException) -> None:
        failure.append(exc)
        if server_box:
            server_box[0].should_exit = True

    logging.basicConfig(level=getattr(logging, ctx.args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    replica = ctx.args.registry is not None
    if replica:
        from loradex.hub.remote import RemoteCatalog

        catalog = RemoteCatalog(ctx.args.registry)
    else:
        # Open the catalog as its owner before binding the port, so a locked catalog is one line, not a traceback.
        catalog = Catalog.open(ctx.settings.catalog_path, wait_s=ctx.settings.lock_wait_s, role="server",
                               url=f"http://{config.host}:{config.port}")
    try:
        if not replica:
            cleanup_stale(catalog, ctx.store)
        get_base(catalog, config.engine.base, store=ctx.store)  # unknown base: one line, before binding the port
        app = create_app(config, settings=ctx.settings, catalog=catalog, store=ctx.store, on_fatal=on_fatal,
                         registry_routes=not replica)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=ctx.args.log_level,
                                               timeout_graceful_shutdown=int(config.drain_s) or None,
                                               lifespan="on"))
        server_box.append(server)
        # uvicorn drains on SIGTERM/SIGINT and then re-raises the signal to the handler it found; make that
        # handler a no-op so that the catalog below is closed (owner file removed) and the exit code is 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
        catalog.close()
    if failure:
        exc = failure[0]
        if isinstance(exc, LoradexError):
            raise exc
        raise RuntimeError(f"the engine failed to load: {exc}") from exc
    if not server.started:
        return 1
    return 0
