"""The ``training_runs`` row: written when a run starts, updated when it ends.

The catalog is opened only for these short writes (DuckDB lets one process hold
the file), never across the training loop. A row left ``running`` by a process
that no longer exists (kill -9, power loss) is marked ``interrupted`` the next
time any run starts.
"""
from __future__ import annotations

import os

from loradex.hub.catalog import Catalog, pid_alive, to_json, utcnow
from loradex.hub.errors import InvalidConfig, NotFound
from loradex.hub.ops import op

RESUMABLE = ("interrupted", "failed")
UPDATABLE = frozenset((
    "status", "error", "ended_at", "duration_s", "steps", "tokens_seen", "tokens_per_s", "loss_curve", "final_loss",
    "eval_loss", "eval_loss_before", "loss_png", "checkpoint", "cost_usd", "cost_basis", "adapter_version_id",
    "method", "parent_version_id", "preference",
))


@op("runs.reap", write=True)
def reap_dead_runs(catalog: Catalog) -> int:
    """Mark rows still ``running`` whose process is gone as interrupted."""
    rows = catalog.query("SELECT id, pid FROM training_runs WHERE status = 'running'")
    dead = [r["id"] for r in rows if not r["pid"] or (r["pid"] != os.getpid() and not pid_alive(int(r["pid"])))]
    if dead:
        with catalog.transaction() as cur:
            for rid in dead:
                cur.execute(
                    "UPDATE training_runs SET status = 'interrupted', error = coalesce(error, ?), ended_at = ? "
                    "WHERE id = ? AND status = 'running'",
                    ["the training process exited without recording an outcome", utcnow(), rid],
                )
    return len(dead)


@op("runs.running_in")
def running_in(catalog: Catalog, output_dir: str) -> dict | None:
    """A live run (status running, process alive) writing to ``output_dir``."""
    return catalog.one(
        "SELECT id, pid FROM training_runs WHERE output_dir = ? AND status = 'running' ORDER BY id DESC LIMIT 1",
        [output_dir],
    )


@op("runs.resumable")
def resumable_run(catalog: Catalog, output_dir: str) -> dict | None:
    """The latest interrupted or failed run that used ``output_dir``."""
    return catalog.one(
        "SELECT * FROM training_runs WHERE output_dir = ? AND status IN ('interrupted', 'failed') "
        "ORDER BY id DESC LIMIT 1",
        [output_dir],
    )


@op("runs.start", write=True)
def start_run(catalog: Catalog, *, config: dict, base: str, output_dir: str, config_path: str,
              data_path: str, data_sha256: str, data_counts: dict, device: str, precision: str,
              quantization: str, resume_id: int | None = None, pid: int | None = None) -> int:
    """Insert a ``running`` row (or re-open ``resume_id``); returns the run id.

    ``pid`` is the training process (default: this one); a run whose process is
    gone is reaped as interrupted.
    """
    now = utcnow()
    pid = pid or os.getpid()
    with catalog.transaction() as cur:
        if resume_id is not None:
            cur.execute(
                "UPDATE training_runs SET status = 'running', error = NULL, ended_at = NULL, pid = ?, "
                "attempts = coalesce(attempts, 1) + 1, config = ?, device = ?, precision = ?, quantization = ?, "
                "data_counts = ? WHERE id = ?",
                [pid, to_json(config), device, precision, quantization, to_json(data_counts), resume_id],
            )
            return resume_id
        row = cur.execute(
            "INSERT INTO training_runs (adapter, base, config, config_path, output_dir, data_path, data_sha256, "
            "data_counts, device, precision, quantization, status, started_at, pid, attempts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, 1) RETURNING id",
            [config["name"], base, to_json(config), config_path, output_dir, data_path, data_sha256,
             to_json(data_counts), device, precision, quantization, now, pid],
        ).fetchone()
    return int(row[0])


@op("runs.update", write=True)
def update_run(catalog: Catalog, run_id: int, **values) -> None:
    """Set columns of a run row (dicts and lists are stored as JSON)."""
    if not values:
        return
    unknown = sorted(set(values) - UPDATABLE)
    if unknown:
        raise InvalidConfig(f"training run {run_id}: cannot set {', '.join(unknown)}")
    cols = ", ".join(f"{k} = ?" for k in values)
    params = [to_json(v) if isinstance(v, (dict, list)) else v for v in values.values()]
    with catalog.transaction() as cur:
        cur.execute(f"UPDATE training_runs SET {cols} WHERE id = ?", params + [run_id])


@op("runs.get")
def get_run(catalog: Catalog, run_id: int) -> dict:
    row = catalog.one("SELECT * FROM training_runs WHERE id = ?", [run_id])
    if row is None:
        raise NotFound(f"training run {run_id} not found")
    return row
