"""How the benchmarks drive loradex's serving engine (``serving.engine.Engine``) and plain PEFT.

Requests are dicts ``{"messages": [...], "adapter": NAME or None, "max_tokens": N}``
(or token ``ids`` instead of messages; ``ignore_eos`` for a fixed length), always greedy. :func:`engine_round` submits a whole round at once through
``Engine.submit`` (the path the HTTP server takes), so the requests share the
continuous batch, and times each request from submission to its last token.
:class:`PeftBaseline` serves the same requests with plain PEFT, the floor the
engine has to beat.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Describe, step by step, how to bake bread at home.",
    "Tell a long tale about a dragon who is afraid of the dark.",
    "Explain in detail how a bicycle gear system works.",
    "Write a long letter from a sailor to his family back home.",
    "Describe a busy market in a mountain town, in great detail.",
    "Write a long story about two robots who learn to paint.",
    "Explain at length why the sky changes colour at sunset.",
]


def requests_for(adapters: list[str | None], max_tokens: int) -> list[dict]:
    """One request per entry (None: the bare base), prompts cycling through PROMPTS."""
    return [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "adapter": a,
             "max_tokens": max_tokens} for i, a in enumerate(adapters)]


@dataclass
class Round:
    """One round of concurrent requests: wall time, tokens, per-request latency and time to first token."""

    wall_s: float
    tokens: int
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def open_engine(ws, catalog, *, max_loaded: int = 8, pin: list[str] | None = None, **config):
    """A started loradex engine on the workspace's base."""
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    config.setdefault("quantize", ws.quantize)
    cfg = EngineConfig(base=ws.base_name, device=ws.device, max_loaded=max_loaded, pin=list(pin or []), **config)
    return Engine.load(cfg, catalog=catalog, store=ws.store, settings=ws.settings)


def engine_round(engine, requests: list[dict], timeout: float = 600.0) -> Round:
    """Submit every request at once and wait for all; raises the first request error."""
    from loradex.serving.engine import Event

    n = len(requests)
    done_at: list[float | None] = [None] * n
    first_at: list[float | None] = [None] * n
    tokens = [0] * n
    errors: list[BaseException] = []
    all_done = threading.Event()
    remaining = [n]
    lock = threading.Lock()
    prepared = []
    t0 = time.perf_counter()  # resolving and tokenizing are part of serving a request
    for req in requests:
        target = engine.resolve(adapter=req.get("adapter"))
        ids = req["ids"] if "ids" in req else engine.encode(messages=req["messages"])
        params = engine.params_for(len(ids), max_tokens=req["max_tokens"], temperature=0.0,
                                   ignore_eos=req.get("ignore_eos", False))
        prepared.append((ids, target, params))

    def sink_for(i: int):
        def sink(ev: Event) -> None:
            now = time.perf_counter()
            if first_at[i] is None and ev.token_ids:
                first_at[i] = now
            if ev.error is not None:
                errors.append(ev.error)
            if ev.done:
                done_at[i] = now
                if ev.usage:
                    tokens[i] = ev.usage["completion_tokens"]
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        all_done.set()
        return sink

    for i, (ids, target, params) in enumerate(prepared):
        engine.submit(ids, target, params, sink_for(i))
    if not all_done.wait(timeout):
        raise TimeoutError(f"{n} requests did not finish within {timeout:.0f}s")
    if errors:
        raise errors[0]
    wall = max(d for d in done_at if d is not None) - t0
    return Round(wall_s=wall, tokens=sum(tokens), latencies_s=[d - t0 for d in done_at if d is not None],
                 ttft_s=[f - t0 for f in first_at if f is not None])


def batch1_decoder(engine, prompt: str):
    """fn(n_tokens) -> (seconds, tokens generated) for one base request at batch 1."""
    def run(n: int) -> tuple[float, int]:
        r = engine_round(engine, [{"messages": [{"role": "user", "content": prompt}], "adapter": None,
                                   "max_tokens": n}])
        return r.wall_s, r.tokens

    return run


class PeftBaseline:
    """Plain PEFT over its own copy of the base: the naive set_adapter loop and PEFT's mixed batch."""

    def __init__(self, ws, catalog, adapter_folders: dict[str, object]):
        from peft import PeftModel

        from loradex.hub.loading import load_base

        loaded = load_base(ws.base_name, quantize=ws.quantize, device=ws.device, catalog=catalog, store=ws.store)
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        names = list(adapter_folders)
        model = PeftModel.from_pretrained(loaded.model, str(adapter_folders[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapter_folders[name]), adapter_name=name)
        model.eval()
        self.model = model

    def _encode(self, reqs: list[dict]):
        tok = self.tokenizer
        texts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in reqs]
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _generate(self, enc, max_tokens: int, **kw):
        import torch

        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id, **kw)
        return out[:, enc["input_ids"].shape[1]:]

    def _count(self, new_ids) -> int:
        """Generated tokens up to and including each row's first EOS (what the engine counts)."""
        eos = self.tokenizer.eos_token_id
        total = 0
        for row in new_ids.tolist():
            total += row.index(eos) + 1 if eos in row else len(row)
        return total

    def swap_round(self, requests: list[dict]) -> Round:
        """Requests served one after another, switching the active adapter each time (all arrive at t0)."""
        t0 = time.perf_counter()
        latencies, ttft, tokens = [], [], 0
        for req in requests:
            enc = self._encode([req])
            if req["adapter"] is None:
                with self.model.disable_adapter():
                    new = self._generate(enc, req["max_tokens"])
            else:
                self.model.set_adapter(req["adapter"])
                new = self._generate(enc, req["max_tokens"])
            tokens += self._count(new)
            latencies.append(time.perf_counter() - t0)
        return Round(wall_s=time.perf_counter() - t0, tokens=tokens, latencies_s=latencies, ttft_s=ttft)

    def mixed_round(self, requests: list[dict]) -> Round:
        """PEFT's own mixed batch: ``generate(adapter_names=[...])``, one call for every request."""
        t0 = time.perf_counter()
        enc = self._encode(requests)
        names = [r["adapter"] or "__base__" for r in requests]
        new = self._generate(enc, max(r["max_tokens"] for r in requests), adapter_names=names)
        wall = time.perf_counter() - t0
        return Round(wall_s=wall, tokens=self._count(new), latencies_s=[wall] * len(requests))
