"""Eval rows in the catalog: runs, per-item samples, the base-output cache, look-ups.

Tables (see ``hub/migrations.py`` 003_evals): ``eval_runs`` (one per eval,
``metrics``/``base_metrics`` = {metric: {mean, n, ci_low, ci_high, method, std}},
``paired`` = {metric: {diff, ci_low, ci_high, n, method}}, ``win_rate``,
``decoding`` = the decoding parameters plus the resolved eval config and
timings, ``serving_config`` + ``config_key`` = what the scores describe, see
:mod:`evals.config`; ``compare_key`` + ``compare_settings``, ``identical_rate`` +
``zero_effect``, see below), ``eval_samples`` (one per item), ``base_eval_cache``
and ``forgetting_runs`` (held-out loss on the shipped general-text set, see
:mod:`evals.forgetting`).

Like for like. Two runs may be ranked against each other only when they
measured the same thing: :func:`comparison_settings` is what a run recorded
about that (data sha256, item count ``n``, metric set, decoding settings,
similarity model, base, serving config key) and :func:`comparison_key` its
short hash, stored as ``compare_key``. Batch size is left out: it decides speed,
not what is asked (the batch-invariant mode makes it decide nothing at all).
Where one score must stand for a version (``show``, a server's listing, the
gate), the **best-covered** run wins: most items, then newest, so a later
``--limit 6`` quick run never hides the 20-item run.

Zero effect. A run whose adapter outputs equal the base's on at least
:data:`ZERO_EFFECT_MIN_IDENTICAL` (95%) of its items is flagged
``zero_effect``: an adapter that changes (nearly) nothing is an error to fix
(wrong target modules, B still zero, scale 0), not a model to promote. Runs
without generated text (perplexity only) compare per-item scores instead
(relative tolerance 1e-4).

:func:`scores_for_config` answers a running server's question: which score,
if any, describes each adapter version as *this* configuration serves it.
"""
from __future__ import annotations

import hashlib
import json
import math

from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.errors import InvalidConfig, NotFound
from loradex.hub.ops import op

from loradex.evals.config import config_key as make_config_key, config_label, eval_command

RUN_COLUMNS = ("id, adapter_version_id, base, data_path, data_sha256, n, metrics, base_metrics, paired, win_rate, "
               "decoding, metric_model, seed, duration_s, created_at, serving_config, config_key, compare_key, "
               "compare_settings, identical_rate, zero_effect")

ZERO_EFFECT_MIN_IDENTICAL = 0.95
"""A run is flagged zero-effect when at least this share of its items have adapter output == base output."""

COMPARE_DECODING = ("strategy", "do_sample", "num_beams", "max_new_tokens", "chat_template", "skip_special_tokens",
                    "batch_invariant")
"""Decoding settings that decide what a run measured (batch size and padding side decide only speed)."""


def comparison_settings(run: dict) -> dict:
    """What decides whether two runs are comparable, from what ``run`` recorded (an eval_runs row or a new run)."""
    dec = run.get("decoding") or {}
    metrics = (dec.get("eval_config") or {}).get("metrics") or list((run.get("metrics") or {}).keys())
    cfg = run.get("serving_config")
    return {"data_sha256": run["data_sha256"], "n": int(run["n"]), "metrics": sorted(metrics),
            "decoding": {k: dec[k] for k in COMPARE_DECODING if dec.get(k) is not None},
            "metric_model": run.get("metric_model"), "base": run["base"],
            "config_key": run.get("config_key") if "config_key" in run else make_config_key(cfg)}


def comparison_key(settings: dict) -> str:
    """16 hex digits naming :func:`comparison_settings`: runs with equal keys may be ranked together."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def settings_label(settings: dict | None) -> str:
    """Short human label of a run's comparison settings, e.g. ``n=20, max_new_tokens=64, similarity``."""
    if not settings:
        return "settings unknown"
    dec = settings.get("decoding") or {}
    parts = [f"n={settings.get('n')}"]
    if dec.get("max_new_tokens") is not None:
        parts.append(f"max_new_tokens={dec['max_new_tokens']}")
    if dec.get("strategy") and dec["strategy"] != "greedy":
        parts.append(str(dec["strategy"]))
    if dec.get("batch_invariant"):
        parts.append("batch-invariant")
    parts.append(",".join(settings.get("metrics") or []) or "no metrics")
    return ", ".join(parts)


def identical_rate(samples: list[dict]) -> float | None:
    """Share of items where the adapter's output equals the base's (scores, for runs without generated text)."""
    pairs = [(s["output"].strip(), s["base_output"].strip()) for s in samples
             if s.get("output") is not None and s.get("base_output") is not None]
    if pairs:
        return sum(a == b for a, b in pairs) / len(pairs)
    scored = [(s.get("scores") or {}, s.get("base_scores") or {}) for s in samples]
    scored = [(a, b) for a, b in scored if a and b]
    if not scored:
        return None
    same = 0
    for a, b in scored:
        keys = [k for k in a if k in b and a[k] is not None and b[k] is not None]
        same += bool(keys) and all(math.isclose(float(a[k]), float(b[k]), rel_tol=1e-4, abs_tol=1e-9) for k in keys)
    return same / len(scored)


def is_zero_effect(rate: float | None) -> bool:
    return rate is not None and rate >= ZERO_EFFECT_MIN_IDENTICAL


def zero_effect_line(run: dict) -> str | None:
    """One loud sentence when ``run`` is flagged zero-effect, else None."""
    if not run.get("zero_effect"):
        return None
    rate = run.get("identical_rate") or 0.0
    same = round(rate * run["n"])
    ref = f"{run.get('adapter')}@{run.get('version')}" if run.get("adapter") else f"version id {run['adapter_version_id']}"
    return (f"ZERO EFFECT: {ref}'s outputs equal the base's on {same}/{run['n']} items ({rate:.0%}, flagged at "
            f">= {ZERO_EFFECT_MIN_IDENTICAL:.0%}) in eval run {run['id']}: the adapter changes (nearly) nothing; "
            f"check its target modules and weights (the promotion gate refuses it)")


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
    key = make_config_key(cfg)
    settings = comparison_settings(dict(run, config_key=key))
    rate = identical_rate(samples)
    with catalog.transaction() as cur:
        rid = cur.execute(
            "INSERT INTO eval_runs (adapter_version_id, base, data_path, data_sha256, n, metrics, base_metrics, paired, "
            "win_rate, decoding, metric_model, seed, duration_s, created_at, serving_config, config_key, compare_key, "
            "compare_settings, identical_rate, zero_effect) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [run["adapter_version_id"], run["base"], run["data_path"], run["data_sha256"], run["n"],
             to_json(run["metrics"]), to_json(run["base_metrics"]), to_json(run["paired"]), to_json(run["win_rate"]),
             to_json(run["decoding"]), run["metric_model"], run["seed"], run["duration_s"], utcnow(),
             to_json(cfg) if cfg else None, key, comparison_key(settings), to_json(settings), rate,
             is_zero_effect(rate)],
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
                     config_key: str | None = None, best_covered: bool = False) -> list[dict]:
    """Eval runs of one adapter version, newest first (optionally on one data set, under one config key).

    ``best_covered=True`` orders most items first, then newest: the run that stands for the version.
    """
    sql = f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE adapter_version_id = ?"
    params: list = [version_id]
    if data_sha256:
        sql += " AND data_sha256 = ?"
        params.append(data_sha256)
    if config_key:
        sql += " AND config_key = ?"
        params.append(config_key)
    return catalog.query(sql + (" ORDER BY n DESC, id DESC" if best_covered else " ORDER BY id DESC"), params)


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
    """The short score a listing shows for one run: primary metric, CI, lift, n, settings, data, config, flags."""
    metric = _primary(run)
    m = (run["metrics"] or {}).get(metric) or {}
    p = (run.get("paired") or {}).get(metric) or {}
    return {"eval_run_id": run["id"], "metric": metric, "mean": m.get("mean"), "ci_low": m.get("ci_low"),
            "ci_high": m.get("ci_high"), "n": run["n"], "lift": p.get("diff"), "lift_ci_low": p.get("ci_low"),
            "lift_ci_high": p.get("ci_high"), "data_sha256": run["data_sha256"], "data_path": run["data_path"],
            "config_key": run.get("config_key"), "config": config_label(run.get("serving_config")),
            "compare_key": run.get("compare_key"), "settings": settings_label(run.get("compare_settings")),
            "zero_effect": bool(run.get("zero_effect")), "identical_rate": run.get("identical_rate"),
            "created_at": run["created_at"]}


@op("evals.scores_for_config")
def scores_for_config(catalog: Catalog, cfg: dict | str, *, version_ids: list[int] | None = None,
                      data_sha256: str | None = None) -> dict[int, dict | None]:
    """{adapter version id: its best-covered score under ``cfg``, or None when it has none} for every ready version.

    ``cfg`` is what a server runs (:func:`evals.config.serving_config` of its base,
    quantize, dtype and device) or its config key. A version scored only under
    other configurations maps to None: no number describes it as this server runs
    it (:func:`describe_score` says so in words). Of several runs the one with the
    most items wins, then the newest: a later quick ``--limit`` run does not stand
    for the version while a fuller one exists. Each score carries ``forgetting``:
    the version's latest held-out-loss change under ``cfg`` (or None).
    ``version_ids`` limits the versions; ``data_sha256`` the data set.
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
    newer_smaller: dict[int, int] = {}
    for run in catalog.query(rsql + " ORDER BY n DESC, id DESC", rparams):
        vid = run["adapter_version_id"]
        if result[vid] is None:
            result[vid] = score_of(run)
        elif run["id"] > result[vid]["eval_run_id"]:
            newer_smaller[vid] = newer_smaller.get(vid, 0) + 1
    forgetting = latest_forgetting(catalog, list(result), config_key=key)
    for vid, score in result.items():
        if score is not None:
            score["newer_smaller_runs"] = newer_smaller.get(vid, 0)
            score["forgetting"] = forgetting.get(vid)
    return result


def describe_score(ref: str, score: dict | None, cfg: dict) -> str:
    """One line for a listing: the score under ``cfg``, or plainly that there is none and how to get one."""
    label = config_label(cfg)
    if score is None:
        return f"no eval under {label} (run `{eval_command(ref, cfg)}`)"
    if score.get("mean") is None:
        return f"eval run {score['eval_run_id']} under {label} has no score"
    ci = (f" [{score['ci_low']:.3f}, {score['ci_high']:.3f}]" if score.get("ci_low") is not None else "")
    text = (f"{score['metric']} {score['mean']:.3f}{ci} (n={score['n']}, {label}, eval run {score['eval_run_id']}, "
            f"data {score['data_sha256'][:12]}")
    if score.get("settings"):
        text += f"; {score['settings']}"
    text += ")"
    if score.get("newer_smaller_runs"):
        text += f"; {score['newer_smaller_runs']} newer run(s) on fewer items not shown"
    if score.get("zero_effect"):
        text += f"; ZERO EFFECT: outputs equal the base's on {score['identical_rate']:.0%} of items"
    if score.get("forgetting"):
        text += "; " + forgetting_label(score["forgetting"])
    return text


def forgetting_label(f: dict) -> str:
    """``forgetting +0.012 nats/token [95% CI +0.008, +0.016] on general.jsonl (n=240)``."""
    return (f"forgetting {f['diff']:+.3f} nats/token [95% CI {f['ci_low']:+.3f}, {f['ci_high']:+.3f}] "
            f"(held-out loss {f['base_nll']['mean']:.3f} -> {f['adapter_nll']['mean']:.3f} on "
            f"{f['data_path']}, n={f['n']})")


FORGETTING_COLUMNS = ("id, adapter_version_id, base, data_path, data_sha256, n, tokens, serving_config, config_key, "
                      "base_nll, adapter_nll, diff, ci_low, ci_high, method, eval_run_id, duration_s, created_at")


@op("evals.store_forgetting", write=True)
def store_forgetting(catalog: Catalog, row: dict, cache: tuple[str, str, dict] | None = None) -> dict:
    """Insert one forgetting measurement (see :mod:`evals.forgetting`) and optionally a base-cache entry."""
    cfg = row.get("serving_config")
    with catalog.transaction() as cur:
        if cache is not None:
            key, base, payload = cache
            cur.execute("DELETE FROM base_eval_cache WHERE key = ?", [key])
            cur.execute("INSERT INTO base_eval_cache VALUES (?, ?, ?, ?)", [key, base, to_json(payload), utcnow()])
        fid = cur.execute(
            "INSERT INTO forgetting_runs (adapter_version_id, base, data_path, data_sha256, n, tokens, serving_config, "
            "config_key, base_nll, adapter_nll, diff, ci_low, ci_high, method, eval_run_id, duration_s, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [row["adapter_version_id"], row["base"], row["data_path"], row["data_sha256"], row["n"], row["tokens"],
             to_json(cfg) if cfg else None, make_config_key(cfg), to_json(row["base_nll"]),
             to_json(row["adapter_nll"]), row["diff"], row["ci_low"], row["ci_high"], row["method"],
             row.get("eval_run_id"), row.get("duration_s"), utcnow()],
        ).fetchone()[0]
    return catalog.one(f"SELECT {FORGETTING_COLUMNS} FROM forgetting_runs WHERE id = ?", [fid])


@op("evals.forgetting")
def latest_forgetting(catalog: Catalog, version_ids: list[int], config_key: str | None = None) -> dict[int, dict]:
    """{version id: its newest forgetting measurement (under ``config_key`` when given)} for versions that have one."""
    ids = [int(v) for v in version_ids]
    if not ids:
        return {}
    sql = f"SELECT {FORGETTING_COLUMNS} FROM forgetting_runs WHERE adapter_version_id IN ({', '.join('?' for _ in ids)})"
    params: list = list(ids)
    if config_key:
        sql += " AND config_key = ?"
        params.append(config_key)
    out: dict[int, dict] = {}
    for r in catalog.query(sql + " ORDER BY id DESC", params):
        out.setdefault(r["adapter_version_id"], r)
    return out


def worst_samples(samples: list[dict], metric: str, higher_is_better: bool, k: int) -> list[dict]:
    """The ``k`` samples with the worst adapter score on ``metric``."""
    scored = [s for s in samples if (s["scores"] or {}).get(metric) is not None]
    scored.sort(key=lambda s: s["scores"][metric], reverse=not higher_is_better)
    return scored[:k]
