"""Catalog latency with 10,000 adapter versions: register, list and show.

    bulk: 1,000 names x 10 versions inserted with one SQL statement each (fast, no files)
    then, interleaved, ``catalog_reps`` rounds of:
      register  a real r=16 adapter (validate, hash, copy into the store, two commits)
      list      ``list_adapters`` over every ready version (what ``loradex list`` reads)
      show      ``resolve`` + the per-version queries ``loradex show NAME`` makes
      cli-show  ``loradex show NAME --json`` in-process: open + migrate check + render + close
      cli-list  ``loradex list --json`` in-process, all 10,000 rows rendered

The targets are loradex's own interactive budgets:
show and register well under a second, a 10,000-row list within one.
"""
from __future__ import annotations

import contextlib
import io
import time

from benchmarks.common import Metric, Report, interleave, log, percentile
from benchmarks.workspace import Workspace

NAME = "catalog"
VERSIONS_PER_NAME = 10
TARGET_REGISTER_MS = 1000.0
TARGET_SHOW_MS = 100.0
TARGET_LIST_MS = 1000.0


def bulk_insert(cat, base: str, rows: int) -> None:
    """Insert ``rows`` ready adapter versions (and their names and some aliases) with plain SQL."""
    names = -(-rows // VERSIONS_PER_NAME)
    v = VERSIONS_PER_NAME
    with cat.transaction() as cur:
        cur.execute(
            "INSERT INTO adapters SELECT 'bulk-' || i, 'bulk benchmark row', now()::TIMESTAMP FROM range(?) t(i)",
            [names],
        )
        cur.execute(
            f"""
            INSERT INTO adapter_versions (adapter, version, base, digest, path, files, size_bytes, peft_type, rank,
                alpha, target_modules, param_count, features, quantization, source, status, owner_pid,
                training_run_id, created_at)
            SELECT 'bulk-' || (i // {v}), (i % {v}) + 1, ?, md5('a' || i) || md5('b' || i),
                'snapshots/' || md5('a' || i) || md5('b' || i),
                json_object('adapter_config.json', md5('c' || i), 'adapter_model.safetensors', md5('d' || i)),
                3700000, 'LORA', 16, 32.0, '["q_proj", "v_proj"]'::JSON, 921600,
                '{{"bias": "none", "dora": false, "rslora": false, "modules_to_save": []}}'::JSON,
                NULL, 'benchmark-bulk', 'ready', NULL, NULL, now()::TIMESTAMP
            FROM range(?) t(i)
            """,
            [base, rows],
        )
        cur.execute(
            f"INSERT INTO aliases SELECT 'bulk-' || i, 'production', {v}, now()::TIMESTAMP FROM range(0, ?, 10) t(i)",
            [names],
        )


def _show(cat, name: str) -> dict:
    """What ``loradex show NAME`` reads, without rendering."""
    from loradex.hub.names import parse_ref
    from loradex.hub.registry import aliases_of, resolve

    ref = parse_ref(name)
    resolve(cat, ref)
    rows = cat.query("SELECT * FROM adapter_versions WHERE adapter = ? AND status = 'ready' ORDER BY version",
                     [ref.name])
    aliases = aliases_of(cat, ref.name)
    for row in rows:
        cat.query("SELECT id, data_sha256, n, metrics FROM eval_runs WHERE adapter_version_id = ?", [row["id"]])
        cat.query("SELECT id FROM merges WHERE adapter_version_id = ?", [row["id"]])
        cat.query("SELECT id FROM exports WHERE adapter_version_id = ?", [row["id"]])
    return {"aliases": aliases, "versions": rows}


def _cli(*args: str) -> None:
    from loradex.cli import main

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        code = main([*args, "--json"])
    if code != 0:
        raise RuntimeError(f"loradex {' '.join(args)} exited {code}")


def run(ws: Workspace, report: Report) -> dict:
    from loradex.hub.registry import list_adapters, register_adapter

    sizes = ws.sizes
    n_reg = sizes.catalog_reps + sizes.warmup
    folders = [ws.make_adapter(f"catalog-reg-{i}", seed=10_000 + i) for i in range(n_reg)]
    t0 = time.perf_counter()
    with ws.catalog() as cat:
        bulk_insert(cat, ws.base_name, sizes.catalog_rows)
        total = cat.one("SELECT count(*) AS n FROM adapter_versions WHERE status = 'ready'")["n"]
    bulk_s = time.perf_counter() - t0
    log(f"catalog: {total} versions in the catalog after a {bulk_s:.1f}s bulk insert")
    show_name = f"bulk-{(sizes.catalog_rows // VERSIONS_PER_NAME) // 2}"
    pending = list(folders)
    listed: list[int] = []

    with ws.catalog() as cat:
        def register() -> float:
            folder = pending.pop(0)
            t = time.perf_counter()
            register_adapter(cat, ws.store, folder, "catalog-reg", base=ws.base_name, source="benchmark")
            return time.perf_counter() - t

        def list_all() -> float:
            t = time.perf_counter()
            rows = list_adapters(cat)
            listed.append(len(rows))
            return time.perf_counter() - t

        def show() -> float:
            t = time.perf_counter()
            _show(cat, show_name)
            return time.perf_counter() - t

        api = interleave({"register": register, "list": list_all, "show": show},
                         reps=sizes.catalog_reps, warmup=sizes.warmup)

    def cli_show() -> float:
        t = time.perf_counter()
        _cli("show", show_name)
        return time.perf_counter() - t

    def cli_list() -> float:
        t = time.perf_counter()
        _cli("list")
        return time.perf_counter() - t

    cli = interleave({"show": cli_show, "list": cli_list}, reps=sizes.catalog_reps, warmup=sizes.warmup)

    ms = {k: [s * 1000 for s in v] for k, v in api.items()}
    cli_ms = {k: [s * 1000 for s in v] for k, v in cli.items()}
    rows_note = f"{total:,} versions"
    report.add(Metric("catalog.register_ms_p50", ms["register"], "ms", TARGET_REGISTER_MS, "<=",
                      f"register r={sizes.rank} adapter, {rows_note}"))
    report.add(Metric("catalog.register_ms_p95", [percentile(ms["register"], 95)], "ms", TARGET_REGISTER_MS, "<="))
    report.add(Metric("catalog.list_ms_p50", ms["list"], "ms", TARGET_LIST_MS, "<=", f"list_adapters -> {listed[-1]:,} rows"))
    report.add(Metric("catalog.list_ms_p95", [percentile(ms["list"], 95)], "ms", TARGET_LIST_MS, "<="))
    report.add(Metric("catalog.show_ms_p50", ms["show"], "ms", TARGET_SHOW_MS, "<=", f"show {show_name} ({VERSIONS_PER_NAME} versions)"))
    report.add(Metric("catalog.show_ms_p95", [percentile(ms["show"], 95)], "ms", TARGET_SHOW_MS, "<="))
    report.add(Metric("catalog.cli_show_ms_p50", cli_ms["show"], "ms", TARGET_SHOW_MS * 2, "<=",
                      "`loradex show --json` in-process incl. open/close"))
    report.add(Metric("catalog.cli_list_ms_p50", cli_ms["list"], "ms", TARGET_LIST_MS * 2, "<=",
                      f"`loradex list --json`, {total:,} rows rendered"))
    return {"versions": total, "bulk_insert_s": bulk_s, "show_name": show_name}
