"""The model side of an eval on the serving engine: many adapters and the base in shared batches.

Evals and ``loradex serve`` share one decode path: the eval opens the same
:class:`serving.engine.Engine` the server runs (same base loading, same batched
LoRA, same KV-cache loop, greedy = ``temperature 0``), and submits every
(item, side) pair at once, where a *side* is one adapter version or the bare
base. The engine's continuous batch mixes them::

    items sorted by prompt length, sides inner:
    [it0/base, it0/A, it0/B, ..., it1/base, it1/A, ...]  --submit all-->  engine
    up to  batch_size x sides  rows per forward (rows join between decode steps)

So k adapters cost about one pass over the data, not k, and the base's outputs
are generated once for all of them. A row's text is exactly what the server
answers for the same messages with ``temperature 0`` and ``max_tokens`` (the
text is not stripped). With ``batch_invariant`` the engine runs each row's
forward by itself (``EngineConfig.batch_invariant``), so a row's tokens do not
depend on the batch size or on which rows share its batch.

Perplexity (teacher forcing) runs the loaded transformers model's own forward
on the engine thread, with the engine's LoRA slot of the side switched on for
every row (``evals.generate.reference_perplexities``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from loradex.serving.config import EngineConfig


@dataclass
class Side:
    """One column of the eval: an adapter version row, or None for the bare base."""

    label: str
    row: dict | None


def open_engine(base: str, *, quantize: str, device: str, dtype: str, adapters: list[dict], rows_per_batch: int,
                max_rows: int, max_new_tokens: int, batch_invariant: bool, catalog, store, settings):
    """Load the base as ``loradex serve`` does and pin ``adapters`` (verified folders already materialized).

    ``rows_per_batch`` is the engine's ``max_batch``; ``max_rows`` the rows submitted at once.
    """
    from loradex.serving.engine import Engine

    config = EngineConfig(base=base, quantize=quantize, device=device, dtype=dtype,
                          max_loaded=max(1, len(adapters)), max_batch=rows_per_batch, max_queued=max(1, max_rows),
                          max_tokens_limit=max(max_new_tokens, EngineConfig.max_tokens_limit),
                          batch_invariant=batch_invariant)
    engine = Engine.load(config, catalog=catalog, store=store, settings=settings)
    try:
        for row in adapters:  # load every adapter before the clock of the generation pass starts
            engine.scheduler.call(lambda row=row: engine.cache.acquire(row, pin=True))
    except BaseException:
        engine.shutdown()
        raise
    return engine


def generate_sides(engine, items, sides: list[Side], *, max_new_tokens: int,
                   on_row: Callable[[int], None] | None = None) -> dict[str, list[str]]:
    """Greedy outputs of every side on every item, {label: [text per item, in item order]}."""
    from loradex.serving.router import Target
    from loradex.serving.sampling import SamplingParams

    encoded = [engine.encode(messages=it.messages) for it in items]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    targets = [Target(engine, s.row, "adapter" if s.row is not None else "base", s.label) for s in sides]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    jobs: list[tuple[int, int, list, threading.Event]] = []
    handles = []
    try:
        for i in order:  # one item's rows together: same prompt length, little prefill padding
            for j, target in enumerate(targets):
                box: list = []
                done = threading.Event()

                def sink(ev, box=box, done=done) -> None:
                    box.append(ev)
                    if ev.done:
                        done.set()
                        if on_row is not None:
                            on_row(1)

                handles.append(engine.submit(encoded[i], target, params, sink))
                jobs.append((i, j, box, done))
        out = {s.label: [""] * len(items) for s in sides}
        for i, j, box, done in jobs:
            done.wait()
            last = box[-1]
            if last.error is not None:
                raise last.error
            out[sides[j].label][i] = "".join(e.text for e in box)
        return out
    except BaseException:
        for h in handles:
            h.cancel()
        raise


def side_perplexities(engine, items, side: Side, *, batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Teacher-forced perplexity of each reference under ``side`` (the engine's LoRA slot on every row)."""
    from loradex.evals.generate import reference_perplexities

    sched = engine.scheduler

    def work() -> list[float]:
        slot = engine.cache.acquire(side.row) if side.row is not None else -1
        try:
            sched.bank.ctx.set_rows([slot])  # one slot for all rows: the uniform plan, whatever the batch
            return reference_perplexities(engine.loaded.model, engine.tokenizer, items, batch_size=batch_size,
                                          on_batch=on_batch)
        finally:
            sched.bank.ctx.clear()
            if side.row is not None:
                engine.cache.release(side.row["id"])

    return sched.call(work, timeout=None)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    value = fn(*args, **kw)
    return value, time.perf_counter() - t
