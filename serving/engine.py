"""The serving engine: one base model, many LoRA adapters, one continuous batch.

Plain Python (no web framework). Use it directly::

    from serving.config import EngineConfig
    from serving.engine import Engine

    engine = Engine.load(EngineConfig(base="smollm2-135m-instruct", quantize="nf4"), catalog=cat, store=store)
    out = engine.generate("Hello", adapter="support-bot@production", max_tokens=32, temperature=0)
    outs = engine.generate_batch([{"prompt": "Hi", "adapter": "a"}, {"prompt": "Hi"}])  # one batch
    engine.shutdown()

How a request flows::

    caller thread                         engine thread (owns the model)
    resolve(model/adapter) via catalog    waiting queue --(batch window, max batch)--> admit:
    tokenize, check context, submit  -->    acquire adapter slot (LRU cache, sha256-verified load)
                                            prefill newcomers together (right-padded)
    events <-- sink(Event) <------------    decode step over every active row (own KV cache,
                                            own batched LoRA), per-row sampling, stop checks

New requests join the running batch between decode steps (continuous
batching); finished, cancelled and failed rows leave it. A failing adapter load
fails only the requests for that adapter.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from hub.errors import InvalidName, LoradexError, NotFound
from hub.names import parse_ref
from serving.cache import AdapterCache, CacheBusy, ref_label
from serving.config import EngineConfig
from serving.errors import (AdapterLoadFailed, BadRequest, Cancelled, ContextTooLong, GenerationFailed, ModelNotFound,
                            NotReady, QueueFull)
from serving.lora import LoRABank, read_adapter
from serving.metrics import Metrics, serving_metrics
from serving.runner import Runner
from serving.sampling import SamplingParams, TextStream, sample


@dataclass
class Target:
    """What a request runs on: an engine, and an adapter version row or None for the bare model."""

    engine: "Engine"
    row: dict | None
    path: str                # base | adapter | merged
    model: str               # the name echoed back to the client
    served_as: str | None = None  # NAME@V an adapter's merged model stands for (path "merged")

    @property
    def label(self) -> str:
        if self.served_as is not None:
            return self.served_as
        return ref_label(self.row) if self.row is not None else self.engine.base_name


@dataclass
class Event:
    """One step of a request's output, delivered to its sink."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None     # stop | length, on the last event
    usage: dict | None = None            # on the last event
    error: BaseException | None = None   # the request failed (last event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


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


class Sequence:
    """One request's state inside the engine."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], target: Target, params: SamplingParams, sink: Callable[[Event], None],
                 tokenizer, device):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.target = target
        self.params = params
        self.sink = sink
        self.generator = params.generator(device)
        self.stream = TextStream(tokenizer, params.stop)
        self.generated: list[int] = []
        self.slot = -1
        self.finish_reason: str | None = None
        self.cancelled = False
        self.created = time.perf_counter()
        self.first_token_at: float | None = None


class Handle:
    """Returned by :meth:`Engine.submit`; lets the caller cancel."""

    def __init__(self, seq: Sequence):
        self._seq = seq

    def cancel(self) -> None:
        self._seq.cancelled = True


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
        model = loaded.model
        self.runner = Runner(model)
        self.bank = LoRABank(model, loaded.dtype, loaded.device, capacity=min(config.max_loaded, 8))
        self.cache = AdapterCache(self.bank, self._read_adapter, config.max_loaded, self.metrics)
        max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context = min(config.max_context or max_pos, max_pos)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self._tok_lock = threading.Lock()
        self._incoming: queue.Queue[Sequence] = queue.Queue()
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._kv = self.runner.empty_cache()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._accepting = True
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self._merged: dict[str, Engine] = {}
        self._merged_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"loradex-engine-{self.base_name}", daemon=True)

    # -- lifecycle ---------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig, *, catalog, store, settings=None, metrics: Metrics | None = None) -> "Engine":
        """Load the base once (quantized as configured), start the engine thread, load pinned adapters."""
        from hub.loading import load_base

        loaded = load_base(config.base, config.quantize, config.device, catalog=catalog, store=store,
                           settings=settings, dtype=config.dtype)
        engine = cls(loaded, catalog=catalog, store=store, config=config, metrics=metrics)
        engine.start()
        for ref in config.pin:
            engine.pin(ref)
        return engine

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``drain_s``, cancel the rest."""
        self._accepting = False
        self._drain_deadline = time.monotonic() + drain_s
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=drain_s + 30)
        with self._merged_lock:
            merged = list(self._merged.values())
            self._merged.clear()
        for eng in merged:
            eng.shutdown(drain_s)

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def _call(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run ``fn`` on the engine thread (which owns the model) and return its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            done.set()

        self._commands.put(run)
        if not done.wait(timeout):
            raise NotReady("the engine did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def pin(self, ref: str) -> dict:
        """Load an adapter now and never evict it."""
        target = self.resolve(adapter=ref)
        if target.row is None:
            raise BadRequest(f"--pin {ref}: that is the base model, not an adapter", param="pin")
        self._call(lambda: self.cache.acquire(target.row, pin=True))
        return target.row

    def forget(self, row: dict) -> None:
        """Drop a deleted version from the cache (waits for its running rows to finish)."""
        deadline = time.monotonic() + 30
        while row["id"] in self.cache.entries and time.monotonic() < deadline:
            if self._call(lambda: self.cache.drop(row["id"])):
                return
            time.sleep(0.05)

    # -- resolving and tokenizing (caller threads) ------------------------------------------
    def resolve(self, model: str | None = None, adapter: str | None = None) -> Target:
        """Which engine and adapter serve a request; ``adapter`` wins over ``model``.

        ``model`` may be the base's name (no adapter), ``NAME``, ``NAME@VERSION`` or
        ``NAME@ALIAS``; the catalog is read now, so new versions and moved aliases
        apply to the next request.
        """
        ref = adapter if adapter else model
        field_name = "adapter" if adapter else "model"
        if ref is None or ref == "" or ref == self.base_name:
            return Target(self, None, "base", self.base_name)
        from hub.registry import resolve as resolve_ref

        try:
            parsed = parse_ref(ref)
            row = resolve_ref(self.catalog, parsed)
        except (InvalidName, NotFound):
            err = ModelNotFound(f"model {ref!r} not found: not the base ({self.base_name}) nor a registered adapter; "
                                f"GET /v1/models lists what this server serves")
            err.param = field_name
            raise err from None
        if row["base"] != self.base_name:
            err = ModelNotFound(f"adapter {row['adapter']}@{row['version']} is for base {row['base']!r}, "
                                f"but this server serves {self.base_name!r}")
            err.param = field_name
            raise err
        if self.config.route_merged:
            merged = self._merged_engine(row)
            if merged is not None:
                return Target(merged, None, "merged", ref, served_as=ref_label(row))
        return Target(self, row, "adapter", ref)

    def _merged_engine(self, row: dict) -> "Engine | None":
        from serving.routing import merged_base_for

        name = merged_base_for(self.catalog, row, self.base_name)
        if name is None:
            return None
        with self._merged_lock:
            eng = self._merged.get(name)
            if eng is None:
                if len(self._merged) >= self.config.max_merged:
                    return None
                from dataclasses import replace

                cfg = replace(self.config, base=name, route_merged=False, pin=[], max_loaded=1)
                eng = Engine.load(cfg, catalog=self.catalog, store=self.store, metrics=self.metrics)
                self._merged[name] = eng
            return eng

    def encode(self, prompt: str | list[int] | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a completion prompt (text or ids) or of chat messages (the base's chat template)."""
        with self._tok_lock:
            if messages is not None:
                if not messages:
                    raise BadRequest("messages must not be empty", param="messages")
                try:
                    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                except Exception as exc:  # jinja errors: the template rejected these messages
                    raise BadRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
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
            raise BadRequest(str(exc), param=name if name in ("temperature", "top_p", "stop", "max_tokens") else None) from None

    # -- submitting ------------------------------------------------------------
    def submit(self, prompt_ids: list[int], target: Target, params: SamplingParams,
               sink: Callable[[Event], None]) -> Handle:
        """Queue a request; ``sink`` gets its Events on the engine thread. Raises QueueFull/NotReady."""
        if target.engine is not self:
            return target.engine.submit(prompt_ids, target, params, sink)
        if not self._accepting:
            raise NotReady("the server is shutting down", retry_after=5)
        if len(prompt_ids) + params.max_tokens > self.context:
            raise ContextTooLong(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceed the "
                                 f"context of {self.context} tokens", param="max_tokens")
        with self._pending_lock:
            if self._pending >= self.config.max_queued:
                raise QueueFull(f"{self._pending} requests are already waiting (--max-queued "
                                f"{self.config.max_queued}); retry shortly", retry_after=1)
            self._pending += 1
        seq = Sequence(prompt_ids, target, params, sink, self.tokenizer, self.device)
        self._incoming.put(seq)
        return Handle(seq)

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
    def stats(self) -> dict:
        return {"base": self.base_name, "quantize": self.loaded.quantize, "device": self.device,
                "active": len(self._active), "waiting": self._pending, "context": self.context,
                "loaded_adapters": self.cache.loaded(), "lora_bank_bytes": self.bank.nbytes(),
                "merged_models": sorted(self._merged)}

    # -- engine thread ------------------------------------------------------------
    def _read_adapter(self, row: dict):
        from hub.registry import adapter_folder

        try:
            _, folder = adapter_folder(self.catalog, self.store, row)
            return read_adapter(folder, dtype=self.loaded.dtype)
        except LoradexError:
            raise
        except Exception as exc:
            raise AdapterLoadFailed(f"adapter {ref_label(row)} could not be loaded: {type(exc).__name__}: {exc}") from None

    def _loop(self) -> None:
        while True:
            self._run_commands()
            if self._stop.is_set():
                self._accepting = False
                idle = not self._active and not self._waiting and self._incoming.empty()
                if idle or time.monotonic() >= (self._drain_deadline or 0):
                    self._cancel_all(NotReady("the server is shutting down; request cancelled"))
                    self._run_commands()
                    return
            got = self._take_incoming(block=not self._active and not self._waiting)
            if got and not self._active and self.config.batch_window_ms > 0:
                deadline = time.monotonic() + self.config.batch_window_ms / 1000
                while len(self._waiting) < self.config.max_batch and time.monotonic() < deadline:
                    try:
                        self._waiting.append(self._incoming.get(timeout=max(0.0, deadline - time.monotonic())))
                    except queue.Empty:
                        break
            try:
                self._admit()
                if self._active:
                    self._decode_step()
            except Exception as exc:  # a broken forward fails the rows in it, not the engine
                self._fail_active(exc)

    def _run_commands(self) -> None:
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                return

    def _take_incoming(self, block: bool) -> bool:
        got = False
        try:
            if block:
                self._waiting.append(self._incoming.get(timeout=0.05))
                got = True
            while True:
                self._waiting.append(self._incoming.get_nowait())
                got = True
        except queue.Empty:
            pass
        return got

    def _left_waiting(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _admit(self) -> None:
        newcomers: list[Sequence] = []
        still: deque[Sequence] = deque()
        while self._waiting:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._left_waiting()
                self._finish_error(seq, Cancelled("request cancelled"))
                continue
            if len(self._active) + len(newcomers) >= self.config.max_batch:
                still.append(seq)
                continue
            if seq.target.row is not None:
                try:
                    seq.slot = self.cache.acquire(seq.target.row)
                except CacheBusy:
                    still.append(seq)
                    continue
                except Exception as exc:
                    self._left_waiting()
                    self._finish_error(seq, exc)
                    continue
            self._left_waiting()
            newcomers.append(seq)
        self._waiting = still
        if not newcomers:
            return
        self.bank.ctx.set_rows([s.slot for s in newcomers])
        try:
            logits, kv = self.runner.prefill([s.prompt_ids for s in newcomers])
        except Exception as exc:
            for s in newcomers:
                self._release(s)
                self._finish_error(s, exc)
            return
        finally:
            self.bank.ctx.clear()
        self.metrics.observe("batch_size", len(newcomers), "prefill")
        self._kv.extend(kv)
        self._active.extend(newcomers)
        tokens = sample(logits, [s.params for s in newcomers], [s.generator for s in newcomers])
        for s, tok in zip(newcomers, tokens):
            self.metrics.inc("prompt_tokens_total", s.target.label, by=len(s.prompt_ids))
            self._accept(s, tok)
        self._reap()

    def _decode_step(self) -> None:
        rows = self._active
        self.bank.ctx.set_rows([s.slot for s in rows])
        try:
            logits = self.runner.decode([s.generated[-1] for s in rows], self._kv)
        finally:
            self.bank.ctx.clear()
        self.metrics.observe("batch_size", len(rows), "decode")
        tokens = sample(logits, [s.params for s in rows], [s.generator for s in rows])
        for s, tok in zip(rows, tokens):
            if not s.cancelled:
                self._accept(s, tok)
        self._reap()

    def _accept(self, seq: Sequence, token: int) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self.metrics.observe("time_to_first_token_seconds", seq.first_token_at - seq.created, seq.target.label)
        seq.generated.append(token)
        if token in self.eos_ids:
            seq.finish_reason = "stop"
            delta, ids = seq.stream.flush(), []
        else:
            with self._tok_lock:
                delta, hit = seq.stream.push(token)
            ids = [token]
            if hit:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                delta += seq.stream.flush()
        if seq.finish_reason is None:
            if delta or ids:
                self._emit(seq, Event(text=delta, token_ids=ids))
            return
        usage = {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.generated),
                 "total_tokens": len(seq.prompt_ids) + len(seq.generated)}
        self.metrics.inc("generated_tokens_total", seq.target.label, by=len(seq.generated))
        self.metrics.inc("requests_total", seq.target.label, seq.target.path, "ok")
        self.metrics.observe("request_latency_seconds", time.perf_counter() - seq.created, seq.target.label)
        self._emit(seq, Event(text=delta, token_ids=ids, finish_reason=seq.finish_reason, usage=usage))

    def _emit(self, seq: Sequence, ev: Event) -> None:
        try:
            seq.sink(ev)
        except Exception:  # a consumer that went away must not stop the batch
            seq.cancelled = True

    def _release(self, seq: Sequence) -> None:
        if seq.target.row is not None and seq.slot >= 0:
            self.cache.release(seq.target.row["id"])
            seq.slot = -1

    def _reap(self) -> None:
        keep = [i for i, s in enumerate(self._active) if s.finish_reason is None and not s.cancelled]
        if len(keep) == len(self._active):
            return
        for i, s in enumerate(self._active):
            if i not in keep:
                self._release(s)
                if s.finish_reason is None:
                    self._finish_error(s, Cancelled("request cancelled"))
        self._active = [self._active[i] for i in keep]
        self._kv.keep(keep)

    def _finish_error(self, seq: Sequence, exc: BaseException) -> None:
        label = seq.target.label
        self.metrics.inc("errors_total", label, type(exc).__name__)
        self.metrics.inc("requests_total", label, seq.target.path, "cancelled" if isinstance(exc, Cancelled) else "error")
        err = exc if isinstance(exc, LoradexError) else GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
        self._emit(seq, Event(error=err))

    def _fail_active(self, exc: BaseException) -> None:
        for s in self._active:
            self._release(s)
            self._finish_error(s, exc)
        self._active = []
        self._kv = self.runner.empty_cache()

    def _cancel_all(self, exc: BaseException) -> None:
        while self._take_incoming(block=False):
            pass
        for s in list(self._waiting):
            self._left_waiting()
            self._finish_error(s, exc)
        self._waiting.clear()
        self._fail_active(exc)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids

