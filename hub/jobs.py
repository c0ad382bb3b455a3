"""The ``jobs`` table: long operations (merge, export, eval) that a server runs for its clients.

A job is ``queued`` -> ``running`` -> ``succeeded`` | ``failed``. The server that
runs it is the only writer (``serving/jobs.py``); a job left ``queued`` or
``running`` when its server stopped is marked failed by the next server start,
so no job is ever silently lost or reported half-done.
"""
from __future__ import annotations

from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.errors import NotFound
from loradex.hub.ops import op

COLUMNS = "id, kind, params, state, progress, result, error, error_type, actor, created_at, started_at, finished_at"


def create(catalog: Catalog, kind: str, params: dict, actor: str | None) -> dict:
    with catalog.transaction() as cur:
        jid = cur.execute(
            "INSERT INTO jobs (kind, params, state, progress, actor, created_at) VALUES (?, ?, 'queued', ?, ?, ?) "
            "RETURNING id", [kind, to_json(params), to_json({"phase": "queued"}), actor, utcnow()]).fetchone()[0]
    return get_job(catalog, jid)


def update(catalog: Catalog, job_id: int, **values) -> None:
    cols = ", ".join(f"{k} = ?" for k in values)
    params = [to_json(v) if isinstance(v, (dict, list)) else v for v in values.values()]
    with catalog.transaction() as cur:
        cur.execute(f"UPDATE jobs SET {cols} WHERE id = ?", params + [job_id])


def fail_unfinished(catalog: Catalog) -> int:
    """Mark jobs a previous server left queued or running as failed; returns how many."""
    rows = catalog.query("SELECT id FROM jobs WHERE state IN ('queued', 'running')")
    if rows:
        with catalog.transaction() as cur:
            cur.execute(
                "UPDATE jobs SET state = 'failed', error = 'the server stopped before this job finished; start it again', "
                "error_type = 'JobFailed', finished_at = ? WHERE state IN ('queued', 'running')", [utcnow()])
    return len(rows)


@op("jobs.get")
def get_job(catalog: Catalog, job_id: int) -> dict:
    """One job: its state, progress, and its result or error."""
    row = catalog.one(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", [job_id])
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return row


@op("jobs.list")
def list_jobs(catalog: Catalog, state: str | None = None, limit: int = 100) -> list[dict]:
    """Jobs, newest first (only those in ``state`` when given)."""
    sql = f"SELECT {COLUMNS} FROM jobs"
    params: list = []
    if state:
        sql += " WHERE state = ?"
        params.append(state)
    return catalog.query(sql + " ORDER BY id DESC LIMIT ?", params + [int(limit)])
