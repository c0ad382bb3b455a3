"""Long operations a server runs for its clients: merge, export and eval, as jobs.

``POST /v1/jobs`` records a ``queued`` row and returns its id at once; one
worker thread per server runs jobs in order, beside (never inside) the request
path, so serving goes on while a job loads its own model. Each job is recorded
by the same library functions the CLI uses (``merge_adapter``,
``export_adapter``, ``evaluate``), so its result is the same row either way.

    queued --(worker)--> running --> succeeded (result)
                                 \\-> failed (error, error_type)

A job left unfinished by a stopped server is marked failed on the next start
(``hub.jobs.fail_unfinished``). No FastAPI here: the routes are in
``serving/hub_routes.py``.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from loradex.hub import jobs as records
from loradex.hub.catalog import utcnow
from loradex.hub.errors import InvalidConfig, LoradexError

log = logging.getLogger("loradex.jobs")


@dataclass
class MergeJob:
    """Merge an adapter version into its base (``loradex merge``)."""

    ref: str
    dtype: str = "fp32"
    name: str | None = None
    probes: int = 4
    check_tokens: int = 16
    min_agreement: float = 0.90
    device: str = "auto"


@dataclass
class ExportJob:
    """Export an adapter version (``loradex export``); ``out`` is a folder on the server's machine."""

    ref: str
    format: str
    out: str
    quant: str | None = None
    dtype: str | None = None
    gguf_pre: str | None = None
    as_adapter: bool = False
    run_check: bool = True
    check_tokens: int = 16
    min_agreement: float = 0.90
    force: bool = False


@dataclass
class EvalJob:
    """Evaluate a registered adapter on a data file the server can read (``loradex eval``)."""

    ref: str
    data: str
    metrics: list[str] = field(default_factory=lambda: ["similarity"])
    max_new_tokens: int = 64
    limit: int | None = None
    batch_size: int = 8
    seed: int = 0
    quantize: str | None = None


def _merge(ctx: "JobRunner", job: MergeJob, progress: Callable[[str], None]) -> dict:
    from loradex.promote.merge import MergeConfig, merge_adapter

    progress("merging")
    config = MergeConfig(dtype=job.dtype, name=job.name, probes=job.probes, max_new_tokens=job.check_tokens,
                         min_agreement=job.min_agreement, device=job.device)
    return merge_adapter(ctx.catalog, ctx.store, job.ref, config, ctx.settings)


def _export(ctx: "JobRunner", job: ExportJob, progress: Callable[[str], None]) -> dict:
    from loradex.promote.export.run import export_adapter
    from loradex.promote.export.source import ExportOptions

    progress("exporting")
    options = ExportOptions(format=job.format, quant=job.quant, dtype=job.dtype, pre=job.gguf_pre,
                            as_adapter=job.as_adapter, run_check=job.run_check, check_tokens=job.check_tokens,
                            min_agreement=job.min_agreement, force=job.force)
    return export_adapter(ctx.catalog, ctx.store, job.ref, Path(job.out), options, ctx.settings)


def _eval(ctx: "JobRunner", job: EvalJob, progress: Callable[[str], None]) -> dict:
    from loradex.evals.run import evaluate

    progress("evaluating")
    return evaluate(ctx.catalog, ctx.store, job.ref, job.data, metrics=job.metrics,
                    max_new_tokens=job.max_new_tokens, limit=job.limit, batch_size=job.batch_size, seed=job.seed,
                    settings=ctx.settings, quantize=job.quantize)


KINDS: dict[str, tuple[type, Callable]] = {"merge": (MergeJob, _merge), "export": (ExportJob, _export),
                                           "eval": (EvalJob, _eval)}


def parse(kind: str, params: dict) -> Any:
    """The typed job of ``kind`` from JSON params; unknown kinds or fields are an InvalidConfig naming them."""
    if kind not in KINDS:
        raise InvalidConfig(f"job kind must be one of {', '.join(KINDS)}, got {kind!r}")
    cls = KINDS[kind][0]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise InvalidConfig(f"{kind} job: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    missing = sorted(f.name for f in fields(cls)
                     if f.name not in params and f.default is MISSING and f.default_factory is MISSING)
    if missing:
        raise InvalidConfig(f"{kind} job: missing field(s) {', '.join(missing)}")
    return cls(**params)


class JobRunner:
    """Runs jobs one at a time on a worker thread, recording every state change."""

    def __init__(self, catalog, store, settings):
        self.catalog = catalog
        self.store = store
        self.settings = settings
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="loradex-jobs", daemon=True)

    def start(self) -> int:
        """Fail what a previous server left unfinished, then start the worker; returns jobs failed."""
        failed = records.fail_unfinished(self.catalog)
        self._thread.start()
        return failed

    def stop(self) -> None:
        self._queue.put(None)

    def submit(self, kind: str, params: dict, actor: str | None = None) -> dict:
        job = parse(kind, params)
        row = records.create(self.catalog, kind, asdict(job), actor)
        self._queue.put(row["id"])
        return row

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            self.run_one(job_id)

    def run_one(self, job_id: int) -> None:
        row = records.get_job(self.catalog, job_id)
        cls, fn = KINDS[row["kind"]]
        records.update(self.catalog, job_id, state="running", started_at=utcnow(), progress={"phase": "running"})

        def progress(phase: str) -> None:
            records.update(self.catalog, job_id, progress={"phase": phase})

        try:
            result = fn(self, cls(**row["params"]), progress)
        except BaseException as exc:  # recorded, never raised: the worker must survive a failed job
            message = str(exc) if isinstance(exc, LoradexError) else f"{type(exc).__name__}: {exc}"
            log.warning("job %s (%s) failed: %s", job_id, row["kind"], message)
            records.update(self.catalog, job_id, state="failed", error=message, error_type=type(exc).__name__,
                           finished_at=utcnow(), progress={"phase": "failed"})
            if not isinstance(exc, Exception):
                raise
            return
        from loradex.hub.render import to_jsonable

        records.update(self.catalog, job_id, state="succeeded", result=to_jsonable(result), finished_at=utcnow(),
                       progress={"phase": "done"})
