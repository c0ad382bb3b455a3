"""The promotion gate: may this adapter version become ``production``?

``check_promotion(catalog, version_row)`` refuses (``ok: False``, one sentence
per reason, with the numbers) when

1. the version has **no eval run**;
2. its **paired lift over the base** on the primary metric of its reference
   eval (similarity, else exact, else perplexity with the sign flipped so that
   positive is better) is **not positive at 95%**: the CI's lower bound is <= 0.
   The reference eval is the best-covered run (most items, then newest), so a
   later ``--limit 6`` quick run does not stand in for the full one;
3. that run is flagged **zero-effect**: the adapter's outputs equal the base's
   on >= 95% of items (``evals.record.ZERO_EFFECT_MIN_IDENTICAL``);
4. it is **worse than the current production version** of the same adapter
   **like for like**: only runs with the same comparison key count (same data,
   item count, metrics, decoding settings, base and serving configuration;
   ``evals.record.comparison_settings``). Its mean on the primary metric is below
   production's (point estimates; the paired candidate - production difference
   and its CI are reported beside them). Production without a run under the
   same key cannot be compared, and that refuses too, naming both sides'
   settings and the eval to run;
5. its latest **forgetting** measurement (held-out loss on the shipped
   general-text set, ``evals.forgetting``) regressed beyond the threshold at
   95%: the lower bound of the CI of adapter - base mean token NLL exceeds
   ``max_forgetting`` nats/token. The threshold is ``LORADEX_GATE_MAX_FORGETTING``
   (default 0.1 nats/token, about +10.5% perplexity; ``off`` disables it); a
   version without a forgetting measurement passes this check (the result says
   so) unless ``LORADEX_GATE_REQUIRE_FORGETTING=1``.

``check_promotion(catalog, version_row, config=cfg)`` asks the question for one
serving configuration (:func:`evals.config.serving_config`, or its key): only
eval runs measured under that configuration count, for the candidate and for
production; a version never scored under it is refused, naming the
configuration and the ``loradex eval ... --quantize X`` command that scores it.
Without ``config`` every run counts, as before.

``loradex alias set NAME@V production`` calls this and raises GateRefused
unless ``--force`` (the override and these numbers land in ``alias_events``).
"""
from __future__ import annotations

from loradex.hub.catalog import Catalog
from loradex.hub.ops import op

from loradex.evals import stats
from loradex.evals.config import config_label, eval_command
from loradex.evals.metrics import METRICS, PRIMARY_ORDER
from loradex.evals.forgetting import forgetting_policy
from loradex.evals.record import (ZERO_EFFECT_MIN_IDENTICAL, as_key, forgetting_label, get_samples, latest_forgetting,
                                  runs_for_version, settings_label)


def _signed(metric: str) -> int:
    """+1 when higher is better, -1 for perplexity (so that positive lift is good)."""
    return 1 if METRICS[metric].higher_is_better else -1


def _primary(run: dict) -> str | None:
    for m in PRIMARY_ORDER:
        if m in (run.get("paired") or {}) and m in (run.get("metrics") or {}):
            return m
    return None


def _lift(run: dict, metric: str) -> dict:
    p = run["paired"][metric]
    s = _signed(metric)
    lo, hi = sorted((s * p["ci_low"], s * p["ci_high"]))
    return {"metric": metric, "diff": s * p["diff"], "ci_low": lo, "ci_high": hi,
            "sign_flipped": s < 0, "n": run["n"], "eval_run_id": run["id"], "data_sha256": run["data_sha256"]}


def _paired_vs(catalog: Catalog, cand_run: dict, prod_run: dict, metric: str) -> dict | None:
    """candidate - production per-item difference, when both runs scored the same items."""
    if cand_run["n"] != prod_run["n"]:
        return None
    a = get_samples(catalog, cand_run["id"])
    b = get_samples(catalog, prod_run["id"])
    if [s["reference"] for s in a] != [s["reference"] for s in b]:
        return None
    try:
        xa = [s["scores"][metric] for s in a]
        xb = [s["scores"][metric] for s in b]
    except (KeyError, TypeError):
        return None
    return stats.paired_difference(xa, xb, seed=cand_run.get("seed") or 0)


def _compare_production(catalog: Catalog, version_row: dict, runs: list[dict], prod_version: int,
                        config: dict | None = None, key: str | None = None) -> tuple[dict, str | None]:
    """Candidate vs production on runs with the same comparison key (``runs``: the candidate's, best-covered first)."""
    name = version_row["adapter"]
    prod = catalog.one("SELECT id FROM adapter_versions WHERE adapter = ? AND version = ? AND status = 'ready'",
                       [name, prod_version])
    info: dict = {"version": prod_version}
    if prod is None:
        return info, None  # a dangling alias: nothing to compare against
    prod_runs = runs_for_version(catalog, prod["id"], config_key=key, best_covered=True)
    by_key = {}
    for r in prod_runs:  # best-covered first, then newest: keep each key's newest production run
        by_key.setdefault(r["compare_key"], r)
    pair = next(((c, by_key[c["compare_key"]]) for c in runs if c["compare_key"] in by_key), None)
    if pair is None:
        info["comparable"] = False
        under = f" under {config_label(config)}" if config else ""
        cmd = eval_command(f"{name}@{prod_version}", config) if config else f"loradex eval {name}@{prod_version} --data FILE"
        ref = runs[0]
        have = "; ".join(sorted({f"data {r['data_sha256'][:12]}, {settings_label(r['compare_settings'])}"
                                 for r in prod_runs})) or "none"
        return info, (f"it cannot be compared with production {name}@{prod_version} like for like: that version "
                      f"has no eval on the same data{under} with the same settings as this version's (data "
                      f"{ref['data_sha256'][:12]}, {settings_label(ref['compare_settings'])}); production has: {have}; "
                      f"run `{cmd}` with the same file and settings")
    cand_run, prod_run = pair
    metric = next((m for m in PRIMARY_ORDER if m in (cand_run["metrics"] or {}) and m in (prod_run["metrics"] or {})), None)
    if metric is None:
        info["comparable"] = False
        return info, (f"it cannot be compared with production {name}@{prod_version}: their evals on data "
                      f"{cand_run['data_sha256'][:12]} share no metric")
    cand_mean = cand_run["metrics"][metric]["mean"]
    prod_mean = prod_run["metrics"][metric]["mean"]
    s = _signed(metric)
    info.update({"comparable": True, "metric": metric, "data_sha256": cand_run["data_sha256"],
                 "compare_key": cand_run["compare_key"], "settings": settings_label(cand_run["compare_settings"]),
                 "eval_run_id": prod_run["id"], "candidate_eval_run_id": cand_run["id"],
                 "mean": prod_mean, "candidate_mean": cand_mean, "difference": cand_mean - prod_mean})
    vs = _paired_vs(catalog, cand_run, prod_run, metric)
    if vs is not None:
        info["paired"] = vs
    if s * (cand_mean - prod_mean) < 0:
        ci = f", paired 95% CI [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}]" if vs else ""
        better = "higher" if s > 0 else "lower"
        return info, (f"it is worse than production {name}@{prod_version} on the same data and settings "
                      f"({cand_run['data_sha256'][:12]}, {settings_label(cand_run['compare_settings'])}): "
                      f"{metric} {cand_mean:.4f} vs {prod_mean:.4f} "
                      f"(difference {cand_mean - prod_mean:+.4f}{ci}; {better} is better)")
    return info, None


def _check_forgetting(catalog: Catalog, version_row: dict, key: str | None, max_forgetting: float | None,
                      require: bool) -> tuple[dict | None, str | None]:
    """The version's latest forgetting row under ``key`` and a refusal sentence, if it regressed beyond the threshold."""
    ref = f"{version_row['adapter']}@{version_row['version']}"
    f = latest_forgetting(catalog, [version_row["id"]], config_key=key).get(version_row["id"])
    if f is None:
        if require:
            return None, (f"{ref} has no forgetting measurement{' under this configuration' if key else ''} "
                          f"(LORADEX_GATE_REQUIRE_FORGETTING is set): run `loradex eval {ref} --forgetting`")
        return None, None
    info = {"id": f["id"], "diff": f["diff"], "ci_low": f["ci_low"], "ci_high": f["ci_high"], "n": f["n"],
            "max_forgetting": max_forgetting, "base_nll": f["base_nll"]["mean"], "adapter_nll": f["adapter_nll"]["mean"]}
    if max_forgetting is not None and f["ci_low"] > max_forgetting:
        return info, (f"it forgets general text beyond the threshold: {forgetting_label(f)} exceeds "
                      f"+{max_forgetting:g} nats/token (LORADEX_GATE_MAX_FORGETTING) at 95%: the CI's lower bound "
                      f"is above it (forgetting run {f['id']})")
    return info, None


@op("gate.check")
def check_promotion(catalog: Catalog, version_row: dict, config: dict | str | None = None) -> dict:
    """{ok, reasons, adapter, version, eval_run_id, metric, lift, production, config_key, zero_effect, forgetting}.

    May ``version_row`` become production? ``config``: the serving configuration to
    decide for (a dict from :func:`evals.config.serving_config`, or its key); only
    runs under it count. The forgetting threshold comes from the environment of the
    process that holds the catalog (:func:`evals.forgetting.forgetting_policy`).
    """
    name, version = version_row["adapter"], version_row["version"]
    key = as_key(config) if config is not None else None
    cfg = config if isinstance(config, dict) else _config_of_key(catalog, key) if key else None
    max_forgetting, require_forgetting = forgetting_policy()
    result: dict = {"ok": False, "reasons": [], "adapter": name, "version": version, "eval_run_id": None,
                    "metric": None, "lift": None, "production": None, "config_key": key, "zero_effect": None,
                    "forgetting": None, "max_forgetting": max_forgetting}
    runs = runs_for_version(catalog, version_row["id"], config_key=key, best_covered=True)
    if not runs and key is None:
        result["reasons"].append(f"{name}@{version} has no eval: run `loradex eval {name}@{version} --data FILE` first")
        return result
    if not runs:
        others = sorted({config_label(r["serving_config"]) for r in runs_for_version(catalog, version_row["id"])})
        have = f" (it has evals under {', '.join(others)} only)" if others else ""
        result["reasons"].append(
            f"{name}@{version} has no eval under the serving configuration {config_label(cfg)} ({key}){have}: "
            f"run `{eval_command(f'{name}@{version}', cfg)}` first")
        return result
    ref_run = runs[0]  # best-covered: most items, then newest
    result["eval_run_id"] = ref_run["id"]
    result["settings"] = settings_label(ref_run["compare_settings"])
    metric = _primary(ref_run)
    if metric is None:
        result["reasons"].append(f"eval run {ref_run['id']} of {name}@{version} has no paired comparison with the base")
        return result
    lift = _lift(ref_run, metric)
    result["metric"] = metric
    result["lift"] = lift
    if lift["ci_low"] <= 0:
        flipped = " (perplexity, sign flipped: positive = lower perplexity)" if lift["sign_flipped"] else ""
        result["reasons"].append(
            f"its lift over base {ref_run['base']} is not positive at 95%: {metric} {lift['diff']:+.4f} "
            f"[95% CI {lift['ci_low']:+.4f}, {lift['ci_high']:+.4f}]{flipped} "
            f"(eval run {ref_run['id']}, {settings_label(ref_run['compare_settings'])}, "
            f"data {ref_run['data_sha256'][:12]})"
        )
    result["zero_effect"] = bool(ref_run.get("zero_effect"))
    if ref_run.get("zero_effect"):
        rate = ref_run.get("identical_rate") or 0.0
        result["reasons"].append(
            f"it has zero effect: its outputs equal base {ref_run['base']}'s on {round(rate * ref_run['n'])}/"
            f"{ref_run['n']} items ({rate:.0%} >= {ZERO_EFFECT_MIN_IDENTICAL:.0%}) in eval run {ref_run['id']}, so "
            f"serving it changes nothing; check its target modules and weights")
    alias = catalog.one("SELECT version FROM aliases WHERE adapter = ? AND alias = 'production'", [name])
    if alias is not None and alias["version"] != version:
        info, reason = _compare_production(catalog, version_row, runs, alias["version"], cfg, key)
        result["production"] = info
        if reason:
            result["reasons"].append(reason)
    result["forgetting"], reason = _check_forgetting(catalog, version_row, key, max_forgetting, require_forgetting)
    if reason:
        result["reasons"].append(reason)
    result["ok"] = not result["reasons"]
    return result


def _config_of_key(catalog: Catalog, key: str) -> dict:
    """The config a key names, from a run that recorded it, else parsed from the key itself."""
    row = catalog.one("SELECT serving_config FROM eval_runs WHERE config_key = ? LIMIT 1", [key])
    if row and row["serving_config"]:
        return row["serving_config"]
    base, _, rest = key.partition("@")
    digest, quantize, dtype, device = (rest.split("/") + [None] * 4)[:4]
    return {"base": base, "base_digest": digest, "quantize": quantize, "dtype": dtype, "device": device}
