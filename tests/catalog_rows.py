"""Constructed catalog rows for the gate, review and leaderboard tests: no model needed, no tests here.

``add_version`` inserts a ready adapter version, ``add_run`` an eval run with per-item
adapter and base scores (and their intervals, through ``evals.record.store_run``).
"""
from __future__ import annotations

from loradex.evals import stats
from loradex.evals.record import store_run
from loradex.hub.catalog import utcnow

DATA_A = "a" * 64
DATA_B = "b" * 64


def add_version(catalog, name: str, version: int, base: str = "tiny") -> dict:
    with catalog.transaction() as cur:
        if not cur.execute("SELECT 1 FROM adapters WHERE name = ?", [name]).fetchone():
            cur.execute("INSERT INTO adapters VALUES (?, NULL, ?)", [name, utcnow()])
        vid = cur.execute(
            "INSERT INTO adapter_versions (adapter, version, base, digest, path, files, size_bytes, peft_type, rank, "
            "alpha, target_modules, param_count, features, source, status, created_at) VALUES "
            "(?, ?, ?, ?, ?, '{}', 0, 'LORA', 8, 16, '[\"q_proj\"]', 1, '{}', 'test', 'ready', ?) RETURNING id",
            [name, version, base, f"{name}-{version}".ljust(64, "0"), f"snapshots/{name}-{version}", utcnow()],
        ).fetchone()[0]
    return catalog.one("SELECT * FROM adapter_versions WHERE id = ?", [vid])


def config(quantize: str = "none", *, base: str = "tiny", dtype: str = "fp32", device: str = "cpu") -> dict:
    """A serving configuration as evaluate() records it, for a base whose files are {"model.safetensors": "0..0"}."""
    from loradex.evals.config import serving_config

    return serving_config({"name": base, "files": {"model.safetensors": "0" * 64}}, quantize, dtype, device)


def add_run(catalog, version: dict, adapter_scores: list[float], base_scores: list[float], *, metric: str = "similarity",
            data_sha: str = DATA_A, outputs: list[str] | None = None, serving_config: dict | None = None,
            base_outputs: list[str] | None = None, max_new_tokens: int = 8) -> dict:
    """An eval run whose summaries are computed from the given per-item scores, as evaluate() would.

    ``serving_config``: what the run measured (see ``config()``); None stores an unknown configuration.
    ``base_outputs`` equal to ``outputs`` make a zero-effect run; ``max_new_tokens`` is a decoding setting.
    """
    n = len(adapter_scores)
    binary = metric == "exact"
    higher = metric != "perplexity"
    paired = stats.paired_difference(adapter_scores, base_scores)
    paired["higher_is_better"] = higher
    run = {
        "adapter_version_id": version["id"], "base": version["base"], "data_path": f"/data/{data_sha[:4]}.jsonl",
        "data_sha256": data_sha, "n": n,
        "metrics": {metric: stats.summarize(adapter_scores, binary=binary)},
        "base_metrics": {metric: stats.summarize(base_scores, binary=binary)},
        "paired": {metric: paired},
        "win_rate": dict(stats.win_rate(adapter_scores, base_scores, higher_is_better=higher), metric=metric),
        "decoding": {"primary_metric": metric, "max_new_tokens": max_new_tokens}, "metric_model": None, "seed": 0, "duration_s": 1.0,
        "serving_config": serving_config,
    }
    outputs = outputs or [f"adapter answer {i}" for i in range(n)]
    base_outputs = base_outputs or [f"base answer {i}" for i in range(n)]
    samples = [{"idx": i, "prompt": f"question {i}?", "reference": f"reference {i}", "output": outputs[i],
                "base_output": base_outputs[i], "scores": {metric: adapter_scores[i]},
                "base_scores": {metric: base_scores[i]}} for i in range(n)]
    return store_run(catalog, run, samples)


def set_production(catalog, name: str, version: int) -> None:
    with catalog.transaction() as cur:
        cur.execute("DELETE FROM aliases WHERE adapter = ? AND alias = 'production'", [name])
        cur.execute("INSERT INTO aliases VALUES (?, 'production', ?, ?)", [name, version, utcnow()])


__all__ = ["DATA_A", "DATA_B", "add_version", "add_run", "config", "set_production"]
