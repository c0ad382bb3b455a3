"""The gateway's replicas: health, load, and which adapters each one already holds.

Routing (``Pool.pick``), for a request whose adapter is ``NAME@V`` (or a base name)::

    healthy backends, not yet tried for this request
      -> any that already served NAME@V?  the least loaded of them ("affinity"),
         unless it has more than max_skew requests in flight over the least loaded
         backend overall ("spill": one hot adapter may use several replicas)
      -> otherwise the least loaded; ties go to the one holding fewest adapters ("new")

A backend is marked down by a failed health check or a failed connection, forgets what it
held (a restarted replica starts empty) and is offered again once ``/health`` answers.
Plain Python; the HTTP calls live in ``gateway_app.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loradex.serving.fleet.errors import NoBackend


@dataclass
class Backend:
    """One replica behind the gateway."""

    url: str
    healthy: bool = False             # unknown until the first health check answers
    kind: str = "unknown"             # "loradex" | "vllm", probed at the first good health check
    in_flight: int = 0
    served: set[str] = field(default_factory=set)   # adapters (NAME@V) it answered successfully
    last_error: str | None = None

    def view(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "kind": self.kind, "in_flight": self.in_flight,
                "adapters": sorted(self.served), "last_error": self.last_error}


class Pool:
    """The backends and the routing rule."""

    def __init__(self, urls: list[str], *, max_skew: int):
        self.backends = [Backend(u.rstrip("/")) for u in urls]
        self.max_skew = max_skew

    def pick(self, key: str | None, exclude: set[str] = frozenset()) -> tuple[Backend, str]:
        live = [b for b in self.backends if b.healthy and b.url not in exclude]
        if not live:
            down = ", ".join(f"{b.url} ({b.last_error or 'down'})" for b in self.backends if b.url not in exclude)
            raise NoBackend("no healthy backend" + (f": {down}" if down else " left to try"), retry_after=2)
        order = {b.url: i for i, b in enumerate(self.backends)}
        least = min(live, key=lambda b: (b.in_flight, len(b.served), order[b.url]))
        if key is not None:
            holders = [b for b in live if key in b.served]
            if holders:
                best = min(holders, key=lambda b: (b.in_flight, order[b.url]))
                if best.in_flight - least.in_flight <= self.max_skew:
                    return best, "affinity"
                return least, "spill"
        return least, "new"

    def mark_up(self, backend: Backend, kind: str | None = None) -> bool:
        """Record a good health check; True when the backend just came back."""
        came_back = not backend.healthy
        backend.healthy, backend.last_error = True, None
        if kind:
            backend.kind = kind
        return came_back

    def mark_down(self, backend: Backend, reason: str) -> bool:
        """Record a failure; True when the backend was healthy until now."""
        was = backend.healthy
        backend.healthy, backend.last_error = False, reason
        backend.served.clear()
        return was
