"""Where loradex keeps its files, resolved once per process from the environment.

``LORADEX_HOME`` (default ``./.loradex``) holds the DuckDB catalog.
``LORADEX_STORE`` holds the content-addressed artifact store; it defaults to
``./adapters`` when ``LORADEX_HOME`` is unset and to ``$LORADEX_HOME/adapters``
otherwise, so that pointing ``LORADEX_HOME`` elsewhere moves everything.
``LORADEX_THREADS`` sets torch's intra-op thread count (default 1: on the
2-core machines this project targets, two threads beside any other busy
process ran 3-10x slower than one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loradex.hub.errors import InvalidConfig


def _default_store(env: dict) -> Path:
    if env.get("LORADEX_STORE"):
        return Path(env["LORADEX_STORE"])
    if env.get("LORADEX_HOME"):
        return Path(env["LORADEX_HOME"]) / "adapters"
    return Path("adapters")


@dataclass
class Settings:
    """Resolved locations and process-wide knobs."""

    home: Path = field(default_factory=lambda: Path(os.environ.get("LORADEX_HOME", ".loradex")))
    """Folder holding ``catalog.duckdb`` (env ``LORADEX_HOME``)."""
    store: Path = field(default_factory=lambda: _default_store(os.environ))
    """Content-addressed artifact store (env ``LORADEX_STORE``)."""
    threads: int = field(default_factory=lambda: int(os.environ.get("LORADEX_THREADS", "1") or 1))
    """torch intra-op threads (env ``LORADEX_THREADS``)."""
    lock_wait_s: float = field(default_factory=lambda: float(os.environ.get("LORADEX_LOCK_WAIT", "60")))
    """How long a short command waits for another short command's catalog lock."""

    def __post_init__(self) -> None:
        self.home = Path(self.home).absolute()
        self.store = Path(self.store).absolute()
        if self.threads < 1:
            raise InvalidConfig(f"LORADEX_THREADS must be >= 1, got {self.threads}")
        if self.lock_wait_s < 0:
            raise InvalidConfig(f"LORADEX_LOCK_WAIT must be >= 0, got {self.lock_wait_s}")

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.duckdb"


def apply_threads(threads: int) -> None:
    """Set torch's thread count (imports torch lazily)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
