"""The DuckDB catalog: one file, one read-write process at a time.

DuckDB lets a single process hold a database file read-write; a second process,
even read-only, fails with ``Could not set lock on file``. loradex designs for
that:

* short CLI commands open the catalog, work, and close it; when another short
  command holds it they wait (bounded by ``LORADEX_LOCK_WAIT``) and retry;
* a long-lived holder (``loradex serve``) writes ``catalog.duckdb.owner.json``
  beside the file, so a blocked command can say at once who holds it and what to
  do instead of waiting out its timeout;
* inside one process each thread gets its own cursor (DuckDB 2.x refuses a
  connection shared across threads).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from loradex.hub import migrations
from loradex.hub.errors import CatalogLocked

_LOCK_RE = re.compile(r"PID (\d+)")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Catalog:
    """A handle on the catalog database; build one per process (or per command)."""

    def __init__(self, conn, path: str, owner_file: Path | None = None):
        self._conn = conn
        self.path = path
        self._local = threading.local()
        self._owner_file = owner_file
        self._lock = threading.RLock()  # serialises version allocation within a process

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        wait_s: float = 60.0,
        role: str = "cli",
        url: str | None = None,
    ) -> "Catalog":
        """Open (creating and migrating) the catalog at ``path``.

        ``role="server"`` records this process as the long-lived owner so that
        other processes fail fast with a useful message.
        """
        import duckdb

        path = str(path)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            try:
                conn = duckdb.connect(path)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise
                holder = _holder(path, exc)
                if holder.get("role") == "server" or time.monotonic() >= deadline:
                    err = CatalogLocked(_locked_message(path, holder, wait_s))
                    err.holder = holder
                    raise err from None
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        owner_file = None
        if role == "server" and path != ":memory:":
            owner_file = Path(path + ".owner.json")
            owner_file.write_text(json.dumps({"pid": os.getpid(), "role": "server", "url": url, "since": utcnow().isoformat()}))
        cat = cls(conn, path, owner_file)
        with cat.transaction() as cur:
            migrations.apply(cur)
        return cat

    def close(self) -> None:
        if self._owner_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._owner_file.unlink()
            self._owner_file = None
        with contextlib.suppress(Exception):
            self._conn.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- cursors and transactions ---------------------------------------------
    def cursor(self):
        """This thread's cursor (created on first use)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._conn.cursor()
            self._local.cursor = cur
        return cur

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction; one at a time per process, so concurrent writers never conflict in DuckDB."""
        with self._lock:
            with self._transaction() as cur:
                yield cur

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        cur = self.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")

    @property
    def version_lock(self) -> threading.RLock:
        return self._lock

    # -- queries ---------------------------------------------------------------
    def query(self, sql: str, params: list | tuple = ()) -> list[dict]:
        """Rows as dicts; JSON columns decoded."""
        cur = self.cursor()
        res = cur.execute(sql, list(params))
        cols = [d[0] for d in res.description]
        types = [str(d[1]) for d in res.description]
        rows = []
        for row in res.fetchall():
            item = {}
            for col, typ, val in zip(cols, types, row):
                if typ == "JSON" and isinstance(val, str):
                    val = json.loads(val)
                item[col] = val
            rows.append(item)
        return rows

    def one(self, sql: str, params: list | tuple = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: list | tuple = ()):
        return self.cursor().execute(sql, list(params))


@contextlib.contextmanager
def borrowed(catalog: "Catalog | None", settings) -> Iterator["Catalog"]:
    """The caller's open catalog, or a short-lived one from ``settings`` closed on exit.

    Long jobs (training, evaluation) use this for each write so that the file is
    never held during their loops. While ``loradex serve`` owns the file the
    short-lived one is the server's API (``hub.remote.connect``).
    """
    if catalog is not None:
        yield catalog
        return
    from loradex.hub.remote import connect

    cat = connect(settings)
    try:
        yield cat
    finally:
        cat.close()


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _holder(path: str, exc: Exception) -> dict:
    info: dict[str, Any] = {}
    m = _LOCK_RE.search(str(exc))
    if m:
        info["pid"] = int(m.group(1))
    owner = Path(path + ".owner.json")
    try:
        data = json.loads(owner.read_text())
    except (OSError, ValueError):
        return info
    if data.get("pid") == info.get("pid", data.get("pid")) and pid_alive(int(data.get("pid", 0))):
        info.update(data)
    return info


def _locked_message(path: str, holder: dict, wait_s: float) -> str:
    pid = holder.get("pid", "?")
    if holder.get("role") == "server":
        url = holder.get("url") or "its HTTP API"
        return f"catalog {path} is owned by `loradex serve` (pid {pid}) at {url}; stop it first or use that server"
    return (
        f"catalog {path} is locked by process {pid} (waited {wait_s:g}s); "
        f"wait for it to finish, stop it, or point LORADEX_HOME at another catalog"
    )
