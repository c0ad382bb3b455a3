"""Domain exceptions for loradex.

Raised inside the library; translated only at the edges: the CLI prints one
line and exits non-zero, the HTTP layer maps each class to a status code and an
OpenAI-shaped error body (see ``serving/errors.py``).
"""
from __future__ import annotations


class LoradexError(Exception):
    """Base class of every error loradex reports to a user."""

    exit_code = 1


class NotFound(LoradexError):
    """A named base model, adapter, version, alias or run does not exist."""

    exit_code = 3


class InvalidName(LoradexError):
    """A name or reference does not match the allowed pattern."""

    exit_code = 2


class InvalidAdapter(LoradexError):
    """An adapter folder fails validation; nothing was written."""

    exit_code = 4


class InvalidBase(LoradexError):
    """A base model cannot be added or loaded."""

    exit_code = 4


class InvalidData(LoradexError):
    """A data set (JSONL, CSV sheet) has a bad row; names file and line."""

    exit_code = 2


class InvalidConfig(LoradexError):
    """A configuration value is out of range; names the flag or field."""

    exit_code = 2


class Conflict(LoradexError):
    """The operation contradicts catalog state (alias in use, duplicate name)."""

    exit_code = 5


class GateRefused(LoradexError):
    """Promotion to an alias was refused by the evaluation gate."""

    exit_code = 6


class CatalogLocked(LoradexError):
    """The catalog file is held read-write by another process."""

    exit_code = 7
    holder: dict = {}  # {"pid", "role", "url"} of the holder, when known


class IntegrityError(LoradexError):
    """Stored bytes no longer match their recorded sha256."""

    exit_code = 8


class MissingDependency(LoradexError):
    """An optional package or the default base package is not installed."""

    exit_code = 9


class CheckFailed(LoradexError):
    """An automatic check (merge agreement, export run) failed; has the numbers."""

    exit_code = 10


class RemoteUnsupported(LoradexError):
    """An operation needs the catalog file itself, but a server owns it."""

    exit_code = 7


class JobFailed(LoradexError):
    """A background job (merge, export, eval) run by the server failed; has its error."""

    exit_code = 10
