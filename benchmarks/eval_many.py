"""Evaluating many adapters in one pass, and what --batch-invariant costs, interleaved in one process.

    (1)  one     `evaluate` of 1 adapter (its rows and the base's share the engine's batches)
    (k)  many    `evaluate_many` of k adapters (``adapters`` of the preset, 8 by default) + the base, one pass
    (i)  inv     (1) with ``batch_invariant=True`` (every row's forward alone)

Each case is a whole eval as `loradex eval` runs it: load the base on the
engine, generate greedily (``new_tokens`` per item, ``requests`` items of
short chat prompts), score exact match, store the run(s); the base cache is off
so every case generates the base too. Evaluating k adapters one after another
costs about k times (1); the target is k adapters in at most 2x the wall time
of one (``eval_many.many_over_one``). ``eval_many.generate_many_over_one``
compares the generation pass alone (no loading or storing), and
``eval_many.invariant_over_normal`` is the price of batch invariance.

Whole evals are long on a CPU, so this benchmark halves the preset's
``new_tokens`` and runs ``reps - 1`` rounds (quick: 8 tokens, 1 round; full:
16 tokens, 2 rounds) after one untimed 1-item eval that pays the one-time costs
(imports, kernels).
"""
from __future__ import annotations

import json

from benchmarks.common import Metric, Report, interleave, log, ratios, summarize
from benchmarks.workspace import Workspace

NAME = "eval_many"

TOPICS = ["the sea", "a chair", "rain", "bread", "a bicycle", "the moon", "winter", "a library", "tea", "a river",
          "trains", "music", "a garden", "clocks", "mountains", "cats"]


def _data(ws: Workspace, n: int) -> str:
    path = ws.root / "eval-many.jsonl"
    rows = [{"prompt": f"Tell me one thing about {TOPICS[i % len(TOPICS)]}.", "completion": "ok"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def run(ws: Workspace, report: Report) -> dict:
    from loradex.evals import evaluate, evaluate_many

    sizes = ws.sizes
    k = sizes.adapters
    names = ws.register_adapters("evalmany", k, seed0=100)
    data = _data(ws, sizes.requests)
    new_tokens = max(4, sizes.new_tokens // 2)
    reps = max(1, sizes.reps - 1)
    kw = dict(metrics=("exact",), max_new_tokens=new_tokens, batch_size=sizes.requests, settings=ws.settings,
              quantize=ws.quantize, device=ws.device, use_cache=False)

    def one(invariant: bool = False):
        run = evaluate(None, ws.store, names[0], data, batch_invariant=invariant, **kw)
        return run["duration_s"], run["decoding"]["timings"]["generate_s"]

    def many():
        runs = evaluate_many(None, ws.store, names, data, **kw)
        return runs[0]["duration_s"], runs[0]["decoding"]["timings"]["generate_s"]

    log(f"eval_many: 1 adapter vs {k} adapters vs 1 adapter batch-invariant, {sizes.requests} items x "
        f"{new_tokens} tokens, {reps} round(s)")
    evaluate(None, ws.store, names[0], data, **dict(kw, max_new_tokens=1, limit=1))  # warm-up, not timed
    rounds = interleave({"one": one, "many": many, "inv": lambda: one(True)}, reps=reps, warmup=0)
    wall = {case: [r[0] for r in v] for case, v in rounds.items()}
    gen = {case: [r[1] for r in v] for case, v in rounds.items()}
    report.add(Metric("eval_many.one_s", wall["one"], "s", note=f"1 adapter + base, {sizes.requests} items"))
    report.add(Metric("eval_many.many_s", wall["many"], "s", note=f"{k} adapters + base, one pass"))
    report.add(Metric("eval_many.many_over_one", ratios(wall["many"], wall["one"]), "x", 2.0, "<=",
                      f"wall time, {k} adapters / 1 (one after another: {k}x)"))
    report.add(Metric("eval_many.generate_many_over_one", ratios(gen["many"], gen["one"]), "x",
                      note=f"generation pass only, {k} adapters / 1"))
    report.add(Metric("eval_many.invariant_over_normal", ratios(wall["inv"], wall["one"]), "x",
                      note="wall time, --batch-invariant / normal, 1 adapter"))
    report.add(Metric("eval_many.generate_invariant_over_normal", ratios(gen["inv"], gen["one"]), "x",
                      note="generation pass only"))
    return {"adapters": k, "items": sizes.requests, "new_tokens": new_tokens, "rounds": reps,
            "wall_s": {c: summarize(v) for c, v in wall.items()},
            "generate_s": {c: summarize(v) for c, v in gen.items()}}
