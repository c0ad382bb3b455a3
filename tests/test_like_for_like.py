"""Like for like: runs of different size or settings are never ranked or gated against each other; zero-effect runs.

The story of issue 14: a quick ``--limit 6 --max-new-tokens 8`` run of pirate@1
replaced its full 20-item run everywhere. Here it must not: the full run keeps
its place in the leaderboard, in a server's listing and in the gate, the quick
one gets its own (partial) section, and n and the settings are shown.
"""
from __future__ import annotations

import json

import pytest

from loradex.evals.gate import check_promotion
from loradex.evals.leaderboard import build, render_text
from loradex.evals.record import (ZERO_EFFECT_MIN_IDENTICAL, comparison_key, comparison_settings, describe_score,
                                  get_run, identical_rate, scores_for_config, zero_effect_line)
from tests.catalog_rows import add_run, add_version, config, set_production
from tests.helpers import make_adapter, run_cli

FULL_BASE = [0.40 + 0.01 * (i % 5) for i in range(20)]
FULL = [b + 0.25 for b in FULL_BASE]
QUICK_BASE = FULL_BASE[:6]
QUICK = [b + 0.05 * (1 if i % 2 else -1) for i, b in enumerate(QUICK_BASE)]  # noisy: no clear lift on 6 items
CFG = config("nf4")


def test_quick_run_does_not_displace_the_full_run(catalog):
    pirate, other = add_version(catalog, "pirate", 1), add_version(catalog, "other", 1)
    full = add_run(catalog, pirate, FULL, FULL_BASE, serving_config=CFG, max_new_tokens=64)
    add_run(catalog, other, [b + 0.1 for b in FULL_BASE], FULL_BASE, serving_config=CFG, max_new_tokens=64)
    quick = add_run(catalog, pirate, QUICK, QUICK_BASE, serving_config=CFG, max_new_tokens=8)  # newest
    assert full["compare_key"] != quick["compare_key"]
    assert full["compare_settings"]["n"] == 20 and quick["compare_settings"]["decoding"]["max_new_tokens"] == 8

    sections = build(catalog)
    assert [(s["n"], s["coverage"]) for s in sections] == [(20, "full"), (6, "partial")]
    main, part = sections
    assert [r["ref"] for r in main["rows"]] == ["pirate@1", "other@1"]
    assert main["rows"][0]["eval_run_id"] == full["id"] and main["rows"][0]["n"] == 20
    assert [r["eval_run_id"] for r in part["rows"]] == [quick["id"]] and part["full_n"] == 20
    assert main["settings_label"] == "n=20, max_new_tokens=64, similarity"
    text = render_text(sections)
    assert "settings: n=20, max_new_tokens=64, similarity" in text
    assert "PARTIAL (quick run: n=6 of the 20 items of the full board above" in text
    assert text.index("n=20, max_new_tokens=64") < text.index("PARTIAL")

    # a server's listing (show, /v1/models) and the gate take the full run, and say n
    score = scores_for_config(catalog, CFG, version_ids=[pirate["id"]])[pirate["id"]]
    assert score["eval_run_id"] == full["id"] and score["n"] == 20 and score["newer_smaller_runs"] == 1
    line = describe_score("pirate@1", score, CFG)
    assert "(n=20, nf4/fp32 cpu" in line and "max_new_tokens=64" in line and "1 newer run(s) on fewer items" in line
    g = check_promotion(catalog, pirate, config=CFG)
    assert g["ok"], g["reasons"]
    assert g["eval_run_id"] == full["id"] and g["settings"].startswith("n=20")

    # a later full run with the same settings is the one that counts (newest among the best-covered)
    again = add_run(catalog, pirate, [b + 0.3 for b in FULL_BASE], FULL_BASE, serving_config=CFG, max_new_tokens=64)
    assert again["compare_key"] == full["compare_key"]
    assert scores_for_config(catalog, CFG)[pirate["id"]]["eval_run_id"] == again["id"]
    assert build(catalog)[0]["rows"][0]["eval_run_id"] == again["id"]


def test_gate_compares_production_only_like_for_like(catalog):
    v1 = add_version(catalog, "bot", 1)
    add_run(catalog, v1, [b + 0.3 for b in FULL_BASE], FULL_BASE, serving_config=CFG, max_new_tokens=64)
    set_production(catalog, "bot", 1)
    v2 = add_version(catalog, "bot", 2)
    add_run(catalog, v2, [b + 0.2 for b in FULL_BASE], FULL_BASE, serving_config=CFG, max_new_tokens=8)
    g = check_promotion(catalog, v2, config=CFG)
    assert not g["ok"] and len(g["reasons"]) == 1 and g["production"]["comparable"] is False
    reason = g["reasons"][0]
    assert "cannot be compared with production bot@1 like for like" in reason
    assert "n=20, max_new_tokens=8, similarity" in reason and "production has: data aaaaaaaaaaaa, n=20, max_new_tokens=64" in reason
    # the same settings make them comparable: then the worse one is refused on the numbers, n shown
    add_run(catalog, v2, [b + 0.2 for b in FULL_BASE], FULL_BASE, serving_config=CFG, max_new_tokens=64)
    g = check_promotion(catalog, v2, config=CFG)
    assert not g["ok"] and "worse than production bot@1 on the same data and settings" in g["reasons"][0]
    assert "n=20, max_new_tokens=64" in g["reasons"][0] and g["production"]["paired"]["n"] == 20
    # a quick run of production does not count against a full candidate either
    v3 = add_version(catalog, "bot", 3)
    add_run(catalog, v3, [b + 0.35 for b in FULL_BASE], FULL_BASE, serving_config=CFG, max_new_tokens=64)
    add_run(catalog, v1, [b + 0.9 for b in QUICK_BASE], QUICK_BASE, serving_config=CFG, max_new_tokens=64)
    g = check_promotion(catalog, v3, config=CFG)
    assert g["ok"], g["reasons"]
    assert g["production"]["difference"] == pytest.approx(0.05) and g["production"]["settings"].startswith("n=20")


def test_zero_effect_is_flagged_marked_and_refused(catalog):
    outs = [f"same answer {i}" for i in range(20)]
    base_outs = list(outs)
    base_outs[3] = "one different answer"  # 19/20 = 95%: still zero effect
    v = add_version(catalog, "lazy", 1)
    run = add_run(catalog, v, FULL, FULL_BASE, outputs=outs, base_outputs=base_outs, serving_config=CFG)
    assert run["identical_rate"] == pytest.approx(0.95) and run["zero_effect"] is True
    line = zero_effect_line(get_run(catalog, run["id"]))
    assert line.startswith("ZERO EFFECT: lazy@1's outputs equal the base's on 19/20 items (95%")
    g = check_promotion(catalog, v, config=CFG)
    assert not g["ok"] and g["zero_effect"] is True
    assert any("it has zero effect: its outputs equal base tiny's on 19/20 items" in r for r in g["reasons"])
    rows = build(catalog)[0]["rows"]
    assert rows[0]["zero_effect"] is True and "lazy@1 ZERO-EFFECT" in render_text(build(catalog))
    score = scores_for_config(catalog, CFG)[v["id"]]
    assert "ZERO EFFECT" in describe_score("lazy@1", score, CFG)
    # 18/20 differ: an adapter that changes something is not flagged
    base_outs[4] = "another different answer"
    v2 = add_version(catalog, "lazy", 2)
    run2 = add_run(catalog, v2, FULL, FULL_BASE, outputs=outs, base_outputs=base_outs, serving_config=CFG)
    assert run2["identical_rate"] == pytest.approx(0.90) and run2["zero_effect"] is False
    assert check_promotion(catalog, v2, config=CFG)["ok"]
    assert ZERO_EFFECT_MIN_IDENTICAL == 0.95


def test_identical_rate_without_generated_text_uses_scores():
    same = [{"output": None, "base_output": None, "scores": {"perplexity": 5.0}, "base_scores": {"perplexity": 5.0}}]
    diff = [{"output": None, "base_output": None, "scores": {"perplexity": 5.0}, "base_scores": {"perplexity": 6.0}}]
    assert identical_rate(same * 3) == 1.0 and identical_rate(diff + same) == 0.5
    assert identical_rate([]) is None


def test_migration_008_backfills_keys_and_flags(tmp_path):
    import duckdb

    from loradex.hub import migrations
    from loradex.hub.catalog import Catalog, to_json, utcnow

    path = str(tmp_path / "old.duckdb")
    conn = duckdb.connect(path)
    cur = conn.cursor()
    migrations.apply(cur, [m for m in migrations.MIGRATIONS if m[0] < "008"])
    decoding = {"max_new_tokens": 16, "strategy": "greedy", "batch_size": 4, "quantize": "none", "dtype": "float32",
                "device": "cpu", "eval_config": {"metrics": ["exact"]}}
    for rid, (out, base_out) in enumerate((("a", "a"), ("a", "b")), 1):
        cur.execute("INSERT INTO eval_runs (adapter_version_id, base, data_sha256, n, metrics, decoding, config_key, "
                    "created_at) VALUES (1, 'tiny', ?, 1, '{\"exact\": {}}', ?, 'k', ?)", ["a" * 64, to_json(decoding), utcnow()])
        cur.execute("INSERT INTO eval_samples VALUES (?, 0, 'p', 'r', ?, ?, '{}', '{}')", [rid, out, base_out])
    conn.close()

    cat = Catalog.open(path, wait_s=5)
    try:
        rows = cat.query("SELECT * FROM eval_runs ORDER BY id")
        assert cat.query("SELECT count(*) AS c FROM forgetting_runs")[0]["c"] == 0
    finally:
        cat.close()
    want = comparison_settings({"base": "tiny", "data_sha256": "a" * 64, "n": 1, "decoding": decoding,
                                "metric_model": None, "config_key": "k"})
    assert want == {"data_sha256": "a" * 64, "n": 1, "metrics": ["exact"], "base": "tiny", "config_key": "k",
                    "metric_model": None, "decoding": {"max_new_tokens": 16, "strategy": "greedy"}}
    assert rows[0]["compare_key"] == rows[1]["compare_key"] == comparison_key(want)
    assert rows[0]["compare_settings"] == want
    assert (rows[0]["zero_effect"], rows[1]["zero_effect"]) == (True, False)


def test_cli_eval_says_zero_effect_in_one_stderr_line(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    from loradex.hub.registry import register_adapter

    noop = make_adapter(tiny_base_dir, tmp_path / "noop", r=4, alpha=8, noop=True)
    register_adapter(catalog, store, noop, "noop", base="tiny", allow_noop=True)
    catalog.close()
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "x"}) + "\n" for p in ("Hi.", "Name a colour.", "Count.")))
    r = run_cli("eval", "noop", "--data", str(data), "--metrics", "exact", "--max-new-tokens", "3", "--quantize", "none",
                "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    loud = [line for line in r.stderr.splitlines() if "ZERO EFFECT" in line]
    assert len(loud) == 1 and loud[0].startswith("loradex: ZERO EFFECT: noop@1's outputs equal the base's on 3/3 items")
    assert "ZERO EFFECT" in r.stdout and "it has zero effect" in r.stdout  # the report and the gate's verdict
