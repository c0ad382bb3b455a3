"""The scheduler: one engine thread that owns the model and runs a continuous batch over it.

Plain Python. ``serving/engine.py``'s ``Engine`` builds one per loaded model and
hands it requests already resolved (``serving/router.py``), tokenized and checked::

    caller threads                 engine thread (the only one that touches the model)
    submit(ids, target, params, sink)
      count it (--max-queued) ---> incoming --(batch window, --max-batch)--> waiting
                                   admit: cancelled? -> Cancelled event
                                          adapter slot (LRU cache, sha256-verified load)
                                          prefill the newcomers together (right-padded)
    sink(Event) <----------------- decode step over every active row (own KV cache,
                                   own batched LoRA), per-row sampling, stop checks
    call(fn) ---> commands ------> run between steps (pin, forget, tests)

New requests join the running batch between decode steps (continuous
batching); finished, cancelled and failed rows leave it. With
``EngineConfig.batch_invariant`` every row's prefill and decode step run as
forwards of their own (the decode over a view of the row's KV-cache rows, which
relies on ``Runner.decode`` writing K/V in place), so a row's numbers are those
of its solo run whatever shares its batch. A failing adapter load
fails only the requests for that adapter; a failing forward fails the rows in
it, not the thread. Every forward is noted in a short step record
(:meth:`Scheduler.recent_steps`), so tests can see which rows shared a step.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from loradex.hub.errors import LoradexError
from loradex.serving.cache import AdapterCache, CacheBusy
from loradex.serving.config import EngineConfig
from loradex.serving.errors import Cancelled, ContextTooLong, GenerationFailed, NotReady, QueueFull
from loradex.serving.lora import AdapterWeights, LoRABank
from loradex.serving.metrics import Metrics
from loradex.serving.runner import KVCache, Runner
from loradex.serving.sampling import SamplingParams, TextStream, sample, suppress_eos

STEP_RECORD = 512  # forwards kept in the step record


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


class Sequence:
    """One request's state inside the scheduler.

    ``target`` is a ``serving.router.Target``: the scheduler reads its adapter
    ``row`` (None for the bare model), its metrics ``label`` and its ``path``.
    """

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], target, params: SamplingParams, sink: Callable[[Event], None],
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
        self.error: BaseException | None = None  # this row failed alone (non-finite logits); reaped next
        self.created = time.perf_counter()
        self.first_token_at: float | None = None


class Handle:
    """Returned by ``submit``; names the request in the step record and lets the caller cancel."""

    def __init__(self, seq: Sequence):
        self._seq = seq

    @property
    def id(self) -> int:
        return self._seq.id

    def cancel(self) -> None:
        self._seq.cancelled = True


class Scheduler:
    """Batches, slots and the decode loop for one loaded model; see the module docstring."""

    def __init__(self, loaded, *, config: EngineConfig, metrics: Metrics,
                 read_adapter: Callable[[dict], AdapterWeights], tok_lock: threading.Lock):
        self.config = config
        self.metrics = metrics
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.tok_lock = tok_lock  # shared with the caller threads that tokenize (tokenizers are not thread-safe)
        model = loaded.model
        self.runner = Runner(model)
        self.bank = LoRABank(model, loaded.dtype, loaded.device, capacity=min(config.max_loaded, 8))
        self.runner.bank = self.bank
        kernels = loaded.info.get("kernels")
        if isinstance(kernels, dict):  # which decode loop runs (serving/fastpath.py), reported with the kernels
            kernels["decode"] = "native" if self.runner.native_decode() else f"torch ({self.runner.native_reason})"
        self.cache = AdapterCache(self.bank, read_adapter, config.max_loaded, metrics)
        max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context = min(config.max_context or max_pos, max_pos)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self._eos_list = sorted(self.eos_ids)
        self._incoming: queue.Queue[Sequence] = queue.Queue()
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._kv = self.runner.empty_cache()
        self._pending = 0  # submitted, not yet admitted or dropped (what --max-queued bounds)
        self._pending_lock = threading.Lock()
        self._accepting = True
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self._steps: deque[dict] = deque(maxlen=STEP_RECORD)
        self._steps_lock = threading.Lock()
        self._step_no = 0
        self._thread = threading.Thread(target=self._loop, name=f"loradex-engine-{loaded.name}", daemon=True)

    # -- lifecycle (any thread) -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``drain_s``, cancel the rest."""
        self._accepting = False
        self._drain_deadline = time.monotonic() + drain_s
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=drain_s + 30)

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def call(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run ``fn`` on the engine thread (which owns the model) between steps and return its result."""
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

    # -- submitting (any thread) ---------------------------------------------------------
    def submit(self, prompt_ids: list[int], target, params: SamplingParams,
               sink: Callable[[Event], None]) -> Handle:
        """Queue a request; ``sink`` gets its Events on the engine thread. Raises QueueFull/NotReady."""
        if not self._accepting:
            raise NotReady("the server is shutting down", retry_after=5)
        if len(prompt_ids) + params.max_tokens > self.context:
            raise ContextTooLong(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceed the "
                                 f"context of {self.context} tokens", param="max_tokens")
        # Build the sequence (its generator may refuse the seed) before it is counted: a request that
        # fails here must not hold a --max-queued slot for ever.
        seq = Sequence(prompt_ids, target, params, sink, self.tokenizer, self.device)
        with self._pending_lock:
            if self._pending >= self.config.max_queued:
                raise QueueFull(f"{self._pending} requests are already waiting (--max-queued "
                                f"{self.config.max_queued}); retry shortly", retry_after=1)
            self._pending += 1
        try:
            self._incoming.put(seq)
        except BaseException:
            self._left_waiting()
            raise
        return Handle(seq)

    # -- status (any thread) ---------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Rows in the running batch (``active``) and requests not yet admitted (``waiting``)."""
        return {"active": len(self._active), "waiting": self._pending}

    def recent_steps(self) -> list[dict]:
        """The last forwards, oldest first: ``{"step", "phase" (prefill|decode), "ids", "labels"}``.

        ``ids`` are the request ids (``Handle.id``) of the rows in that forward,
        in batch order; ``labels`` their targets' labels.
        """
        with self._steps_lock:
            return [dict(s) for s in self._steps]

    # -- engine thread ------------------------------------------------------------------------
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
                # an idle engine waits briefly so that requests arriving together share the first prefill
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

    def _record(self, phase: str, rows: list[Sequence]) -> None:
        self._step_no += 1
        step = {"step": self._step_no, "phase": phase, "ids": [s.id for s in rows],
                "labels": [s.target.label for s in rows]}
        with self._steps_lock:
            self._steps.append(step)

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
        try:
            logits, kv = self._prefill(newcomers)
        except Exception as exc:
            for s in newcomers:
                self._release(s)
                self._finish_error(s, exc)
            return
        self._record("prefill", newcomers)
        self.metrics.observe("batch_size", len(newcomers), "prefill")
        self._kv.extend(kv)
        self._active.extend(newcomers)
        tokens = self._sample(newcomers, logits)
        for s, tok in zip(newcomers, tokens):
            self.metrics.inc("prompt_tokens_total", s.target.label, by=len(s.prompt_ids))
            if tok is not None:
                self._accept(s, tok)
        self._reap()

    def _decode_step(self) -> None:
        rows = self._active
        logits = self._decode(rows)
        self._record("decode", rows)
        self.metrics.observe("batch_size", len(rows), "decode")
        tokens = self._sample(rows, logits)
        for s, tok in zip(rows, tokens):
            if tok is not None and not s.cancelled:
                self._accept(s, tok)
        self._reap()

    def _prefill(self, rows: list[Sequence]):
        """Logits at each new row's last prompt token and the rows' KV cache (one forward, or one per row)."""
        if not self.config.batch_invariant:
            self.bank.ctx.set_rows([s.slot for s in rows])
            try:
                return self.runner.prefill([s.prompt_ids for s in rows])
            finally:
                self.bank.ctx.clear()
        import torch

        # --batch-invariant: each row alone, exactly the shapes of its solo run
        logits, kv = [], self.runner.empty_cache()
        for s in rows:
            self.bank.ctx.set_rows([s.slot])
            try:
                one_logits, one_kv = self.runner.prefill([s.prompt_ids])
            finally:
                self.bank.ctx.clear()
            logits.append(one_logits)
            kv.extend(one_kv)
        return torch.cat(logits), kv

    def _decode(self, rows: list[Sequence]):
        """Logits of every active row's next token (one forward, or one per row)."""
        if not self.config.batch_invariant:
            self.bank.ctx.set_rows([s.slot for s in rows])
            try:
                return self.runner.decode([s.generated[-1] for s in rows], self._kv)
            finally:
                self.bank.ctx.clear()
        import torch

        # --batch-invariant: row i decodes alone over a view of its own cache rows, attending over exactly its
        # own length (as in its solo run), so neither the batch size nor its neighbours change its numbers
        kv = self._kv
        kv.ensure_capacity(int(kv.lengths.max()) + 1)  # before the views: a resize would detach them
        logits = []
        for i, s in enumerate(rows):
            one = KVCache([k[i:i + 1] for k in kv.keys], [v[i:i + 1] for v in kv.values], kv.lengths[i:i + 1])
            self.bank.ctx.set_rows([s.slot])
            try:
                logits.append(self.runner.decode([s.generated[-1]], one))
            finally:
                self.bank.ctx.clear()
        kv.lengths = kv.lengths + 1
        return torch.cat(logits)

    def _sample(self, rows: list[Sequence], logits) -> list[int | None]:
        """One token per row; None for a row that failed alone (its ``error`` is set, ``_reap`` ends it).

        A row whose logits are not finite (a poisoned adapter: NaN alpha, huge weights) would make
        ``torch.multinomial`` raise for the whole batch, or argmax pick garbage; it fails by itself
        with an error naming its adapter, and every other row goes on.
        """
        import torch

        # a row is all finite iff its max and min are (NaN propagates through both); 20x faster on CPU than
        # isfinite(logits).all(-1) over a [rows, vocab] tensor (2.1 ms for 8 x 49152 here)
        finite = (torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))).tolist()
        good = [i for i, ok in enumerate(finite) if ok]
        for i, ok in enumerate(finite):
            if not ok:
                rows[i].error = GenerationFailed(
                    f"{_what(rows[i])} produced non-finite logits (NaN or infinity); this request failed, "
                    f"the others in its batch went on")
        out: list[int | None] = [None] * len(rows)
        if not good:
            return out
        # ignore_eos / min_tokens: end-of-sequence cannot be picked (after the finite check: it sets -inf)
        no_eos = [i for i in good if rows[i].params.ignore_eos or len(rows[i].generated) < rows[i].params.min_tokens]
        logits = suppress_eos(logits, no_eos, self._eos_list)
        try:
            picked = sample(logits if len(good) == len(rows) else logits[good], [rows[i].params for i in good],
                            [rows[i].generator for i in good])
            for i, tok in zip(good, picked):
                out[i] = tok
        except Exception:  # find the row that broke it; the rest still get their token
            for i in good:
                try:
                    out[i] = sample(logits[i:i + 1], [rows[i].params], [rows[i].generator])[0]
                except Exception as exc:
                    rows[i].error = GenerationFailed(f"{_what(rows[i])}: sampling failed: {type(exc).__name__}: {exc}")
        return out

    def _accept(self, seq: Sequence, token: int) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self.metrics.observe("time_to_first_token_seconds", seq.first_token_at - seq.created, seq.target.label)
        seq.generated.append(token)
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
            delta, ids = seq.stream.flush(), []
        else:
            with self.tok_lock:
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
        keep = [i for i, s in enumerate(self._active)
                if s.finish_reason is None and not s.cancelled and s.error is None]
        if len(keep) == len(self._active):
            return
        for i, s in enumerate(self._active):
            if i not in keep:
                self._release(s)
                if s.error is not None:
                    self._finish_error(s, s.error)
                elif s.finish_reason is None:
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


def _what(seq: Sequence) -> str:
    """'adapter NAME@VERSION' or 'base model NAME': who a failing row belongs to."""
    return f"adapter {seq.target.label}" if seq.target.row is not None else f"base model {seq.target.label}"


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
