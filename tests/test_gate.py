"""The promotion gate on constructed eval rows: no eval, no lift, worse than production, pass."""
from __future__ import annotations

import json

import pytest

from loradex.evals.gate import check_promotion
from tests.catalog_rows import DATA_A, DATA_B, add_run, add_version, set_production
from tests.helpers import run_cli

BASE = [0.40, 0.45, 0.50, 0.35, 0.42, 0.48, 0.38, 0.44]
GOOD = [b + 0.20 + 0.01 * (i % 3) for i, b in enumerate(BASE)]
BETTER = [b + 0.30 + 0.01 * (i % 2) for i, b in enumerate(BASE)]
NOISE = [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(BASE)]


def test_refuses_without_eval(catalog):
    v = add_version(catalog, "bot", 1)
    g = check_promotion(catalog, v)
    assert g["ok"] is False and g["eval_run_id"] is None
    assert g["reasons"] == ["bot@1 has no eval: run `loradex eval bot@1 --data FILE` first"]


def test_passes_with_positive_lift_and_reports_numbers(catalog):
    v = add_version(catalog, "bot", 1)
    run = add_run(catalog, v, GOOD, BASE)
    g = check_promotion(catalog, v)
    assert g["ok"] is True and g["reasons"] == []
    assert g["metric"] == "similarity" and g["eval_run_id"] == run["id"]
    assert g["lift"]["diff"] == pytest.approx(run["paired"]["similarity"]["diff"]) and g["lift"]["ci_low"] > 0


def test_refuses_when_lift_ci_includes_zero(catalog):
    v = add_version(catalog, "bot", 1)
    add_run(catalog, v, NOISE, BASE)
    g = check_promotion(catalog, v)
    assert not g["ok"] and g["lift"]["ci_low"] <= 0 < g["lift"]["ci_high"]
    assert "not positive at 95%" in g["reasons"][0] and "similarity +0.0000" in g["reasons"][0]
    assert f"[95% CI {g['lift']['ci_low']:+.4f}, {g['lift']['ci_high']:+.4f}]" in g["reasons"][0]


def test_uses_latest_run(catalog):
    v = add_version(catalog, "bot", 1)
    add_run(catalog, v, NOISE, BASE)
    add_run(catalog, v, GOOD, BASE)
    assert check_promotion(catalog, v)["ok"]


def test_perplexity_sign_is_flipped(catalog):
    base_ppl = [12.0, 15.0, 9.0, 20.0, 11.0, 14.0]
    lower = [p * 0.6 for p in base_ppl]
    v = add_version(catalog, "bot", 1)
    add_run(catalog, v, lower, base_ppl, metric="perplexity")
    g = check_promotion(catalog, v)
    assert g["ok"] and g["metric"] == "perplexity" and g["lift"]["diff"] > 0 and g["lift"]["sign_flipped"]
    v2 = add_version(catalog, "bot", 2)
    add_run(catalog, v2, [p * 1.5 for p in base_ppl], base_ppl, metric="perplexity")
    g2 = check_promotion(catalog, v2)
    assert not g2["ok"] and g2["lift"]["diff"] < 0 and "sign flipped" in g2["reasons"][0]


def test_refuses_when_worse_than_production_on_same_data(catalog):
    v1 = add_version(catalog, "bot", 1)
    add_run(catalog, v1, BETTER, BASE)
    set_production(catalog, "bot", 1)
    v2 = add_version(catalog, "bot", 2)
    add_run(catalog, v2, GOOD, BASE)  # lifts over base, but less than v1
    g = check_promotion(catalog, v2)
    assert not g["ok"] and len(g["reasons"]) == 1
    assert g["lift"]["ci_low"] > 0
    prod = g["production"]
    assert prod["version"] == 1 and prod["candidate_mean"] < prod["mean"] and prod["paired"]["ci_high"] < 0
    assert "worse than production bot@1" in g["reasons"][0]
    assert f"similarity {prod['candidate_mean']:.4f} vs {prod['mean']:.4f}" in g["reasons"][0]
    # and the better one may replace production
    v3 = add_version(catalog, "bot", 3)
    add_run(catalog, v3, [x + 0.05 for x in BETTER], BASE)
    g3 = check_promotion(catalog, v3)
    assert g3["ok"], g3["reasons"]
    assert g3["production"]["difference"] == pytest.approx(0.05)


def test_refuses_when_production_has_no_eval_on_the_same_data(catalog):
    v1 = add_version(catalog, "bot", 1)
    add_run(catalog, v1, BETTER, BASE, data_sha=DATA_B)
    set_production(catalog, "bot", 1)
    v2 = add_version(catalog, "bot", 2)
    add_run(catalog, v2, GOOD, BASE, data_sha=DATA_A)
    g = check_promotion(catalog, v2)
    assert not g["ok"] and "cannot be compared with production bot@1" in g["reasons"][0]
    # an older candidate run on production's data makes them comparable
    add_run(catalog, v2, [x + 0.2 for x in BETTER], BASE, data_sha=DATA_B)
    add_run(catalog, v2, GOOD, BASE, data_sha=DATA_A)
    g = check_promotion(catalog, v2)
    assert g["ok"] and g["production"]["data_sha256"] == DATA_B


def test_same_version_already_production_is_not_compared_with_itself(catalog):
    v1 = add_version(catalog, "bot", 1)
    add_run(catalog, v1, GOOD, BASE)
    set_production(catalog, "bot", 1)
    g = check_promotion(catalog, v1)
    assert g["ok"] and g["production"] is None


def test_cli_alias_set_production_is_gated_and_force_is_recorded(catalog):
    v1 = add_version(catalog, "bot", 1)
    add_run(catalog, v1, NOISE, BASE)
    catalog.close()
    r = run_cli("alias", "set", "bot@1", "production")
    assert r.returncode == 6 and r.stderr.count("\n") == 1
    assert "not positive at 95%" in r.stderr and "95% CI" in r.stderr
    r = run_cli("alias", "set", "bot@1", "production", "--force", "--json")
    assert r.returncode == 2 and "--force needs --reason" in r.stderr  # an override says why
    r = run_cli("alias", "set", "bot@1", "production", "--force", "--reason", "hotfix, eval pending", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["forced"] is True and out["gate"]["ok"] is False
    from loradex.hub.catalog import Catalog
    from loradex.hub.settings import Settings

    with Catalog.open(Settings().catalog_path) as cat:
        ev = cat.one("SELECT forced, gate, reason FROM alias_events WHERE adapter = 'bot' ORDER BY id DESC LIMIT 1")
    assert ev["forced"] is True and ev["gate"]["lift"]["ci_low"] <= 0 and ev["reason"] == "hotfix, eval pending"
