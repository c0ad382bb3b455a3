"""Multi-adapter serving on one base, four ways, interleaved in one process.

    (a) mixed      8 concurrent requests over 8 different adapters, one continuous batch (loradex engine)
    (b) swap       the same 8 requests one by one, ``set_adapter`` before each (plain PEFT, the naive loop)
    (c) base       8 base requests to an engine that has never loaded an adapter
    (d) base+8     8 base requests to the engine of (a), its 8 adapters loaded
    (p) peft-mixed the 8 requests of (a) through PEFT's ``generate(adapter_names=...)``: the floor (a) must beat

Each case is a round of ``requests`` requests that all arrive at once (greedy,
``new_tokens`` each). Reported: tokens/s of the round, p50/p95 latency from
arrival to last token, and the ratios a/c (target 0.8), a/b (4) and d/c (0.95),
each the median of per-round ratios.
"""
from __future__ import annotations

from benchmarks.common import Metric, Report, interleave, log, percentile, ratios, summarize
from benchmarks.engine_api import PeftBaseline, engine_round, open_engine, requests_for
from benchmarks.workspace import Workspace

NAME = "serving_mixed"


def run(ws: Workspace, report: Report) -> dict:
    from loradex.hub.registry import adapter_folder

    sizes = ws.sizes
    names = ws.register_adapters("serve", sizes.adapters)
    adapters = [names[i % len(names)] for i in range(sizes.requests)]
    mixed_reqs = requests_for(adapters, sizes.new_tokens)
    base_reqs = requests_for([None] * sizes.requests, sizes.new_tokens)
    with ws.catalog() as cat:
        folders = {name: adapter_folder(cat, ws.store, name)[1] for name in names}
        log("serving: loading the engines and the PEFT baseline")
        loaded_engine = bare_engine = None
        try:
            loaded_engine = open_engine(ws, cat, max_loaded=max(8, len(names)), pin=names)
            bare_engine = open_engine(ws, cat, max_loaded=max(8, len(names)))
            peft = PeftBaseline(ws, cat, folders)
            rounds = interleave({
                "a": lambda: engine_round(loaded_engine, mixed_reqs),
                "b": lambda: peft.swap_round(mixed_reqs),
                "c": lambda: engine_round(bare_engine, base_reqs),
                "d": lambda: engine_round(loaded_engine, base_reqs),
                "p": lambda: peft.mixed_round(mixed_reqs),
            }, reps=sizes.reps, warmup=sizes.warmup)
            loads = loaded_engine.metrics.total("adapter_loads_total")
            bare_loads = bare_engine.metrics.total("adapter_loads_total")
        finally:
            for engine in (loaded_engine, bare_engine):
                if engine is not None:
                    engine.shutdown()
    if bare_loads:
        raise RuntimeError(f"the base-only engine loaded {bare_loads} adapters; case (c) is not adapter-free")

    tps = {k: [r.tokens_per_s for r in v] for k, v in rounds.items()}
    labels = {"a": ("mixed", f"{sizes.requests} requests over {len(names)} adapters, one batch"),
              "b": ("swap", "PEFT set_adapter per request, one at a time"),
              "c": ("base", "base requests, no adapter loaded"),
              "d": ("base_loaded", f"base requests, {len(names)} adapters loaded"),
              "p": ("peft_mixed", "PEFT generate(adapter_names=...), one batch")}
    for case, (label, note) in labels.items():
        lat_ms = [x * 1000 for r in rounds[case] for x in r.latencies_s]
        report.add(Metric(f"serving.{label}_tokens_per_s", tps[case], "tok/s", note=note))
        report.add(Metric(f"serving.{label}_p50_ms", [percentile(lat_ms, 50)], "ms", note="arrival to last token"))
        report.add(Metric(f"serving.{label}_p95_ms", [percentile(lat_ms, 95)], "ms"))
    report.add(Metric("serving.mixed_over_base", ratios(tps["a"], tps["c"]), "x", 0.8, ">=", "a/c"))
    report.add(Metric("serving.mixed_over_swap", ratios(tps["a"], tps["b"]), "x", 4.0, ">=", "a/b"))
    report.add(Metric("serving.base_loaded_over_base", ratios(tps["d"], tps["c"]), "x", 0.95, ">=", "d/c"))
    report.add(Metric("serving.mixed_over_peft_mixed", ratios(tps["a"], tps["p"]), "x", 1.0, ">=",
                      "a vs PEFT's own mixed batch (the floor)"))
    return {
        "adapters": names, "requests": sizes.requests, "new_tokens": sizes.new_tokens,
        "tokens_per_s": {labels[k][0]: summarize(v) for k, v in tps.items()},
        "tokens": {labels[k][0]: [r.tokens for r in v] for k, v in rounds.items()},
        "ttft_ms": {labels[k][0]: summarize([x * 1000 for r in v for x in r.ttft_s]) for k, v in rounds.items()},
        "adapter_loads": loads,
    }
