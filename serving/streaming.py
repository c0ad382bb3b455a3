"""One HTTP request's generations on the engine, collected whole or streamed as server-sent events.

A request of the OpenAI routes can ask for several sequences (prompts x ``n``);
:class:`Run` submits them together, so they share batches, and merges their
engine events on one asyncio queue. :func:`sse_response` streams them as
``data: {...}`` lines ending in ``data: [DONE]``. A client that goes away
cancels its sequences, which frees their batch rows: while queued, while a
non-streamed answer is being collected, and mid-stream.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from loradex.serving.errors import Cancelled, to_http

DISCONNECT_POLL_S = 1.0


class Run:
    """Several sequences (prompts x n) of one request, their events merged on one queue."""

    def __init__(self, jobs: list[list[int]]):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []
        self.jobs = jobs
        self.pending: list = []  # events read ahead while checking for an early error

    @classmethod
    async def start(cls, eng, target, jobs: list[list[int]], params: list, request: Request | None = None) -> "Run":
        """Submit every sequence and wait for the first event; a client that leaves while queued cancels them."""
        run = cls(jobs)
        loop = asyncio.get_running_loop()
        for i, (ids, p) in enumerate(zip(jobs, params)):
            def sink(ev, i=i):
                try:
                    loop.call_soon_threadsafe(run.queue.put_nowait, (i, ev))
                except RuntimeError:
                    pass
            try:
                run.handles.append(eng.submit(ids, target, p, sink))
            except BaseException:
                run.cancel()
                raise
        # Wait for the first event, so that a failure to start (bad adapter file) is an HTTP error, not a stream.
        while True:
            try:
                first = await asyncio.wait_for(run.queue.get(), DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:  # still queued: is anybody waiting for it?
                if request is not None and await request.is_disconnected():
                    run.cancel()
                    raise Cancelled("client disconnected while the request was queued") from None
            except BaseException:
                run.cancel()
                raise
        if first[1].error is not None:
            run.cancel()
            raise first[1].error
        run.pending.append(first)
        return run

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Any]]:
        done: set[int] = set()
        checked = time.monotonic()
        while len(done) < len(self.jobs):
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                # events arrive every step, so the timeout below never fires: look for a gone client anyway
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    raise Cancelled("client disconnected") from None
            if self.pending:
                item = self.pending.pop(0)
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.cancel()
                        raise Cancelled("client disconnected") from None
                    continue
            i, ev = item
            if ev.done:
                done.add(i)
            yield i, ev

    async def collect(self, request: Request) -> tuple[list[str], list[str], dict]:
        """Texts and finish reasons per sequence, and the request's usage."""
        texts = [""] * len(self.jobs)
        finishes = ["stop"] * len(self.jobs)
        completion = 0
        try:
            async for i, ev in self.events(request):
                if ev.error is not None:
                    raise ev.error
                texts[i] += ev.text
                if ev.finish_reason:
                    finishes[i] = ev.finish_reason
                    completion += ev.usage["completion_tokens"]
        finally:
            self.cancel()
        return texts, finishes, usage_of(self.jobs, completion)


def usage_of(jobs: list[list[int]], completion: int) -> dict:
    """OpenAI's usage block: each distinct prompt counted once, however many sequences it has."""
    prompt = sum(len(ids) for ids in _distinct(jobs))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _distinct(jobs: list[list[int]]) -> list[list[int]]:
    out, last = [], None
    for ids in jobs:  # n copies of a prompt are adjacent and are the same list object
        if ids is not last:
            out.append(ids)
        last = ids
    return out


def sse_response(request: Request, run: Run, to_chunks: Callable[[int, str, str | None], list[dict]],
                 usage_chunk: Callable[[dict], dict] | None) -> StreamingResponse:
    """Stream ``run`` as server-sent events: ``to_chunks(index, text, finish)`` shapes each event."""
    async def body():
        completion = 0
        try:
            async for i, ev in run.events(request):
                if ev.error is not None:
                    status, err, _ = to_http(ev.error)
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                if ev.finish_reason:
                    completion += ev.usage["completion_tokens"]
                for c in to_chunks(i, ev.text, ev.finish_reason):
                    yield f"data: {json.dumps(c)}\n\n"
            if usage_chunk is not None:
                yield f"data: {json.dumps(usage_chunk(usage_of(run.jobs, completion)))}\n\n"
            yield "data: [DONE]\n\n"
        except Cancelled:
            return
        finally:
            run.cancel()  # client gone or stream finished: free the batch slots

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
