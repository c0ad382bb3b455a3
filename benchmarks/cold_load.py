"""Cold load: the extra time to first token for an adapter the engine has never loaded.

Interleaved pairs of single requests (max_tokens=1) to one engine::

    warm   an adapter already in the cache        -> time to first token W
    cold   a registered adapter never loaded yet  -> time to first token C
    cold_load.ms = C - W   (per pair; median reported). Target <= 50 ms for r=16.

Both times run from the call (catalog resolve and tokenizing included) to the
first token. The adapter's files were just written by ``register``, so they are
in the OS page cache: this is the cost of verifying (sha256), reading and
placing the weights, not of a cold disk. The engine's own measure of the load
(``cache.last_load_s``) is reported beside it.
"""
from __future__ import annotations

from benchmarks.common import Metric, Report, interleave, log
from benchmarks.engine_api import engine_round, open_engine, requests_for
from benchmarks.workspace import Workspace

NAME = "cold_load"
TARGET_MS = 50.0


def run(ws: Workspace, report: Report) -> dict:
    sizes = ws.sizes
    count = sizes.cold_reps + sizes.warmup
    warm_name = ws.register_adapters("warm", 1, seed0=5000)[0]
    cold_names = ws.register_adapters("cold", count, seed0=6000)
    pending = list(cold_names)
    engine_load_ms: list[float] = []
    with ws.catalog() as cat:
        engine = open_engine(ws, cat, max_loaded=max(8, count + 1), pin=[warm_name])
        try:
            def warm() -> float:
                return engine_round(engine, requests_for([warm_name], 1)).ttft_s[0] * 1000

            def cold() -> float:
                name = pending.pop(0)
                loads0 = engine.metrics.total("adapter_loads_total")
                ttft = engine_round(engine, requests_for([name], 1)).ttft_s[0] * 1000
                if engine.metrics.total("adapter_loads_total") != loads0 + 1:
                    raise RuntimeError(f"adapter {name} was not loaded exactly once by its first request")
                engine_load_ms.append(engine.cache.last_load_s * 1000)
                return ttft

            got = interleave({"warm": warm, "cold": cold}, reps=sizes.cold_reps, warmup=sizes.warmup)
        finally:
            engine.shutdown()
    engine_load_ms = engine_load_ms[sizes.warmup:]
    extra = [c - w for c, w in zip(got["cold"], got["warm"])]
    log(f"cold_load: warm ttft {got['warm']} ms, cold ttft {got['cold']} ms")
    report.add(Metric("cold_load.ms", extra, "ms", TARGET_MS, "<=",
                      f"first token of a never-loaded r={sizes.rank} adapter minus warm first token"))
    report.add(Metric("cold_load.warm_ttft_ms", got["warm"], "ms", note="adapter already loaded, batch 1"))
    report.add(Metric("cold_load.cold_ttft_ms", got["cold"], "ms", note="adapter never loaded, batch 1"))
    report.add(Metric("cold_load.engine_load_ms", engine_load_ms, "ms", TARGET_MS, "<=",
                      "engine's own timing: verify + read + write slot"))
    return {"warm_ttft_ms": got["warm"], "cold_ttft_ms": got["cold"], "engine_load_ms": engine_load_ms}
