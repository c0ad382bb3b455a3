"""Throughput as the number of adapters in rotation grows: 1, 10, 100 (LRU on and off).

Rounds of ``requests`` concurrent requests walk a ring of N registered
adapters (round k uses adapters kR, kR+1, ... mod N), so with N > 8 every
request of a round names a different adapter than the round before::

    lru       the engine's default cache (max_loaded=8), a fresh engine per N:
              adapters beyond 8 are evicted and re-read from the store
              (sha256-verified) as the ring turns
    resident  max_loaded=N and all N pinned at start: no evictions, no loads

All configurations run interleaved. Target: N=100 >= 0.9 x N=1, for both.
"""
from __future__ import annotations

from benchmarks.common import Metric, Report, interleave, log, ratios, summarize
from benchmarks.engine_api import engine_round, open_engine, requests_for
from benchmarks.workspace import Workspace

NAME = "scaling"
LRU_MAX_LOADED = 8
MODES = ("lru", "resident")
TARGET = 0.9


def run(ws: Workspace, report: Report) -> dict:
    sizes = ws.sizes
    counts = sorted(set(sizes.scaling_counts))
    top = counts[-1]
    log(f"scaling: registering {top} adapters")
    names = ws.register_adapters("ring", top, seed0=1000)
    cursor: dict = {}
    engines: dict[tuple[int, str], object] = {}
    with ws.catalog() as cat:
        try:
            # One LRU engine per N, so a smaller ring never pays for evictions a larger one caused.
            for n in counts:
                engines[(n, "lru")] = open_engine(ws, cat, max_loaded=LRU_MAX_LOADED)
            log(f"scaling: loading {top} pinned adapters for the resident engine")
            resident = open_engine(ws, cat, max_loaded=max(top, LRU_MAX_LOADED), pin=names)
            for n in counts:
                engines[(n, "resident")] = resident
        except BaseException:
            for e in set(engines.values()):
                e.shutdown()
            raise

        def case(n: int, mode: str):
            def run_case() -> dict:
                tokens = wall = 0.0
                engine = engines[(n, mode)]
                loads0 = engine.metrics.total("adapter_loads_total")
                for _ in range(sizes.scaling_rounds):
                    k = cursor.get((n, mode), 0)
                    ring = [names[(k + j) % n] for j in range(sizes.requests)]
                    cursor[(n, mode)] = k + sizes.requests
                    r = engine_round(engine, requests_for(ring, sizes.new_tokens))
                    tokens += r.tokens
                    wall += r.wall_s
                return {"tokens_per_s": tokens / wall, "loads": engine.metrics.total("adapter_loads_total") - loads0}
            return run_case

        try:
            cases = {f"{n}:{mode}": case(n, mode) for n, mode in engines}
            results = interleave(cases, reps=sizes.reps, warmup=sizes.warmup)
        finally:
            for e in set(engines.values()):
                e.shutdown()

    tps = {key: [r["tokens_per_s"] for r in rs] for key, rs in results.items()}
    loads = {key: [r["loads"] for r in rs] for key, rs in results.items()}
    per_case = sizes.scaling_rounds * sizes.requests
    for n in counts:
        for mode in MODES:
            key = f"{n}:{mode}"
            per_req = sum(loads[key]) / (len(loads[key]) * per_case)
            report.add(Metric(f"scaling.{n}_{mode}_tokens_per_s", tps[key], "tok/s",
                              note=f"{n} adapter(s) in rotation, {mode}, {per_req:.2f} loads/request"))
    for mode in MODES:
        suffix = "" if mode == "lru" else "_resident"
        for n in counts[1:]:
            target = (TARGET, ">=") if n == top else (None, None)
            report.add(Metric(f"scaling.{n}_over_1{suffix}", ratios(tps[f"{n}:{mode}"], tps[f"1:{mode}"]), "x",
                              *target, note=f"{n} vs 1 adapter, {mode}"))
    return {"counts": counts, "lru_max_loaded": LRU_MAX_LOADED,
            "tokens_per_s": {k: summarize(v) for k, v in tps.items()}, "loads": loads}
