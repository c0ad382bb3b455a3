"""Serving's own exceptions, and the one table mapping exceptions to HTTP answers.

The engine raises these (and hub's domain exceptions); only the HTTP edge
(``serving/routes.py``) turns them into a status code and OpenAI's error shape::

    {"error": {"message": "...", "type": "...", "param": "model", "code": "model_not_found"}}

The mapping is by exception class, never by message text. This module imports
no web framework, so the engine can use its exceptions.
"""
from __future__ import annotations

from loradex.hub.errors import (
    CatalogLocked,
    Conflict,
    GateRefused,
    IntegrityError,
    InvalidAdapter,
    InvalidBase,
    InvalidConfig,
    InvalidData,
    InvalidName,
    JobFailed,
    LoradexError,
    MissingDependency,
    NotFound,
    RemoteUnsupported,
)


class ModelNotFound(NotFound):
    """The requested model (base or adapter) is not served here."""

    param = "model"
    code = "model_not_found"


class BadRequest(InvalidConfig):
    """A request field is out of range or unsupported; ``param`` names it."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ContextTooLong(BadRequest):
    """Prompt tokens plus max_tokens exceed the model's context window."""


class QueueFull(LoradexError):
    """Too many requests are waiting; retry after ``retry_after`` seconds."""

    exit_code = 11

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(LoradexError):
    """The engine is still loading the base model, or is shutting down."""

    exit_code = 11

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(LoradexError):
    """The request was cancelled (client gone or server shutting down)."""


class AdapterLoadFailed(LoradexError):
    """An adapter could not be loaded for serving; only its requests fail."""

    exit_code = 4


class GenerationFailed(LoradexError):
    """The forward pass failed for the rows of a batch (e.g. out of memory)."""


class Unauthorized(LoradexError):
    """Missing or wrong API key."""

    exit_code = 2


class PathNotAllowed(LoradexError):
    """A server-side path outside the folders the operator allowed (--allow-path-register)."""

    exit_code = 2


class PayloadTooLarge(LoradexError):
    """The request body exceeds the configured limit."""

    exit_code = 2


# (class, status, type, default code), most specific first.
_TABLE: list[tuple[type, int, str, str | None]] = [
    (Unauthorized, 401, "invalid_request_error", "invalid_api_key"),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (ContextTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (BadRequest, 400, "invalid_request_error", None),
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (PathNotAllowed, 403, "invalid_request_error", "path_not_allowed"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (NotReady, 503, "server_error", "not_ready"),
    (Cancelled, 503, "server_error", "cancelled"),
    (NotFound, 404, "not_found_error", "not_found"),
    (InvalidName, 400, "invalid_request_error", "invalid_name"),
    (InvalidAdapter, 400, "invalid_request_error", "invalid_adapter"),
    (InvalidData, 400, "invalid_request_error", "invalid_data"),
    (InvalidConfig, 400, "invalid_request_error", None),
    (Conflict, 409, "invalid_request_error", "conflict"),
    (GateRefused, 409, "invalid_request_error", "gate_refused"),
    (RemoteUnsupported, 400, "invalid_request_error", "needs_catalog_file"),
    (JobFailed, 500, "server_error", "job_failed"),
    (IntegrityError, 500, "server_error", "adapter_integrity"),
    (AdapterLoadFailed, 500, "server_error", "adapter_load_failed"),
    (GenerationFailed, 500, "server_error", "generation_failed"),
    (InvalidBase, 400, "invalid_request_error", "invalid_base"),  # a base source or architecture a request names
    (CatalogLocked, 503, "server_error", "catalog_locked"),
    (MissingDependency, 500, "server_error", "missing_dependency"),
    (LoradexError, 500, "server_error", None),
]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def to_http(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, OpenAI-shaped body, headers) for an exception."""
    for cls, status, type_, code in _TABLE:
        if isinstance(exc, cls):
            # the class travels too, so a loradex client re-raises the same error (same message, same exit code)
            headers = {"X-Loradex-Error": type(exc).__name__, "X-Loradex-Exit": str(getattr(exc, "exit_code", 1))}
            retry = getattr(exc, "retry_after", None)
            if retry is not None:
                headers["Retry-After"] = str(retry)
            return status, error_body(str(exc), type_, getattr(exc, "param", None),
                                      getattr(exc, "code", None) or code), headers
    return 500, error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal_error"), {}
