"""``loradex gateway``: one OpenAI-compatible endpoint in front of N replicas.

    loradex gateway --registry http://registry:8000 --backend http://r1:8000 --backend http://r2:8000 [--port 8080]

Aliases (NAME@ALIAS) and bare names are resolved at the registry to NAME@V before
forwarding, at most --alias-ttl seconds late; requests go to a replica that already
served that NAME@V, else to the least loaded; dead replicas are skipped. See docs/fleet.md.
"""
from __future__ import annotations

import argparse
import logging
import os


def add_commands(sub, common) -> None:
    p = sub.add_parser("gateway", parents=[common], help="route OpenAI requests to N replicas by adapter affinity",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, metavar="URL", help="the loradex registry (loradex serve) URL")
    p.add_argument("--backend", action="append", default=[], metavar="URL", required=True,
                   help="a replica: loradex serve or vllm serve with the loradex plugin (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--alias-ttl", type=float, default=2.0,
                   help="seconds an alias resolution is reused: alias moves reach requests at most this late (default 2)")
    p.add_argument("--max-stale", type=float, default=300.0,
                   help="registry down: keep using held resolutions this many seconds, then 503 (default 300)")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between backend health checks (default 1)")
    p.add_argument("--max-skew", type=int, default=4,
                   help="extra in-flight requests an affinity replica may carry before spilling (default 4)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds to wait on a backend (default 600)")
    p.add_argument("--api-key", default=None, help="require and pass on 'Authorization: Bearer KEY' (default: env LORADEX_API_KEY)")
    p.add_argument("--log-level", default="info", help="log level (default info)")
    p.set_defaults(func=cmd_gateway)


def build_config(args):
    from loradex.serving.fleet.config import GatewayConfig

    return GatewayConfig(registry=args.registry, backends=list(args.backend), host=args.host, port=args.port,
                         alias_ttl_s=args.alias_ttl, max_stale_s=args.max_stale,
                         health_interval_s=args.health_interval, max_skew=args.max_skew,
                         request_timeout_s=args.request_timeout,
                         api_key=args.api_key or os.environ.get("LORADEX_API_KEY") or None)


def cmd_gateway(ctx) -> int:
    import uvicorn

    from loradex.serving.fleet.gateway_app import create_app

    config = build_config(ctx.args)  # a bad flag is one line (InvalidConfig), before binding the port
    logging.basicConfig(level=getattr(logging, ctx.args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=ctx.args.log_level)
    return 0
