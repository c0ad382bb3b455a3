"""The leaderboard: adapter versions ranked by their eval on each like-for-like key.

Scores are ranked together only when they measured the same thing: the same
data set (``data_sha256``), the same number of items (``n``: a ``--limit 6``
quick run is not the 20-item run), the same metrics, decoding settings
(``max_new_tokens`` ...), similarity model, base and serving configuration
(``config_key``, labelled e.g. ``nf4/fp32 cpu``). Together these are a run's
``compare_key`` (:func:`evals.record.comparison_settings`); the board has one
section per key, showing ``n`` and the settings. ``--data FILE_OR_HASH`` keeps
one data set and ``--config KEY|as-served|none|nf4|int8`` the matching
configurations.

Of the sections on one data set and configuration, the best-covered one (most
items) is the ``full`` board; sections with fewer items are listed after it as
``partial`` (quick runs), so a smaller run never displaces a larger one.
Within a section each version appears once (its latest run with that key),
ranked best first on the section's primary metric (similarity, else exact,
else perplexity, where lower is better), with its 95% CI, the base's score on
the same items, the paired lift adapter - base with its CI, the zero-effect
flag and the version's latest forgetting measurement under that configuration.
"""
from __future__ import annotations

import re
from pathlib import Path

from loradex.hub.catalog import Catalog
from loradex.hub.errors import InvalidConfig, NotFound
from loradex.hub.ops import op

from loradex.evals.config import config_filter, config_label, is_served_default
from loradex.evals.data import file_sha256
from loradex.evals.metrics import METRICS, PRIMARY_ORDER

_HEX = re.compile(r"^[0-9a-f]{6,64}$")


def resolve_data(catalog: Catalog, data: str) -> str:
    """A data file's sha256, or the full hash a (prefix of a) sha256 names."""
    p = Path(data)
    if p.is_file():
        return file_sha256(p)
    if not _HEX.match(data.lower()):
        raise InvalidConfig(f"--data {data!r}: no such file, and not a data sha256 (or a prefix of 6+ hex digits)")
    rows = catalog.query("SELECT DISTINCT data_sha256 FROM eval_runs WHERE data_sha256 LIKE ?", [data.lower() + "%"])
    if not rows:
        raise NotFound(f"--data {data}: no eval run on a data set with that hash")
    if len(rows) > 1:
        raise InvalidConfig(f"--data {data}: prefix matches {len(rows)} data sets; give more digits")
    return rows[0]["data_sha256"]


def _section_metric(runs: list[dict]) -> str | None:
    counts = {m: sum(1 for r in runs if m in (r["metrics"] or {})) for m in PRIMARY_ORDER}
    best = max(counts.values(), default=0)
    return next((m for m in PRIMARY_ORDER if counts[m] == best and best > 0), None)


@op("leaderboard.build")
def build(catalog: Catalog, data: str | None = None, *, config: str | None = None) -> list[dict]:
    """Sections ``{compare_key, settings, settings_label, n, coverage, full_n, data_sha256, data_path, config_key,
    config, serving_config, as_served, metric, rows}``.

    One section per comparison key; the sections of one (data set, configuration)
    are kept together, the best-covered first (``coverage`` ``full``, the others
    ``partial``), groups newest first; rows best first.
    ``config``: ``none``/``nf4``/``int8``, ``as-served`` (the default server's
    configuration) or a config key (prefix); None keeps all.
    """
    from loradex.evals.record import latest_forgetting, settings_label

    sha = resolve_data(catalog, data) if data else None
    keep = config_filter(config)
    sql = ("SELECT r.*, v.adapter, v.version, "
           "(SELECT list(alias ORDER BY alias) FROM aliases a WHERE a.adapter = v.adapter AND a.version = v.version) AS aliases "
           "FROM eval_runs r JOIN adapter_versions v ON v.id = r.adapter_version_id WHERE v.status = 'ready'")
    params: list = []
    if sha:
        sql += " AND r.data_sha256 = ?"
        params.append(sha)
    runs = catalog.query(sql + " ORDER BY r.id DESC", params)
    if keep is not None:
        runs = [r for r in runs if keep(r["serving_config"], r["config_key"])]
    latest: dict[tuple, dict] = {}
    for r in runs:
        latest.setdefault((r["compare_key"], r["adapter_version_id"]), r)
    by_section: dict[str, list[dict]] = {}
    for (ckey, _), r in latest.items():
        by_section.setdefault(ckey, []).append(r)
    forgetting: dict[str | None, dict] = {}
    for key in {r["config_key"] for r in runs}:
        forgetting[key] = latest_forgetting(catalog, sorted({r["adapter_version_id"] for r in runs}), config_key=key) \
            if key else {}
    sections = []
    for ckey, rs in by_section.items():
        metric = _section_metric(rs)
        higher = METRICS[metric].higher_is_better if metric else True
        rows = [_row(r, metric, forgetting.get(r["config_key"], {}).get(r["adapter_version_id"])) for r in rs]
        have = [r for r in rows if r["mean"] is not None]
        have.sort(key=lambda r: r["mean"], reverse=higher)
        rows = have + [r for r in rows if r["mean"] is None]
        for i, r in enumerate(rows, 1):
            r["rank"] = i
        cfg = rs[0]["serving_config"]
        settings = rs[0]["compare_settings"]
        sections.append({"compare_key": ckey, "settings": settings, "settings_label": settings_label(settings),
                         "n": rs[0]["n"], "data_sha256": rs[0]["data_sha256"], "data_path": rs[0]["data_path"],
                         "config_key": rs[0]["config_key"], "config": config_label(cfg), "serving_config": cfg,
                         "as_served": is_served_default(cfg), "metric": metric, "higher_is_better": higher,
                         "rows": rows, "latest": max(r["created_at"] for r in rs)})
    groups: dict[tuple, list[dict]] = {}
    for sec in sections:
        groups.setdefault((sec["data_sha256"], sec["config_key"]), []).append(sec)
    ordered = []
    for group in sorted(groups.values(), key=lambda g: max(s["latest"] for s in g), reverse=True):
        group.sort(key=lambda s: (s["n"], s["latest"]), reverse=True)
        full_n = group[0]["n"]
        for sec in group:
            sec["full_n"] = full_n
            sec["coverage"] = "full" if sec["n"] == full_n else "partial"
        ordered += group
    return ordered


def _row(run: dict, metric: str | None, forgetting: dict | None = None) -> dict:
    m = (run["metrics"] or {}).get(metric) if metric else None
    b = (run["base_metrics"] or {}).get(metric) if metric else None
    p = (run["paired"] or {}).get(metric) if metric else None
    return {
        "ref": f"{run['adapter']}@{run['version']}", "adapter": run["adapter"], "version": run["version"],
        "aliases": run["aliases"] or [], "base": run["base"], "eval_run_id": run["id"], "n": run["n"],
        "config": config_label(run["serving_config"]), "config_key": run["config_key"],
        "metric": metric,
        "mean": m["mean"] if m else None, "ci_low": m["ci_low"] if m else None, "ci_high": m["ci_high"] if m else None,
        "base_mean": b["mean"] if b else None, "base_ci_low": b["ci_low"] if b else None,
        "base_ci_high": b["ci_high"] if b else None,
        "lift": p["diff"] if p else None, "lift_ci_low": p["ci_low"] if p else None,
        "lift_ci_high": p["ci_high"] if p else None,
        "win_rate": (run["win_rate"] or {}).get("rate"),
        "zero_effect": bool(run.get("zero_effect")), "identical_rate": run.get("identical_rate"),
        "forgetting": ({k: forgetting[k] for k in ("id", "diff", "ci_low", "ci_high", "n", "data_path")}
                       | {"base_nll": forgetting["base_nll"]["mean"], "adapter_nll": forgetting["adapter_nll"]["mean"]}
                       if forgetting else None),
        "metrics": {k: {kk: v[kk] for kk in ("mean", "ci_low", "ci_high")} for k, v in (run["metrics"] or {}).items()},
        "created_at": run["created_at"],
    }


def render_text(sections: list[dict], *, config: str | None = None) -> str:
    from loradex.hub.render import table

    if not sections and config:
        return (f"no eval runs under --config {config}: run `loradex eval NAME --data FILE --as-served` "
                f"(or --quantize none|nf4|int8)")
    if not sections:
        return "no eval runs yet: run `loradex eval NAME --data FILE`"
    out = []
    for s in sections:
        better = "higher" if s["higher_is_better"] else "lower"
        served = (" = what `loradex serve` runs by default" if s["as_served"]
                  else " (not the default server's configuration)" if s["serving_config"] else " (recorded before configs were)")
        coverage = ("" if s.get("coverage", "full") == "full" else
                    f"PARTIAL (quick run: n={s['n']} of the {s['full_n']} items of the full board above; "
                    f"ranked only against runs with the same settings) ")
        out.append(f"{coverage}data {s['data_sha256'][:12]} ({s['data_path']}), served as {s['config']}{served}, "
                   f"ranked by {s['metric']} ({better} is better), 95% CIs")
        out.append(f"settings: {s.get('settings_label', 'n=' + str(s.get('n')))}"
                   + (f"; config {s['config_key']}" if s["config_key"] else "") + f"; key {s.get('compare_key')}")
        rows = []
        for r in s["rows"]:
            f = r.get("forgetting")
            rows.append({
                "rank": r["rank"], "ref": r["ref"] + (" ZERO-EFFECT" if r.get("zero_effect") else ""),
                "aliases": ",".join(r["aliases"]) or "-", "config": r["config"],
                "n": r["n"],
                "score": _fmt_ci(r["mean"], r["ci_low"], r["ci_high"]),
                "base": _fmt_ci(r["base_mean"], r["base_ci_low"], r["base_ci_high"]),
                "lift": _fmt_ci(r["lift"], r["lift_ci_low"], r["lift_ci_high"], signed=True),
                "win": f"{r['win_rate']:.0%}" if r["win_rate"] is not None else "-",
                "forget": _fmt_ci(f["diff"], f["ci_low"], f["ci_high"], signed=True) if f else "-",
                "run": r["eval_run_id"],
            })
        out.append(table(rows, ["rank", "ref", "aliases", "config", "n", "score", "base", "lift", "win", "forget", "run"],
                         ["#", "ADAPTER", "ALIASES", "CONFIG", "N", s["metric"].upper() if s["metric"] else "SCORE",
                          "BASE", "LIFT OVER BASE", "WIN", "FORGETTING (NATS/TOK)", "RUN"]))
        if any(r.get("zero_effect") for r in s["rows"]):
            out.append("ZERO-EFFECT: outputs equal the base's on >= 95% of items (the adapter changes nothing)")
        out.append("")
    return "\n".join(out).rstrip()


def _fmt_ci(mean, lo, hi, signed: bool = False) -> str:
    if mean is None:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def panel_title(section: dict) -> str:
    """A PNG panel's title: the data file's name (the hash only to tell files apart), n and the serving config."""
    ns = sorted({r["n"] for r in section["rows"] if r.get("n") is not None})
    n = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}" if ns else "n=?"
    name = Path(section["data_path"]).name if section.get("data_path") else "data"
    served = f", served as {section['config']}" if section.get("config") else ""
    if section.get("coverage") == "partial":
        n += f" of {section['full_n']}, partial"
    return f"{name} ({n}, sha256 {section['data_sha256'][:8]}{served}): mean with 95% CI"


def write_png(sections: list[dict], out: str | Path) -> Path:
    """Bar chart per data set: each version's score with its 95% CI, the base's score beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if not sections:
        raise NotFound("no eval runs to plot: run `loradex eval NAME --data FILE` first")
    fig, axes = plt.subplots(len(sections), 1, figsize=(max(6, 1.2 * max(len(s["rows"]) for s in sections) + 3),
                                                       4 * len(sections)), squeeze=False)
    for ax, s in zip(axes[:, 0], sections):
        rows = [r for r in s["rows"] if r["mean"] is not None]
        xs = range(len(rows))
        means = [r["mean"] for r in rows]
        err = [[r["mean"] - r["ci_low"] for r in rows], [r["ci_high"] - r["mean"] for r in rows]]
        ax.bar([x - 0.2 for x in xs], means, width=0.4, yerr=err, capsize=4, label="adapter", color="#3a7bd5")
        bmeans = [r["base_mean"] if r["base_mean"] is not None else 0 for r in rows]
        berr = [[(r["base_mean"] - r["base_ci_low"]) if r["base_mean"] is not None else 0 for r in rows],
                [(r["base_ci_high"] - r["base_mean"]) if r["base_mean"] is not None else 0 for r in rows]]
        ax.bar([x + 0.2 for x in xs], bmeans, width=0.4, yerr=berr, capsize=4, label="base", color="#b0b0b0")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{r['ref']}\nn={r['n']}" for r in rows], rotation=20, ha="right")
        better = "higher" if s["higher_is_better"] else "lower"
        ax.set_ylabel(f"{s['metric']} ({better} is better)")
        ax.set_title(panel_title(s))
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
