"""Forgetting: held-out loss on the shipped general-text set, base vs adapter, with a paired CI, and the gate.

A deliberately damaging adapter must show a significant regression and be
refused by the gate; a benign one (tiny lora_B) must not. On the tiny *random*
base there is no knowledge to forget and the final RMSNorm undoes any damage to
the hidden states, so the damaging adapter adds large random LoRA noise to the
logits themselves (lora_B ~ N(0, 0.5) on q, v **and lm_head**): +0.9 nats/token.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from loradex.evals.forgetting import GENERAL_SET, forgetting_policy, measure_forgetting, read_passages
from loradex.evals.gate import check_promotion
from loradex.evals.leaderboard import build, render_text
from loradex.evals.record import describe_score, latest_forgetting, scores_for_config
from loradex.hub.errors import InvalidConfig, InvalidData
from loradex.hub.registry import register_adapter
from tests.catalog_rows import add_run
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
BASE = [0.40, 0.45, 0.50, 0.35, 0.42, 0.48, 0.38, 0.44]
GOOD = [b + 0.20 + 0.01 * (i % 3) for i, b in enumerate(BASE)]
PASSAGES = 32  # enough for a tight CI on the tiny base, fast on one thread


def test_general_set_ships_with_the_package_and_says_its_licence():
    texts, sha, path = read_passages()
    assert Path(path) == GENERAL_SET and len(sha) == 64
    assert 200 <= len(texts) <= 300 and len(set(texts)) == len(texts)
    for t in texts:  # short plain prose: 1-3 sentences each
        assert 1 <= len(re.findall(r"[.!?](\s|$)", t)) <= 3, t
    readme = (GENERAL_SET.parent / "README.md").read_text()
    assert "CC0" in readme and "written for loradex" in readme
    pkg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/*.jsonl" in pkg["loradex.evals"]


def test_bad_forgetting_set_is_one_clear_error(tmp_path):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(InvalidData, match=r"g.jsonl:2: each line needs a non-empty \"text\""):
        read_passages(bad)
    with pytest.raises(InvalidData, match="no such file"):
        read_passages(tmp_path / "missing.jsonl")


def test_policy_from_the_environment(monkeypatch):
    monkeypatch.delenv("LORADEX_GATE_MAX_FORGETTING", raising=False)
    monkeypatch.delenv("LORADEX_GATE_REQUIRE_FORGETTING", raising=False)
    assert forgetting_policy() == (0.1, False)
    monkeypatch.setenv("LORADEX_GATE_MAX_FORGETTING", "off")
    monkeypatch.setenv("LORADEX_GATE_REQUIRE_FORGETTING", "1")
    assert forgetting_policy() == (None, True)
    monkeypatch.setenv("LORADEX_GATE_MAX_FORGETTING", "0.02")
    assert forgetting_policy()[0] == 0.02
    monkeypatch.setenv("LORADEX_GATE_MAX_FORGETTING", "-1")
    with pytest.raises(InvalidConfig, match="LORADEX_GATE_MAX_FORGETTING must be >= 0"):
        forgetting_policy()


def _register(catalog, store, tiny_base_dir, tmp_path, name: str, scale: float):
    """A LoRA on q, v and lm_head with lora_B ~ N(0, scale), saved without the (tied) embedding."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]))
    for pname, p in model.named_parameters():
        if "lora_B" in pname:
            torch.nn.init.normal_(p, std=scale)
    model.save_pretrained(tmp_path / name, save_embedding_layers=False)
    return register_adapter(catalog, store, tmp_path / name, name, base="tiny")


def test_damaging_adapter_regresses_and_the_gate_refuses_a_benign_one_passes(
        catalog, store, settings, tiny_base, tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("LORADEX_GATE_MAX_FORGETTING", raising=False)
    monkeypatch.delenv("LORADEX_GATE_REQUIRE_FORGETTING", raising=False)
    bad = _register(catalog, store, tiny_base_dir, tmp_path, "wrecker", scale=0.5)
    good = _register(catalog, store, tiny_base_dir, tmp_path, "gentle", scale=1e-4)

    f_bad = measure_forgetting(catalog, store, "wrecker@1", settings, quantize="none", device="cpu", limit=PASSAGES)
    f_good = measure_forgetting(catalog, store, "gentle@1", settings, quantize="none", device="cpu", limit=PASSAGES)
    for f in (f_bad, f_good):
        assert f["n"] == PASSAGES and f["tokens"] > PASSAGES * 5 and f["data_sha256"] == read_passages()[1]
        assert f["ci_low"] <= f["diff"] <= f["ci_high"]
        assert f["diff"] == pytest.approx(f["adapter_nll"]["mean"] - f["base_nll"]["mean"])
        assert f["config_key"].startswith("tiny@") and f["config_key"].endswith("/none/fp32/cpu")
    # same base weights and passages: the base side is identical, and the second comes from the cache
    assert f_bad["base_nll"] == f_good["base_nll"]
    assert (f_bad["base_cached"], f_good["base_cached"]) == (False, True)
    assert f_bad["ci_low"] > 0.1  # significant, and beyond the default threshold
    assert abs(f_good["diff"]) < 0.01 and f_good["ci_high"] < 0.1

    # both lift over the base on their task eval under the same configuration: only forgetting tells them apart
    cfg = f_bad["serving_config"]
    add_run(catalog, bad, GOOD, BASE, serving_config=cfg)
    add_run(catalog, good, GOOD, BASE, serving_config=cfg)
    g = check_promotion(catalog, bad, config=cfg)
    assert not g["ok"] and len(g["reasons"]) == 1 and g["forgetting"]["id"] == f_bad["id"]
    assert "forgets general text beyond the threshold" in g["reasons"][0]
    assert "+0.1 nats/token (LORADEX_GATE_MAX_FORGETTING)" in g["reasons"][0]
    g = check_promotion(catalog, good, config=cfg)
    assert g["ok"], g["reasons"]
    assert g["forgetting"]["diff"] == pytest.approx(f_good["diff"])
    # the threshold is a setting: off lets the damaging one through this check
    monkeypatch.setenv("LORADEX_GATE_MAX_FORGETTING", "off")
    assert check_promotion(catalog, bad, config=cfg)["ok"]
    monkeypatch.setenv("LORADEX_GATE_MAX_FORGETTING", str(f_bad["ci_low"] + 1))
    assert check_promotion(catalog, bad, config=cfg)["ok"]

    # shown beside the task scores: show's as-served line and the leaderboard
    score = scores_for_config(catalog, cfg, version_ids=[bad["id"]])[bad["id"]]
    assert score["forgetting"]["id"] == f_bad["id"]
    assert f"forgetting {f_bad['diff']:+.3f} nats/token" in describe_score("wrecker@1", score, cfg)
    rows = {r["ref"]: r for r in build(catalog)[0]["rows"]}
    assert rows["wrecker@1"]["forgetting"]["diff"] == pytest.approx(f_bad["diff"])
    assert f"{f_bad['diff']:+.3f} [" in render_text(build(catalog))
    # measurements under another configuration do not count for this one
    assert latest_forgetting(catalog, [bad["id"]], config_key="tiny@x/nf4/fp32/cpu") == {}


def test_gate_threshold_is_on_the_ci_lower_bound(catalog, monkeypatch):
    """A regression refuses only when the 95% CI is wholly beyond the threshold (point estimate alone is not enough)."""
    from loradex.evals.record import store_forgetting
    from tests.catalog_rows import add_version, config

    monkeypatch.delenv("LORADEX_GATE_MAX_FORGETTING", raising=False)
    monkeypatch.delenv("LORADEX_GATE_REQUIRE_FORGETTING", raising=False)
    summary = {"mean": 3.0, "n": 200, "ci_low": 2.9, "ci_high": 3.1, "method": "x", "std": 0.5}
    verdicts = []
    for i, (diff, lo, hi) in enumerate(((0.15, 0.05, 0.25), (0.15, 0.12, 0.18), (-0.02, -0.04, 0.0)), 1):
        v = add_version(catalog, "bot", i)
        add_run(catalog, v, GOOD, BASE, serving_config=config())
        store_forgetting(catalog, {"adapter_version_id": v["id"], "base": "tiny", "data_path": "general.jsonl",
                                   "data_sha256": "c" * 64, "n": 200, "tokens": 5000, "serving_config": config(),
                                   "base_nll": summary, "adapter_nll": dict(summary, mean=3.0 + diff), "diff": diff,
                                   "ci_low": lo, "ci_high": hi, "method": "paired-bootstrap"})
        verdicts.append(check_promotion(catalog, v, config=config())["ok"])
    assert verdicts == [True, False, True]
    # a measurement under another configuration does not count for this one
    assert check_promotion(catalog, add_version(catalog, "bot", 9), config=config("nf4"))["forgetting"] is None


def test_required_measurement_refuses_when_missing(catalog, tiny_base, monkeypatch):
    from tests.catalog_rows import add_version, config

    monkeypatch.setenv("LORADEX_GATE_REQUIRE_FORGETTING", "1")
    v = add_version(catalog, "bot", 1)
    add_run(catalog, v, GOOD, BASE, serving_config=config())
    g = check_promotion(catalog, v, config=config())
    assert not g["ok"] and "no forgetting measurement" in g["reasons"][0]
    assert "loradex eval bot@1 --forgetting" in g["reasons"][0]


def test_cli_forgetting_alone(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    _register(catalog, store, tiny_base_dir, tmp_path, "gentle", scale=1e-4)
    catalog.close()
    small = tmp_path / "general.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in read_passages()[0][:12]))
    r = run_cli("eval", "gentle", "--forgetting", "--forgetting-data", str(small), "--quantize", "none",
                "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["forgetting"]["n"] == 12 and out["forgetting"]["eval_run_id"] is None
    assert out["gate"]["ok"] is False and "has no eval" in out["gate"]["reasons"][0]
    r = run_cli("eval", "gentle", "--device", "cpu")
    assert r.returncode == 2 and "--data FILE is required" in r.stderr and "--forgetting alone" in r.stderr


@pytest.mark.slow
def test_real_base_demo_adapter_vs_damaged_copy(catalog, store, settings, smollm, tmp_path, monkeypatch, capsys):
    """Default base, all 236 passages: the shipped pirate demo adapter vs a copy with lora_B x 30; prints the cost."""
    import shutil
    import time

    import torch
    from safetensors.torch import load_file, save_file

    monkeypatch.delenv("LORADEX_GATE_MAX_FORGETTING", raising=False)
    demo = ROOT / "examples" / "demo-adapters" / "pirate"
    damaged = tmp_path / "damaged"
    shutil.copytree(demo, damaged)
    weights = load_file(damaged / "adapter_model.safetensors")
    save_file({k: (v * 30 if "lora_B" in k else v).contiguous() for k, v in weights.items()},
              str(damaged / "adapter_model.safetensors"))
    register_adapter(catalog, store, demo, "pirate", base=smollm["name"])
    register_adapter(catalog, store, damaged, "damaged", base=smollm["name"])
    torch.set_num_threads(1)
    results = {}
    for name in ("pirate", "damaged"):
        t = time.perf_counter()
        results[name] = measure_forgetting(catalog, store, name, settings, quantize="none", device="cpu")
        results[name]["wall_s"] = time.perf_counter() - t
    with capsys.disabled():
        for name, f in results.items():
            print(f"\n{name}: {f['n']} passages, {f['tokens']} tokens, base {f['base_nll']['mean']:.3f} -> adapter "
                  f"{f['adapter_nll']['mean']:.3f} nats/token, change {f['diff']:+.4f} [{f['ci_low']:+.4f}, "
                  f"{f['ci_high']:+.4f}]; scoring both sides {f['score_s']:.1f}s, whole call {f['wall_s']:.1f}s")
    assert results["damaged"]["ci_low"] > 0.1
    assert results["pirate"]["diff"] < results["damaged"]["ci_low"]


def test_forgetting_ops_survive_the_op_wire(catalog):
    """Through a server (`@op`): the cache tuple and the {version id: row} result come back as they left."""
    from loradex.evals.record import store_forgetting
    from tests.catalog_rows import add_version, config

    v = add_version(catalog, "bot", 1)
    summary = {"mean": 3.0, "n": 2, "ci_low": 2.9, "ci_high": 3.1, "method": "x", "std": 0.5}
    row = {"adapter_version_id": v["id"], "base": "tiny", "data_path": "general.jsonl", "data_sha256": "c" * 64,
           "n": 2, "tokens": 50, "serving_config": config(), "base_nll": summary, "adapter_nll": summary, "diff": 0.0,
           "ci_low": 0.0, "ci_high": 0.0, "method": "paired-bootstrap"}
    cache = ("k" * 64, "tiny", {"nll": [3.0, 3.0]})
    entry = store_forgetting.op
    args = json.loads(json.dumps(entry.dump_args((row, cache), {})))
    assert entry.load_args(args) == {"row": row, "cache": cache}
    store_forgetting(catalog, row, cache)
    local = latest_forgetting(catalog, [v["id"]])
    wire = json.loads(json.dumps(latest_forgetting.op.dump_result(local)))
    back = latest_forgetting.op.load_result(wire)
    assert list(back) == [v["id"]] and back[v["id"]]["diff"] == 0.0
    assert catalog.one("SELECT payload FROM base_eval_cache WHERE key = ?", ["k" * 64])["payload"] == {"nll": [3.0, 3.0]}
