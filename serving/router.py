"""The router: which model and adapter serve a request's ``model``/``adapter`` name.

Plain Python. The catalog is read on every request, so a new version, a moved
alias or a new merge applies to the very next request::

    "smollm2-135m-instruct"          -> base     (the served base, no adapter)
    "support-bot", "support-bot@3",  -> adapter  (that version on the shared base)
    "support-bot@production"
        with --route-merged and a merge of that version made from the served base
                                     -> merged   (the merged model, served bare)

Promote-in-place: ``loradex merge`` registers a merged model twice, as a base
(``bases.kind = 'merged'``) and as a ``merges`` row linking it to the adapter
version it came from. With ``loradex serve --route-merged`` a request for that
version goes to the merged model (no LoRA work per token), loaded on first use
as a second engine (at most ``--max-merged``; beyond that, requests are served
as adapters). Only merges made from the served base qualify, so the answer is
the same model.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from loradex.hub.errors import InvalidName, NotFound
from loradex.hub.names import parse_ref
from loradex.serving.cache import ref_label
from loradex.serving.config import EngineConfig
from loradex.serving.errors import ModelNotFound


@dataclass
class Target:
    """What a request runs on: an engine, and an adapter version row or None for the bare model."""

    engine: Any              # serving.engine.Engine
    row: dict | None
    path: str                # base | adapter | merged
    model: str               # the name echoed back to the client
    served_as: str | None = None  # NAME@V an adapter's merged model stands for (path "merged")

    @property
    def label(self) -> str:
        if self.served_as is not None:
            return self.served_as
        return ref_label(self.row) if self.row is not None else self.engine.base_name


class Router:
    """Resolves names against the catalog for one engine, and owns the merged-model engines it opened.

    ``open_merged(config)`` loads a merged base as an engine (``Engine.load``);
    the router shuts those engines down with :meth:`shutdown`.
    """

    def __init__(self, engine, *, catalog, config: EngineConfig, open_merged: Callable[[EngineConfig], Any]):
        self.engine = engine
        self.catalog = catalog
        self.config = config  # read per request: --route-merged may be switched on a live engine
        self._open_merged = open_merged
        self._merged: dict[str, Any] = {}
        self._merged_lock = threading.Lock()

    def resolve(self, model: str | None = None, adapter: str | None = None) -> Target:
        """Which engine and adapter serve a request; ``adapter`` wins over ``model``.

        ``model`` may be the base's name (no adapter), ``NAME``, ``NAME@VERSION`` or
        ``NAME@ALIAS``.
        """
        base_name = self.engine.base_name
        ref = adapter if adapter else model
        field_name = "adapter" if adapter else "model"
        if ref is None or ref == "" or ref == base_name:
            return Target(self.engine, None, "base", base_name)
        from loradex.hub.registry import resolve as resolve_ref

        try:
            row = resolve_ref(self.catalog, parse_ref(ref))
        except (InvalidName, NotFound):
            err = ModelNotFound(f"model {ref!r} not found: not the base ({base_name}) nor a registered adapter; "
                                f"GET /v1/models lists what this server serves")
            err.param = field_name
            raise err from None
        if row["base"] != base_name:
            err = ModelNotFound(f"adapter {row['adapter']}@{row['version']} is for base {row['base']!r}, "
                                f"but this server serves {base_name!r}")
            err.param = field_name
            raise err
        if self.config.route_merged:
            merged = self.merged_engine(row)
            if merged is not None:
                return Target(merged, None, "merged", ref, served_as=ref_label(row))
        return Target(self.engine, row, "adapter", ref)

    def merged_engine(self, row: dict):
        """The engine of the merged model that stands for version ``row``, opened on first use; None if none."""
        name = merged_base_for(self.catalog, row, self.engine.base_name)
        if name is None:
            return None
        with self._merged_lock:
            eng = self._merged.get(name)
            if eng is None:
                if len(self._merged) >= self.config.max_merged:
                    return None
                cfg = replace(self.config, base=name, route_merged=False, pin=[], max_loaded=1)
                eng = self._open_merged(cfg)
                self._merged[name] = eng
            return eng

    def merged_names(self) -> list[str]:
        """Merged models loaded so far."""
        with self._merged_lock:
            return sorted(self._merged)

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Shut down the merged-model engines (each drains for up to ``drain_s``)."""
        with self._merged_lock:
            merged = list(self._merged.values())
            self._merged.clear()
        for eng in merged:
            eng.shutdown(drain_s)


def merged_base_for(catalog, row: dict, served_base: str) -> str | None:
    """Name of the newest merged base built from version ``row`` on ``served_base``, if its folder is here."""
    from loradex.hub.queries import merged_base

    found = merged_base(catalog, row["id"], served_base)
    if found is None or not Path(found["path"]).is_dir():
        return None
    return found["base_name"]
