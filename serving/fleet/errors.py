"""The fleet's exceptions; ``serving.errors.to_http`` turns them into OpenAI-shaped answers by class."""
from __future__ import annotations

from loradex.hub.errors import LoradexError
from loradex.serving.errors import NotReady


class Refused(LoradexError):
    """The registry's adapter version cannot be served by this replica (base, vLLM rules, rank)."""

    exit_code = 4


class RegistryUnavailable(NotReady):
    """The registry did not answer and no resolution younger than the stale bound is held (503)."""

    code = "registry_unavailable"


class NoBackend(NotReady):
    """No healthy backend is left to send the request to (503)."""

    code = "no_backend"
