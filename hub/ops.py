"""Catalog operations that work the same in-process and through a running server.

DuckDB lets one process hold the catalog file. While ``loradex serve`` owns it,
other processes (the CLI, a training or eval job, a serving replica) reach the
catalog through the server's HTTP API instead. The library functions that read
or write the catalog are marked with ``@op("NAME")``::

    @op("adapters.resolve")
    def resolve(catalog, ref): ...

    resolve(Catalog.open(path), "pirate@1")     # runs here, on the file
    resolve(RemoteCatalog(url), "pirate@1")     # POST {url}/v1/ops/adapters.resolve {"ref": "pirate@1"}
                                                # -> the server runs the same function on its catalog

A call is one whole function on the server, so its transaction is the
server's. Arguments and results travel as JSON, typed by the function's
annotations (pydantic rebuilds dataclasses, paths and tuples); a ``store``
parameter is not sent: the server passes its own store. Errors keep their class
(``GateRefused`` stays ``GateRefused``, with its exit code), so a command prints
the same line whether it ran here or through the server.

The server publishes every op as ``POST /v1/ops/NAME`` with a body model built
from the signature, so each one is documented in its OpenAPI schema
(``serving/hub_routes.py``). ``OP_MODULES`` lists the modules that define ops;
the server imports them all.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

OP_MODULES = (
    "loradex.hub.bases",
    "loradex.hub.registry",
    "loradex.hub.queries",
    "loradex.hub.jobs",
    "loradex.training.records",
    "loradex.evals.record",
    "loradex.evals.review",
    "loradex.evals.judge",
    "loradex.evals.leaderboard",
    "loradex.evals.gate",
    "loradex.promote.merge",
    "loradex.promote.export.run",
)

SKIPPED = ("catalog", "store")  # never sent: the server supplies its own


@dataclass
class Op:
    """One catalog operation: its name, function, and whether it writes."""

    name: str
    fn: Callable
    write: bool
    doc: str = ""
    _hints: dict | None = field(default=None, repr=False)

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @property
    def hints(self) -> dict:
        if self._hints is None:
            try:
                self._hints = typing.get_type_hints(self.fn)
            except Exception:  # an annotation that cannot be resolved: send it as plain JSON
                self._hints = {}
        return self._hints

    def params(self) -> list[inspect.Parameter]:
        return [p for p in self.signature.parameters.values()
                if p.name not in SKIPPED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def takes_extra(self) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in self.signature.parameters.values())

    def takes_store(self) -> bool:
        return "store" in self.signature.parameters

    # -- JSON in and out -----------------------------------------------------------
    def dump_args(self, args: tuple, kwargs: dict) -> dict:
        bound = self.signature.bind(None, *args, **kwargs)  # None stands for the catalog
        out = {}
        for name, value in bound.arguments.items():
            param = self.signature.parameters[name]
            if name in SKIPPED:
                continue
            if param.kind is param.VAR_KEYWORD:
                out.update({k: dump(v) for k, v in value.items()})
            else:
                out[name] = dump(value, self.hints.get(name))
        return out

    def load_args(self, payload: dict) -> dict:
        known = {p.name: p for p in self.params()}
        unknown = [k for k in payload if k not in known]
        if unknown and not self.takes_extra():
            from loradex.hub.errors import InvalidConfig

            raise InvalidConfig(f"{self.name}: unknown argument(s) {', '.join(sorted(unknown))}")
        return {k: load(v, self.hints.get(k)) for k, v in payload.items()}

    def dump_result(self, value: Any) -> Any:
        return dump(value, self.hints.get("return"))

    def load_result(self, value: Any) -> Any:
        return load(value, self.hints.get("return"))

    def call_local(self, catalog, store, kwargs: dict) -> Any:
        if self.takes_store():
            kwargs = dict(kwargs, store=store)
        return self.fn(catalog, **kwargs)


OPS: dict[str, Op] = {}


def op(name: str, *, write: bool = False) -> Callable[[Callable], Callable]:
    """Mark a function whose first parameter is the catalog as an operation named ``name``."""

    def mark(fn: Callable) -> Callable:
        first = next(iter(inspect.signature(fn).parameters), None)
        if first != "catalog":
            raise TypeError(f"@op({name!r}): {fn.__qualname__} must take the catalog as its first parameter")
        entry = Op(name, fn, write, inspect.getdoc(fn) or "")
        OPS[name] = entry

        @functools.wraps(fn)
        def call(catalog, *args, **kwargs):
            remote = getattr(catalog, "call_op", None)
            if remote is not None:
                return entry.load_result(remote(name, entry.dump_args(args, kwargs), write=write))
            return fn(catalog, *args, **kwargs)

        call.op = entry
        return call

    return mark


def load_all() -> dict[str, Op]:
    """Import every module that defines ops; return the table."""
    import importlib

    for mod in OP_MODULES:
        importlib.import_module(mod)
    return OPS


# -- JSON conversion -------------------------------------------------------------------

_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?Z?$")


def dump(value: Any, hint: Any = None) -> Any:
    """A JSON-ready copy of ``value`` (dataclasses, paths, datetimes, tuples, numpy scalars)."""
    from loradex.hub.render import to_jsonable

    if hint is not None and hint is not Any:
        try:
            from pydantic import TypeAdapter

            # python mode, then to_jsonable: timestamps get the one wire form (RFC 3339, UTC "Z") either way
            return to_jsonable(TypeAdapter(hint).dump_python(value, mode="python"))
        except Exception:
            pass
    return to_jsonable(value)


def load(value: Any, hint: Any = None) -> Any:
    """Rebuild a value from JSON: timestamps in ``*_at`` fields become datetimes, then the hint applies."""
    value = revive(value)
    if hint is None or hint is Any:
        return value
    try:
        from pydantic import TypeAdapter

        return TypeAdapter(hint).validate_python(value)
    except Exception:
        return value


def revive(value: Any) -> Any:
    """Datetimes back from ISO strings in keys named ``*_at`` (catalog timestamp columns)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, str) and k.endswith("_at") and isinstance(v, str) and _ISO.match(v):
                out[k] = datetime.fromisoformat(v.removesuffix("Z"))  # the catalog's naive UTC
            else:
                out[k] = revive(v)
        return out
    if isinstance(value, list):
        return [revive(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """The wire form of a JSON-ready value (NaN allowed: both ends are loradex)."""
    return json.dumps(value).encode()
