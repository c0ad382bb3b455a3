"""Eval rows in the catalog: runs, per-item samples, the base-output cache, look-ups.

Tables (see ``hub/migrations.py`` 003_evals): ``eval_runs`` (one per eval,
``metrics``/``base_metrics`` = {metric: {mean, n, ci_low, ci_high, method, std}},
``paired`` = {metric: {diff, ci_low, ci_high, n, method}}, ``win_rate``,
``decoding`` = the decoding parameters plus the resolved eval config and
timings, ``serving_config`` + ``config_key`` = what the scores describe, see
:mod:`evals.config`), ``eval_samples`` (one per item) and ``base_eval_cache``.

:func:`scores_for_config` answers a running server's question: which score,
if any, describes each adapter version as *this* configuration serves it.
"""
from __future__ import annotations

import hashlib
import json

from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.errors import InvalidConfig, NotFound
from loradex.hub.ops import op

from loradex.evals.config import config_key as make_config_key, config_label, eval_command

RUN_COLUMNS = ("id, adapter_version_id, base, data_path, data_sha256, n, metrics, base_metrics, paired, win_rate, "
               "decoding, metric_model, seed, duration_s, created_at, serving_config, config_key")


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
    """Insert the run, its samples and (optionally) a base-cache entry in one transaction.

    ``run["serving_config"]`` (from :func:`evals.config.serving_config`) is stored with
    its ``config_key``; a run without one is stored as an unknown configuration.
    """
    cfg = run.get("serving_config")
    with catalog.transaction() as cur:
        rid = cur.execute(
            "INSERT INTO eval_runs (adapter_version_id, base, data_path, data_sha256, n, metrics, base_metrics, paired, "
            "win_rate, decoding, metric_model, seed, duration_s, created_at, serving_config, config_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [run["adapter_version_id"], run["base"], run["data_path"], run["data_sha256"], run["n"],
             to_json(run["metrics"]), to_json(run["base_metrics"]), to_json(run["paired"]), to_json(run["win_rate"]),
             to_json(run["decoding"]), run["metric_model"], run["seed"], run["duration_s"], utcnow(),
             to_json(cfg) if cfg else None, make_config_key(cfg)],
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
def runs_for_version(catalog: Catalog, version_id: int, data_sha256: str | None = None, *,
                     config_key: str | None = None) -> list[dict]:
    """Eval runs of one adapter version, newest first (optionally on one data set, under one config key)."""
    sql = f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE adapter_version_id = ?"
    params: list = [version_id]
    if data_sha256:
        sql += " AND data_sha256 = ?"
        params.append(data_sha256)
    if config_key:
        sql += " AND config_key = ?"
        params.append(config_key)
    return catalog.query(sql + " ORDER BY id DESC", params)


def as_key(cfg: dict | str) -> str:
    """A serving config dict (or a key already) -> its config key."""
    key = cfg if isinstance(cfg, str) else make_config_key(cfg)
    if not key:
        raise InvalidConfig(f"a serving configuration needs base, quantize, dtype and device, got {cfg!r}")
    return key


def _primary(run: dict) -> str | None:
    from loradex.evals.metrics import PRIMARY_ORDER

    primary = (run.get("decoding") or {}).get("primary_metric")
    if primary in (run.get("metrics") or {}):
        return primary
    return next((m for m in PRIMARY_ORDER if m in (run.get("metrics") or {})), None)


def score_of(run: dict) -> dict:
    """The short score a listing shows for one run: primary metric, CI, lift, n, data, config."""
    metric = _primary(run)
    m = (run["metrics"] or {}).get(metric) or {}
    p = (run.get("paired") or {}).get(metric) or {}
    return {"eval_run_id": run["id"], "metric": metric, "mean": m.get("mean"), "ci_low": m.get("ci_low"),
            "ci_high": m.get("ci_high"), "n": run["n"], "lift": p.get("diff"), "lift_ci_low": p.get("ci_low"),
            "lift_ci_high": p.get("ci_high"), "data_sha256": run["data_sha256"], "data_path": run["data_path"],
            "config_key": run.get("config_key"), "config": config_label(run.get("serving_config")),
            "created_at": run["created_at"]}


@op("evals.scores_for_config")
def scores_for_config(catalog: Catalog, cfg: dict | str, *, version_ids: list[int] | None = None,
                      data_sha256: str | None = None) -> dict[int, dict | None]:
    """{adapter version id: its latest score under ``cfg``, or None when it has none} for every ready version.

    ``cfg`` is what a server runs (:func:`evals.config.serving_config` of its base,
    quantize, dtype and device) or its config key. A version scored only under
    other configurations maps to None: no number describes it as this server runs
    it (:func:`describe_score` says so in words). ``version_ids`` limits the
    versions; ``data_sha256`` the data set.
    """
    key = as_key(cfg)
    sql = "SELECT id FROM adapter_versions WHERE status = 'ready'"
    params: list = []
    if version_ids is not None:
        ids = [int(v) for v in version_ids]
        if not ids:
            return {}
        sql += f" AND id IN ({', '.join('?' for _ in ids)})"
        params += ids
    result: dict[int, dict | None] = {r["id"]: None for r in catalog.query(sql + " ORDER BY id", params)}
    if not result:
        return result
    rsql = (f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE config_key = ? "
            f"AND adapter_version_id IN ({', '.join('?' for _ in result)})")
    rparams: list = [key, *result]
    if data_sha256:
        rsql += " AND data_sha256 = ?"
        rparams.append(data_sha256)
    for run in catalog.query(rsql + " ORDER BY id DESC", rparams):
        if result[run["adapter_version_id"]] is None:
            result[run["adapter_version_id"]] = score_of(run)
    return result


def describe_score(ref: str, score: dict | None, cfg: dict) -> str:
    """One line for a listing: the score under ``cfg``, or plainly that there is none and how to get one."""
    label = config_label(cfg)
    if score is None:
        return f"no eval under {label} (run `{eval_command(ref, cfg)}`)"
    if score.get("mean") is None:
        return f"eval run {score['eval_run_id']} under {label} has no score"
    ci = (f" [{score['ci_low']:.3f}, {score['ci_high']:.3f}]" if score.get("ci_low") is not None else "")
    return (f"{score['metric']} {score['mean']:.3f}{ci} (n={score['n']}, {label}, eval run {score['eval_run_id']}, "
            f"data {score['data_sha256'][:12]})")


def worst_samples(samples: list[dict], metric: str, higher_is_better: bool, k: int) -> list[dict]:
    """The ``k`` samples with the worst adapter score on ``metric``."""
    scored = [s for s in samples if (s["scores"] or {}).get(metric) is not None]
    scored.sort(key=lambda s: s["scores"][metric], reverse=not higher_is_better)
    return scored[:k]
