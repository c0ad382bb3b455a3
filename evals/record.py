"""Eval rows in the catalog: runs, per-item samples, the base-output cache, look-ups.

Tables (see ``hub/migrations.py`` 003_evals): ``eval_runs`` (one per eval,
``metrics``/``base_metrics`` = {metric: {mean, n, ci_low, ci_high, method, std}},
``paired`` = {metric: {diff, ci_low, ci_high, n, method}}, ``win_rate``,
``decoding`` = the decoding parameters plus the resolved eval config and
timings), ``eval_samples`` (one per item) and ``base_eval_cache``.
"""
from __future__ import annotations

import hashlib
import json

from hub.catalog import Catalog, to_json, utcnow
from hub.errors import NotFound
from hub.ops import op

RUN_COLUMNS = ("id, adapter_version_id, base, data_path, data_sha256, n, metrics, base_metrics, paired, win_rate, "
               "decoding, metric_model, seed, duration_s, created_at")


def cache_key(*, base: str, base_digest: str, data_sha256: str, n: int, decoding: dict, metrics, metric_model: str) -> str:
    """sha256 of everything that decides the base's outputs and scores on a data set."""
    blob = json.dumps({"base": base, "base_digest": base_digest, "data": data_sha256, "n": n, "decoding": decoding,
                       "metrics": sorted(metrics), "metric_model": metric_model}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@op("evals.cached_base")
def cached_base(catalog: Catalog, key: str) -> dict | None:
    row = catalog.one("SELECT payload FROM base_eval_cache WHERE key = ?", [key])
    return row["payload"] if row else None


@op("evals.store", write=True)
def store_run(catalog: Catalog, run: dict, samples: list[dict], cache: tuple[str, str, dict] | None = None) -> dict:
    """Insert the run, its samples and (optionally) a base-cache entry in one transaction."""
    with catalog.transaction() as cur:
        rid = cur.execute(
            "INSERT INTO eval_runs (adapter_version_id, base, data_path, data_sha256, n, metrics, base_metrics, paired, "
            "win_rate, decoding, metric_model, seed, duration_s, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [run["adapter_version_id"], run["base"], run["data_path"], run["data_sha256"], run["n"],
             to_json(run["metrics"]), to_json(run["base_metrics"]), to_json(run["paired"]), to_json(run["win_rate"]),
             to_json(run["decoding"]), run["metric_model"], run["seed"], run["duration_s"], utcnow()],
        ).fetchone()[0]
        cur.executemany(
            "INSERT INTO eval_samples (run_id, idx, prompt, reference, output, base_output, scores, base_scores) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [[rid, s["idx"], s["prompt"], s["reference"], s["output"], s["base_output"], to_json(s["scores"]),
              to_json(s["base_scores"])] for s in samples],
        )
        if cache is not None:
            key, base, payload = cache
            cur.execute("DELETE FROM base_eval_cache WHERE key = ?", [key])
            cur.execute("INSERT INTO base_eval_cache VALUES (?, ?, ?, ?)", [key, base, to_json(payload), utcnow()])
    return get_run(catalog, rid)


@op("evals.get")
def get_run(catalog: Catalog, run_id: int) -> dict:
    row = catalog.one(
        f"SELECT {', '.join('r.' + c.strip() for c in RUN_COLUMNS.split(','))}, v.adapter, v.version "
        "FROM eval_runs r LEFT JOIN adapter_versions v ON v.id = r.adapter_version_id WHERE r.id = ?", [run_id])
    if row is None:
        raise NotFound(f"eval run {run_id} not found (see `loradex show NAME` for run ids)")
    return row


@op("evals.samples")
def get_samples(catalog: Catalog, run_id: int) -> list[dict]:
    return catalog.query("SELECT * FROM eval_samples WHERE run_id = ? ORDER BY idx", [run_id])


@op("evals.for_version")
def runs_for_version(catalog: Catalog, version_id: int, data_sha256: str | None = None) -> list[dict]:
    """Eval runs of one adapter version, newest first (optionally on one data set)."""
    sql = f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE adapter_version_id = ?"
    params: list = [version_id]
    if data_sha256:
        sql += " AND data_sha256 = ?"
        params.append(data_sha256)
    return catalog.query(sql + " ORDER BY id DESC", params)


def worst_samples(samples: list[dict], metric: str, higher_is_better: bool, k: int) -> list[dict]:
    """The ``k`` samples with the worst adapter score on ``metric``."""
    scored = [s for s in samples if (s["scores"] or {}).get(metric) is not None]
    scored.sort(key=lambda s: s["scores"][metric], reverse=not higher_is_better)
    return scored[:k]
