"""Request and response models of the hub API (``/v1/bases``, ``/v1/adapters``, ``/v1/jobs`` ...).

The OpenAI-compatible models are in ``serving/protocol.py``; these describe the
registry side. Rows from the catalog carry more fields than listed here: the
models name what a client can rely on and allow the rest.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow")


class BaseRow(_Row):
    name: str
    kind: Optional[str] = None
    source: Optional[str] = None
    architecture: Optional[str] = None
    num_parameters: Optional[int] = None
    size_bytes: Optional[int] = None
    path: Optional[str] = None
    created_at: Optional[datetime] = None


class AddBaseRequest(BaseModel):
    name: str = Field(description="name to register the base under")
    source: str = Field(description="PATH (on the server's machine), an HF id already cached there, or gguf:PATH")


class AdapterVersion(_Row):
    adapter: str
    version: int
    base: str
    rank: Optional[int] = None
    alpha: Optional[float] = None
    target_modules: list[str] = []
    digest: str
    size_bytes: Optional[int] = None
    aliases: Optional[list[str]] = None
    created_at: Optional[datetime] = None


class AdapterDetail(BaseModel):
    adapter: str
    aliases: dict[str, int]
    versions: list[dict[str, Any]]


class SetAliasRequest(BaseModel):
    version: int = Field(description="the version the alias points at")
    force: bool = Field(False, description="override the promotion gate (needs a reason; recorded)")
    reason: Optional[str] = Field(None, description="why the gate is overridden; required with force")
    actor: Optional[str] = Field(None, description="who moves it (default: the caller's address)")


class AliasMove(_Row):
    adapter: str
    alias: str
    version: int
    forced: bool
    gate: Optional[dict] = None
    reason: Optional[str] = None
    actor: Optional[str] = None


class VerifyResult(BaseModel):
    adapter: str
    version: int
    ok: bool
    problems: list[str]


class RecordEvalRequest(BaseModel):
    run: dict[str, Any] = Field(description="the eval_runs row to store (as `evals.run.evaluate` builds it)")
    samples: list[dict[str, Any]] = Field(description="per-item rows: idx, prompt, reference, output, scores ...")


class ReviewExportRequest(BaseModel):
    ref: str
    out: str = Field(description="CSV path on the server's machine")
    n: int = 50
    seed: Optional[int] = None


class ReviewImportRequest(BaseModel):
    sheet: str = Field(description="filled CSV path on the server's machine")


class JobRequest(BaseModel):
    kind: str = Field(description="merge | export | eval")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the job's fields (see serving/jobs.py: MergeJob, ExportJob, EvalJob)")


class Job(_Row):
    id: int
    kind: str
    params: dict[str, Any]
    state: str
    progress: Optional[dict] = None
    result: Optional[Any] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    created_at: Optional[datetime] = None
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
