"""Serving case (a) over HTTP: ``loradex serve`` (uvicorn) with a concurrent client, against in-process.

    in-process   8 requests over 8 adapters submitted to an Engine in this process
    http         the same 8 requests as concurrent POST /v1/chat/completions
                 (httpx.AsyncClient) to a ``loradex serve`` subprocess on loopback
    ttft         one request, max_tokens=1, both ways: the fixed per-request cost

The server is a separate process, as in production, serving a copy of this
run's catalog (DuckDB lets one process hold a catalog file, and the in-process
engine holds the original) over the same store, with the same adapters pinned.
Rounds alternate between the two. ``http.overhead_ratio`` = in-process tok/s /
HTTP tok/s (1.0 = the HTTP layer costs nothing); loradex's own budget is 1.1.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Metric, Report, interleave, log, percentile, ratios, summarize
from benchmarks.engine_api import Round, engine_round, open_engine, requests_for
from benchmarks.workspace import Workspace

NAME = "http"
TARGET_OVERHEAD = 1.1
READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ws: Workspace, home: Path, port: int, pins: list[str], log_path: Path) -> subprocess.Popen:
    """``loradex serve`` on loopback over ``home``'s catalog; returns once /ready answers 200."""
    import httpx

    env = dict(os.environ, LORADEX_HOME=str(home), LORADEX_STORE=str(ws.settings.store),
               LORADEX_THREADS=str(ws.settings.threads))
    env.pop("LORADEX_API_KEY", None)
    cmd = [sys.executable, "-m", "loradex", "serve", "--base", ws.base_name, "--quantize", ws.quantize,
           "--device", ws.device, "--port", str(port), "--max-loaded", str(max(8, len(pins))),
           "--log-level", "warning", "--drain-s", "5"]
    for name in pins:
        cmd += ["--pin", name]
    logf = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    url = f"http://127.0.0.1:{port}/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`loradex serve` exited with {proc.returncode}: {_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"`loradex serve` was not ready after {READY_TIMEOUT_S}s: {_tail(log_path)}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return "(no server log)"


async def _http_round(base_url: str, requests: list[dict], base_model: str) -> Round:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        t0 = time.perf_counter()

        async def one(req: dict) -> tuple[float, int]:
            body = {"model": req["adapter"] or base_model, "messages": req["messages"], "max_tokens": req["max_tokens"],
                    "temperature": 0}
            resp = await client.post("/v1/chat/completions", json=body)
            if resp.status_code != 200:
                raise RuntimeError(f"POST /v1/chat/completions -> {resp.status_code}: {resp.text[:300]}")
            return time.perf_counter() - t0, int(resp.json()["usage"]["completion_tokens"])

        got = await asyncio.gather(*(one(r) for r in requests))
    wall = max(t for t, _ in got)
    return Round(wall_s=wall, tokens=sum(n for _, n in got), latencies_s=[t for t, _ in got])


def http_round(base_url: str, requests: list[dict], base_model: str) -> Round:
    """Every request at once from one asyncio client; latency from the round's start to each response."""
    return asyncio.run(_http_round(base_url, requests, base_model))


def run(ws: Workspace, report: Report) -> dict:
    sizes = ws.sizes
    names = ws.register_adapters("http", sizes.adapters, seed0=2000)
    reqs = requests_for([names[i % len(names)] for i in range(sizes.requests)], sizes.new_tokens)
    one = requests_for([names[0]], 1)
    server_home = ws.root / "server-home"
    server_home.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".wal"):  # our handle is closed here; copy a WAL too if one was left
        src = Path(str(ws.settings.catalog_path) + suffix)
        if src.exists():
            shutil.copy(src, server_home / ("catalog.duckdb" + suffix))
    port = free_port()
    log(f"http: starting `loradex serve` on port {port}")
    proc = start_server(ws, server_home, port, names, ws.root / "server.log")
    base_url = f"http://127.0.0.1:{port}"
    try:
        with ws.catalog() as cat:
            engine = open_engine(ws, cat, max_loaded=max(8, len(names)), pin=names)
            try:
                rounds = interleave({
                    "inproc": lambda: engine_round(engine, reqs),
                    "http": lambda: http_round(base_url, reqs, ws.base_name),
                    "inproc_ttft": lambda: engine_round(engine, one),
                    "http_ttft": lambda: http_round(base_url, one, ws.base_name),
                }, reps=sizes.http_reps, warmup=sizes.warmup)
            finally:
                engine.shutdown()
    finally:
        stop_server(proc)
    tps = {k: [r.tokens_per_s for r in v] for k, v in rounds.items()}
    lat = {k: [x * 1000 for r in v for x in r.latencies_s] for k, v in rounds.items()}
    one_ms = {k: [r.wall_s * 1000 for r in rounds[k]] for k in ("inproc_ttft", "http_ttft")}
    report.add(Metric("http.inprocess_tokens_per_s", tps["inproc"], "tok/s",
                      note=f"{sizes.requests} requests over {len(names)} adapters, Engine in this process"))
    report.add(Metric("http.tokens_per_s", tps["http"], "tok/s", note="same requests, concurrent POSTs to loradex serve"))
    report.add(Metric("http.p50_ms", [percentile(lat["http"], 50)], "ms", note="HTTP, arrival to response"))
    report.add(Metric("http.p95_ms", [percentile(lat["http"], 95)], "ms"))
    report.add(Metric("http.inprocess_p50_ms", [percentile(lat["inproc"], 50)], "ms"))
    report.add(Metric("http.overhead_ratio", ratios(tps["inproc"], tps["http"]), "x", TARGET_OVERHEAD, "<=",
                      "in-process tok/s / HTTP tok/s"))
    report.add(Metric("http.one_token_overhead_ms", [h - i for h, i in zip(one_ms["http_ttft"], one_ms["inproc_ttft"])],
                      "ms", note="1-token request: HTTP minus in-process"))
    return {"port": port, "tokens_per_s": {k: summarize(v) for k, v in tps.items()},
            "one_token_ms": {k: summarize(v) for k, v in one_ms.items()}}
