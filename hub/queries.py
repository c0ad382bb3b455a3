"""Read-only views of the catalog that the CLI, the HTTP API and the web page show.

Each is an ``@op``, so it runs on whichever process holds the catalog file and
every client sees the same rows. Writes live beside the things they change
(``hub/registry.py``, ``training/records.py``, ``evals/record.py`` ...).
"""
from __future__ import annotations

from loradex.hub.catalog import Catalog
from loradex.hub.errors import NotFound
from loradex.hub.names import parse_ref
from loradex.hub.ops import op
from loradex.hub.registry import aliases_of, resolve


@op("adapters.show")
def adapter_detail(catalog: Catalog, ref: str, served_config: dict | None = None) -> dict:
    """An adapter with its versions, files, training run, eval scores, forgetting, judgements, reviews, merges and exports.

    ``served`` on each version is its score under the configuration it is served with
    (``served_config``, a running server's; else the default server's), or None with a note:
    the best-covered run there (most items, then newest), its n, settings, zero-effect flag
    and the latest forgetting measurement under that configuration.
    """
    parsed = parse_ref(ref)
    if parsed.version is None and parsed.alias is None:
        resolve(catalog, parsed)  # raises NotFound
        rows = catalog.query("SELECT * FROM adapter_versions WHERE adapter = ? AND status = 'ready' ORDER BY version",
                             [parsed.name])
    else:
        rows = [catalog.one("SELECT * FROM adapter_versions WHERE id = ?", [resolve(catalog, parsed)["id"]])]
    aliases = aliases_of(catalog, parsed.name)
    versions = []
    for row in rows:
        item = dict(row)
        item.pop("owner_pid", None)
        item["aliases"] = sorted(a for a, v in aliases.items() if v == row["version"])
        item["training_run"] = catalog.one(
            "SELECT id, status, duration_s, steps, final_loss, eval_loss, cost_usd, device, precision, data_sha256, "
            "loss_png, method, parent_version_id, preference FROM training_runs WHERE id = ?", [row["training_run_id"]]) if row["training_run_id"] else None
        item["evals"] = catalog.query(
            "SELECT id, data_sha256, n, metrics, paired, win_rate, config_key, serving_config, compare_key, "
            "compare_settings, identical_rate, zero_effect, created_at "
            "FROM eval_runs WHERE adapter_version_id = ? ORDER BY id", [row["id"]])
        item["forgetting"] = catalog.query(
            "SELECT id, data_path, data_sha256, n, tokens, config_key, serving_config, base_nll, adapter_nll, diff, "
            "ci_low, ci_high, method, eval_run_id, created_at FROM forgetting_runs WHERE adapter_version_id = ? "
            "ORDER BY id", [row["id"]])
        item["judgements"] = catalog.query(
            "SELECT j.id, j.eval_run_id, j.judge, j.judge_kind, j.judge_model, j.n, j.summary, j.created_at "
            "FROM judge_runs j JOIN eval_runs r ON r.id = j.eval_run_id WHERE r.adapter_version_id = ? ORDER BY j.id",
            [row["id"]])
        item["reviews"] = catalog.query(
            "SELECT id, eval_run_id, n, status, result, created_at, imported_at FROM reviews "
            "WHERE adapter_version_id = ? ORDER BY id", [row["id"]])
        item["merges"] = catalog.query(
            "SELECT id, dtype, merged_into, base_name, path FROM merges WHERE adapter_version_id = ? ORDER BY id",
            [row["id"]])
        item["exports"] = catalog.query(
            "SELECT id, format, path, size_bytes FROM exports WHERE adapter_version_id = ? ORDER BY id", [row["id"]])
        item["served"] = _served(catalog, row, served_config)
        versions.append(item)
    return {"adapter": parsed.name, "aliases": aliases, "versions": versions}


def _served(catalog: Catalog, row: dict, served_config: dict | None) -> dict:
    from loradex.evals.config import config_key, config_label
    from loradex.evals.record import describe_score, scores_for_config
    from loradex.hub.registry import served_config_for

    cfg = served_config_for(catalog, row, served_config)
    if cfg is None:
        return {"config_key": None, "config_label": None, "score": None,
                "note": f"base {row['base']!r} is not registered: nothing serves this version"}
    score = scores_for_config(catalog, cfg, version_ids=[row["id"]]).get(row["id"])
    return {"config_key": config_key(cfg), "config_label": config_label(cfg), "score": score,
            "note": describe_score(f"{row['adapter']}@{row['version']}", score, cfg)}


@op("merges.served_base")
def merged_base(catalog: Catalog, version_id: int, served_base: str) -> dict | None:
    """The newest merged model built from a version on ``served_base`` that is still a base: {base_name, path}."""
    return catalog.one(
        "SELECT m.base_name, b.path FROM merges m JOIN bases b ON b.name = m.base_name "
        "WHERE m.adapter_version_id = ? AND m.base = ? AND m.base_name IS NOT NULL ORDER BY m.id DESC LIMIT 1",
        [version_id, served_base])


@op("aliases.events")
def alias_events(catalog: Catalog, adapter: str | None = None) -> list[dict]:
    """Every alias move (newest first), with forced overrides, their reason and who made them."""
    sql = "SELECT * FROM alias_events"
    params: list = []
    if adapter:
        sql += " WHERE adapter = ?"
        params.append(adapter)
    return catalog.query(sql + " ORDER BY id DESC", params)


def _for(catalog: Catalog, table: str, columns: str, adapter: str | None) -> list[dict]:
    """Rows of ``table`` newest first: all, an adapter name's, or one version's (NAME@V / NAME@ALIAS)."""
    where, params = "", []
    if adapter:
        parsed = parse_ref(adapter)
        if parsed.version is None and parsed.alias is None:
            where, params = " WHERE adapter_version_id IN (SELECT id FROM adapter_versions WHERE adapter = ?)", [parsed.name]
        else:
            where, params = " WHERE adapter_version_id = ?", [resolve(catalog, parsed)["id"]]
    return catalog.query(f"SELECT {columns} FROM {table}{where} ORDER BY id DESC", params)


@op("runs.list")
def training_runs(catalog: Catalog, adapter: str | None = None) -> list[dict]:
    """Training runs, newest first (of one adapter name when given)."""
    sql = ("SELECT id, adapter, base, status, device, precision, quantization, steps, final_loss, eval_loss, "
           "duration_s, cost_usd, data_sha256, adapter_version_id, started_at, ended_at FROM training_runs")
    params: list = []
    if adapter:
        sql += " WHERE adapter = ?"
        params.append(parse_ref(adapter).name)
    return catalog.query(sql + " ORDER BY id DESC", params)


@op("runs.curve")
def loss_curve(catalog: Catalog, run_id: int) -> dict:
    """A run's loss curve: [[step, loss], ...], its held-out losses and the PNG's path."""
    row = catalog.one("SELECT id, loss_curve, eval_loss_before, eval_loss, final_loss, loss_png FROM training_runs "
                      "WHERE id = ?", [run_id])
    if row is None:
        raise NotFound(f"training run {run_id} not found")
    return {"run": run_id, "curve": row["loss_curve"] or [], "eval_loss_before": row["eval_loss_before"],
            "eval_loss": row["eval_loss"], "final_loss": row["final_loss"], "png": row["loss_png"]}


@op("evals.list")
def eval_runs(catalog: Catalog, adapter: str | None = None) -> list[dict]:
    """Eval runs, newest first, with the adapter version they scored."""
    rows = _for(catalog, "eval_runs", "id, adapter_version_id, base, data_path, data_sha256, n, metrics, paired, "
                "win_rate, config_key, serving_config, compare_key, compare_settings, identical_rate, zero_effect, "
                "duration_s, created_at", adapter)
    refs = {r["id"]: f"{r['adapter']}@{r['version']}" for r in catalog.query(
        "SELECT id, adapter, version FROM adapter_versions")}
    for r in rows:
        r["ref"] = refs.get(r["adapter_version_id"])
    return rows


@op("merges.list")
def merges(catalog: Catalog, adapter: str | None = None) -> list[dict]:
    """Merged models, newest first."""
    return _for(catalog, "merges", "*", adapter)


@op("exports.list")
def exports(catalog: Catalog, adapter: str | None = None) -> list[dict]:
    """Exports, newest first."""
    return _for(catalog, "exports", "*", adapter)


@op("reviews.list")
def reviews(catalog: Catalog, adapter: str | None = None) -> list[dict]:
    """Human review rounds, newest first, with their results once imported."""
    return _for(catalog, "reviews", "id, adapter_version_id, eval_run_id, sheet_path, n, status, result, created_at, "
                "imported_at", adapter)
