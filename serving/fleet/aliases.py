"""The gateway's name table: mutable names (NAME, NAME@ALIAS) -> immutable NAME@V, with time bounds.

Replicas only ever see ``NAME@V`` (or a base name), so nothing they cache can go stale::

    request model          table                                      forwarded model
    pirate@3           ->  immutable: no registry call            ->  pirate@3
    pirate@production  ->  younger than ttl_s: held answer        ->  pirate@5
                           older: ask the registry (adapters.resolve)
                           registry down: held answer while younger
                           than max_stale_s (marked stale), else 503
    pirate             ->  the latest version, same rules
    smollm2-135m-...   ->  not an adapter name: passed through (re-asked every ttl_s)

An alias move therefore reaches every request that starts more than ``ttl_s`` after the
move (plus one registry round trip). Plain Python: the registry call is injected.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from loradex.hub.errors import InvalidName, NotFound
from loradex.hub.names import parse_ref
from loradex.serving.errors import ModelNotFound
from loradex.serving.fleet.errors import RegistryUnavailable

# ref -> "NAME@V"; None when the registry has no adapter of that name (a base model, say)
Lookup = Callable[[str], Awaitable["str | None"]]


@dataclass(frozen=True)
class Resolution:
    """What the gateway forwards for one requested model."""

    model: str                  # the model field sent to the backend
    adapter: str | None         # NAME@V when the request names an adapter
    how: str                    # "immutable" | "passthrough" | "fresh" | "held" | "stale"
    age_s: float = 0.0          # age of the registry answer used


@dataclass
class _Entry:
    target: str | None
    at: float


class AliasTable:
    """Resolves requested model names with a freshness bound (``ttl_s``) and an outage bound (``max_stale_s``)."""

    def __init__(self, lookup: Lookup, *, ttl_s: float, max_stale_s: float,
                 on_move: Callable[[str, str | None, str | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.lookup = lookup
        self.ttl_s = ttl_s
        self.max_stale_s = max_stale_s
        self.on_move = on_move
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.registry_ok = True

    async def resolve(self, model: str) -> Resolution:
        try:
            ref = parse_ref(model)
        except InvalidName:
            return Resolution(model, None, "passthrough")  # not a loradex name (e.g. "org/model"): a base
        if ref.version is not None:
            label = f"{ref.name}@{ref.version}"
            return Resolution(label, label, "immutable")
        key = str(ref)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one registry call per name at a time, however many requests wait on it
            entry = self._entries.get(key)
            now = self.clock()
            if entry is not None and now - entry.at < self.ttl_s:
                return self._answer(model, entry, "held", now)
            try:
                target = await self.lookup(key)
            except NotFound as exc:
                if ref.alias is None:
                    target = None
                else:
                    self._store(key, entry, None, now)
                    raise ModelNotFound(str(exc)) from None
            except RegistryUnavailable as exc:
                self.registry_ok = False
                if entry is not None and now - entry.at <= self.max_stale_s:
                    return self._answer(model, entry, "stale", now)
                raise RegistryUnavailable(
                    f"{exc}; no resolution of {key!r} younger than {self.max_stale_s:g}s is held") from None
            self.registry_ok = True
            new = self._store(key, entry, target, now)
            return self._answer(model, new, "fresh", now)

    def _store(self, key: str, old: _Entry | None, target: str | None, now: float) -> _Entry:
        if old is not None and old.target != target and self.on_move is not None:
            self.on_move(key, old.target, target)
        entry = self._entries[key] = _Entry(target, now)
        return entry

    @staticmethod
    def _answer(model: str, entry: _Entry, how: str, now: float) -> Resolution:
        if entry.target is None:
            return Resolution(model, None, "passthrough", now - entry.at)
        return Resolution(entry.target, entry.target, how, now - entry.at)

    def snapshot(self) -> dict[str, dict]:
        """Held resolutions with their age (for ``GET /v1/gateway``)."""
        now = self.clock()
        return {k: {"target": e.target, "age_s": round(now - e.at, 3), "stale": now - e.at >= self.ttl_s}
                for k, e in sorted(self._entries.items())}
