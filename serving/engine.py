"""The serving engine: one base model, many LoRA adapters, one continuous batch.

Plain Python (no web framework). Use it directly::

    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    engine = Engine.load(EngineConfig(base="smollm2-135m-instruct", quantize="nf4"), catalog=cat, store=store)
    out = engine.generate("Hello", adapter="support-bot@production", max_tokens=32, temperature=0)
    outs = engine.generate_batch([{"prompt": "Hi", "adapter": "a"}, {"prompt": "Hi"}])  # one batch
    engine.shutdown()

``Engine`` is the facade over two parts, plus tokenizing and request checks::

    caller thread                                     engine thread
    resolve(model/adapter)   serving/router.py        serving/scheduler.py
    encode, params_for       (this module)            batching, adapter slots, KV-cache decode,
    submit ------------------------------------->     continuous batching, cancellation
    events <-------------------------------------     sink(Event)
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from loradex.hub.errors import LoradexError
from loradex.serving.cache import ref_label
from loradex.serving.config import EngineConfig
from loradex.serving.errors import AdapterLoadFailed, BadRequest, ContextTooLong, NotReady
from loradex.serving.lora import read_adapter
from loradex.serving.metrics import Metrics, serving_metrics
from loradex.serving.router import Router, Target
from loradex.serving.sampling import SamplingParams
from loradex.serving.scheduler import Event, Handle, Scheduler, Sequence

__all__ = ["Completion", "Engine", "Event", "Handle", "Sequence", "Target"]


@dataclass
class Completion:
    """A finished request (the blocking API's result)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    path: str


class Engine:
    """Serves one loaded base and the catalog's adapters for it; see the module docstring."""

    def __init__(self, loaded, *, catalog, store, config: EngineConfig, metrics: Metrics | None = None):
        self.loaded = loaded
        self.base_name = loaded.name
        self.catalog = catalog
        self.store = store
        self.config = config
        self.metrics = metrics or serving_metrics()
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self._tok_lock = threading.Lock()
        self.scheduler = Scheduler(loaded, config=config, metrics=self.metrics, read_adapter=self._read_adapter,
                                   tok_lock=self._tok_lock)
        self.router = Router(self, catalog=catalog, config=config, open_merged=self._open_merged)
        self.cache = self.scheduler.cache
        self.context = self.scheduler.context

    # -- lifecycle ---------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig, *, catalog, store, settings=None, metrics: Metrics | None = None) -> "Engine":
        """Load the base once (quantized as configured), start the engine thread, load pinned adapters."""
        from loradex.hub.loading import load_base

        loaded = load_base(config.base, config.quantize, config.device, catalog=catalog, store=store,
                           settings=settings, dtype=config.dtype, serving=True)
        engine = cls(loaded, catalog=catalog, store=store, config=config, metrics=metrics)
        engine.start()
        for ref in config.pin:
            engine.pin(ref)
        return engine

    def _open_merged(self, config: EngineConfig) -> "Engine":
        return Engine.load(config, catalog=self.catalog, store=self.store, metrics=self.metrics)

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``drain_s``, cancel the rest."""
        self.scheduler.shutdown(drain_s)
        self.router.shutdown(drain_s)

    @property
    def ready(self) -> bool:
        return self.scheduler.ready

    def pin(self, ref: str) -> dict:
        """Load an adapter now and never evict it."""
        target = self.resolve(adapter=ref)
        if target.row is None:
            raise BadRequest(f"--pin {ref}: that is the base model, not an adapter", param="pin")
        self.scheduler.call(lambda: self.cache.acquire(target.row, pin=True))
        return target.row

    def forget(self, row: dict) -> None:
        """Drop a deleted version from the cache (waits for its running rows to finish)."""
        deadline = time.monotonic() + 30
        while row["id"] in self.cache.entries and time.monotonic() < deadline:
            if self.scheduler.call(lambda: self.cache.drop(row["id"])):
                return
            time.sleep(0.05)

    # -- resolving, tokenizing, checking (caller threads) -----------------------------------------
    def resolve(self, model: str | None = None, adapter: str | None = None) -> Target:
        """Which engine and adapter serve a request (``serving.router.Router.resolve``)."""
        return self.router.resolve(model, adapter)

    def encode(self, prompt: str | list[int] | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a completion prompt (text or ids) or of chat messages (the base's chat template)."""
        with self._tok_lock:
            if messages is not None:
                if not messages:
                    raise BadRequest("messages must not be empty", param="messages")
                from loradex.hub.chat import encode_chat

                try:  # the one chat encoding training, evals, merge probes and the llama.cpp check use too
                    ids = encode_chat(self.tokenizer, messages)
                except Exception as exc:  # jinja errors: the template rejected these messages
                    raise BadRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
            elif isinstance(prompt, str):
                ids = self.tokenizer(prompt)["input_ids"]
            elif isinstance(prompt, list):
                vocab = len(self.tokenizer)
                if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                    raise BadRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
                ids = list(prompt)
            else:
                raise BadRequest("give a prompt (text or token ids) or messages", param="prompt")
        if not ids:
            raise BadRequest("the prompt is empty", param="messages" if messages is not None else "prompt")
        return ids

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def params_for(self, prompt_len: int, *, max_tokens: int | None = None, prompt_field: str = "prompt",
                   **kw) -> SamplingParams:
        """SamplingParams checked against the limits and this prompt's room in the context."""
        room = self.context - prompt_len
        if max_tokens is None:
            if room < 1:
                raise ContextTooLong(f"the prompt has {prompt_len} tokens; this model's context is {self.context}",
                                     param=prompt_field)
            max_tokens = min(self.config.default_max_tokens, room)
        if max_tokens > self.config.max_tokens_limit:
            raise BadRequest(f"max_tokens {max_tokens} is over this server's limit of {self.config.max_tokens_limit}",
                             param="max_tokens")
        if prompt_len + max_tokens > self.context:
            raise ContextTooLong(
                f"this model's context is {self.context} tokens; the prompt has {prompt_len} and max_tokens asks for "
                f"{max_tokens} more ({prompt_len + max_tokens}); shorten the prompt or lower max_tokens",
                param="max_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens, **kw)
        except LoradexError as exc:
            name = str(exc).split(" ", 1)[0]
            raise BadRequest(str(exc), param=name if name in ("temperature", "top_p", "stop", "max_tokens", "seed", "min_tokens") else None) from None

    # -- submitting ------------------------------------------------------------
    def submit(self, prompt_ids: list[int], target: Target, params: SamplingParams,
               sink: Callable[[Event], None]) -> Handle:
        """Queue a request on its target's engine; ``sink`` gets its Events on that engine's thread.

        Raises QueueFull/NotReady/ContextTooLong.
        """
        if target.engine is not self:
            return target.engine.submit(prompt_ids, target, params, sink)
        return self.scheduler.submit(prompt_ids, target, params, sink)

    def generate(self, prompt: str | list[int] | None = None, *, messages: list[dict] | None = None,
                 adapter: str | None = None, model: str | None = None, timeout: float | None = None,
                 **params) -> Completion:
        """Run one request to completion (blocking)."""
        return self.generate_batch([dict(params, prompt=prompt, messages=messages, adapter=adapter, model=model)],
                                   timeout=timeout)[0]

    def generate_batch(self, requests: list[dict], timeout: float | None = None) -> list[Completion]:
        """Submit every request at once (so they share batches) and wait for all.

        Each dict holds ``prompt`` or ``messages``, optional ``adapter``/``model``,
        and SamplingParams fields (max_tokens, temperature, top_p, stop, seed).
        """
        prepared = []
        for req in requests:  # resolve and check everything first, then submit together so they share a batch
            req = dict(req)
            target = self.resolve(model=req.pop("model", None), adapter=req.pop("adapter", None))
            messages = req.pop("messages", None)
            ids = self.encode(req.pop("prompt", None), messages)
            prepared.append((target, ids, self.params_for(len(ids), **req)))
        jobs = []
        for target, ids, params in prepared:
            box: list[Event] = []
            done = threading.Event()

            def sink(ev: Event, box=box, done=done) -> None:
                box.append(ev)
                if ev.done:
                    done.set()

            try:
                handle = self.submit(ids, target, params, sink)
            except BaseException:
                for job in jobs:
                    job[4].cancel()
                raise
            jobs.append((target, ids, box, done, handle))
        results = []
        for target, ids, box, done, handle in jobs:
            if not done.wait(timeout):
                handle.cancel()
                raise NotReady(f"generation did not finish within {timeout}s")
            last = box[-1]
            if last.error is not None:
                raise last.error
            results.append(Completion(
                text="".join(e.text for e in box), token_ids=[t for e in box for t in e.token_ids],
                finish_reason=last.finish_reason or "stop", prompt_tokens=len(ids),
                completion_tokens=last.usage["completion_tokens"], model=target.model, path=target.path))
        return results

    async def astream(self, prompt_ids: list[int], target: Target, params: SamplingParams) -> tuple[Handle, AsyncIterator[Event]]:
        """Submit and get an async iterator of Events (for asyncio servers)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopping)
                pass

        handle = self.submit(prompt_ids, target, params, sink)

        async def events() -> AsyncIterator[Event]:
            while True:
                ev = await q.get()
                yield ev
                if ev.done:
                    return

        return handle, events()

    # -- status ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Rows in the running batch (``active``) and requests not yet admitted (``waiting``)."""
        return self.scheduler.counts()

    def stats(self) -> dict:
        counts = self.scheduler.counts()
        return {"base": self.base_name, "quantize": self.loaded.quantize, "device": self.device,
                "kernels": self.loaded.info.get("kernels"),
                "active": counts["active"], "waiting": counts["waiting"], "context": self.context,
                "loaded_adapters": self.cache.loaded(), "lora_bank_bytes": self.scheduler.bank.nbytes(),
                "merged_models": self.router.merged_names()}

    # -- the adapter cache's loader (runs on the engine thread) --------------------------------------
    def _read_adapter(self, row: dict):
        from loradex.hub.registry import adapter_folder

        try:
            _, folder = adapter_folder(self.catalog, self.store, row)
            return read_adapter(folder, dtype=self.loaded.dtype)
        except LoradexError:
            raise
        except Exception as exc:
            raise AdapterLoadFailed(f"adapter {ref_label(row)} could not be loaded: {type(exc).__name__}: {exc}") from None
