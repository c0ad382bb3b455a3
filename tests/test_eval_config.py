"""A score must describe what is served: eval runs record their serving configuration.

Real evals on the tiny random Llama record {base, digest, quantize, dtype, device,
engine}; constructed rows check that the leaderboard, the gate and
``scores_for_config`` never mix configurations; the 007 migration backfills old rows.
"""
from __future__ import annotations

import json

import pytest

from loradex.evals import evaluate
from loradex.evals.config import (EVAL_ENGINE, SERVE_ENGINE, config_key, default_served_config, config_label, from_decoding, is_served_default, served_default,
                          served_warning, serving_config)
from loradex.evals.gate import check_promotion
from loradex.evals.leaderboard import build, render_text
from loradex.evals.record import describe_score, scores_for_config
from loradex.hub.errors import InvalidConfig
from loradex.hub.registry import register_adapter
from loradex.hub.store import manifest_digest
from tests.catalog_rows import DATA_A, add_run, add_version, config, set_production
from tests.helpers import make_adapter, run_cli

BASE = [0.40, 0.45, 0.50, 0.35, 0.42, 0.48, 0.38, 0.44]
GOOD = [b + 0.20 + 0.01 * (i % 3) for i, b in enumerate(BASE)]
WORSE = [b + 0.05 + 0.01 * (i % 3) for i, b in enumerate(BASE)]
NONE, NF4 = config("none"), config("nf4")


# -- the key ---------------------------------------------------------------------


def test_config_key_and_label():
    cfg = serving_config({"name": "tiny", "files": {"a.safetensors": "1" * 64}}, "nf4", "torch.float32", "cuda:1")
    digest = manifest_digest({"a.safetensors": "1" * 64})
    assert cfg == {"base": "tiny", "base_digest": digest, "quantize": "nf4", "dtype": "fp32", "device": "cuda",
                   "engine": EVAL_ENGINE}
    assert config_key(cfg) == f"tiny@{digest[:12]}/nf4/fp32/cuda"
    # the engine is recorded, not compared: the server's config has the same key
    assert config_key(dict(cfg, engine="loradex-engine")) == config_key(cfg)
    assert config_label(cfg) == "nf4/fp32 cuda" and config_label(None) == "unknown" and config_key(None) is None
    with pytest.raises(InvalidConfig, match="--quantize"):
        serving_config({"name": "tiny", "files": {}}, "nf8", "fp32", "cpu")
    with pytest.raises(InvalidConfig, match="--dtype"):
        serving_config({"name": "tiny", "files": {}}, "nf4", "float64", "cpu")


def test_served_default_is_the_servers():
    from loradex.serving.config import EngineConfig

    assert served_default() == {"quantize": EngineConfig().quantize, "dtype": EngineConfig().dtype}
    assert is_served_default(NF4) and not is_served_default(NONE)
    assert not is_served_default(config("nf4", dtype="bf16"))  # CPU server computes in fp32 by default
    assert is_served_default(config("nf4", dtype="bf16", device="cuda"))
    base = {"name": "tiny", "files": {"model.safetensors": "0" * 64}}
    served = default_served_config(base, "cpu")
    assert served["engine"] == "loradex-engine" and config_key(served) == config_key(NF4) and is_served_default(served)
    assert config_key(default_served_config(base, "cuda:0")).endswith("/nf4/bf16/cuda")


# -- real evals on the tiny model ----------------------------------------------------


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    rows = [{"prompt": p, "completion": f"answer {i}"} for i, p in enumerate(["Say hi.", "Name a colour.", "Count."])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def tiny_adapter(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    folder = make_adapter(tiny_base_dir, tmp_path / "ad", r=4, alpha=8, scale=0.5, seed=1)
    return register_adapter(catalog, store, folder, "tiny-ad", base="tiny")


def test_eval_run_records_its_serving_config(catalog, store, settings, tiny_base, tiny_adapter, data_file):
    run = evaluate(catalog, store, "tiny-ad", data_file, metrics="exact", max_new_tokens=3, settings=settings,
                   device="cpu")
    want = {"base": "tiny", "base_digest": manifest_digest(tiny_base["files"]), "quantize": "none", "dtype": "fp32",
            "device": "cpu", "engine": SERVE_ENGINE}  # evals generate on the serving engine
    assert run["serving_config"] == want and run["config_key"] == config_key(want)
    assert run["trained_quantization"] == "none"
    # the default quantization is the adapter's own (LoRA: none), which is not what `loradex serve` runs: say so
    warning = served_warning(run, data="held.jsonl")
    assert "tiny-ad@1 was scored as trained, under none/fp32 cpu" in warning
    assert "`loradex eval tiny-ad@1 --data held.jsonl --as-served`" in warning
    assert "`loradex serve --quantize none`" in warning

    served = evaluate(catalog, store, "tiny-ad", data_file, metrics="exact", max_new_tokens=3, settings=settings,
                      device="cpu", as_served=True)
    assert served["serving_config"] == dict(want, quantize="nf4") and served["decoding"]["quantize"] == "nf4"
    assert served["decoding"]["eval_config"]["as_served"] is True
    assert served_warning(served) is None
    assert served["config_key"] != run["config_key"]
    # the two runs are two configurations: each listing picks its own
    vid = run["adapter_version_id"]
    assert scores_for_config(catalog, run["serving_config"])[vid]["eval_run_id"] == run["id"]
    assert scores_for_config(catalog, served["config_key"])[vid]["eval_run_id"] == served["id"]
    assert scores_for_config(catalog, dict(want, quantize="int8"))[vid] is None

    with pytest.raises(InvalidConfig, match="--as-served .* --quantize none"):
        evaluate(catalog, store, "tiny-ad", data_file, as_served=True, quantize="none", settings=settings)
    with pytest.raises(InvalidConfig, match="--as-served .* drop --dtype bf16"):
        evaluate(catalog, store, "tiny-ad", data_file, as_served=True, dtype="bf16", settings=settings)
    with pytest.raises(InvalidConfig, match="--dtype must be one of"):
        evaluate(catalog, store, "tiny-ad", data_file, dtype="fp64", settings=settings)


@pytest.mark.heavy
def test_cli_eval_warns_and_leaderboard_filters(catalog, tiny_adapter, data_file):
    catalog.close()
    r = run_cli("eval", "tiny-ad", "--data", str(data_file), "--metrics", "exact", "--max-new-tokens", "3",
                "--device", "cpu", "--no-progress", "--as-trained")
    assert r.returncode == 0, r.stderr
    assert "loradex: warning: tiny-ad@1 was scored as trained, under none/fp32 cpu" in r.stderr
    assert f"--data {data_file} --as-served" in r.stderr
    assert "scores describe: none/fp32 cpu (not the default server's configuration)" in r.stdout
    # the default is as served: nf4 here (no server owns this catalog), no warning
    r = run_cli("eval", "tiny-ad", "--data", str(data_file), "--metrics", "exact", "--max-new-tokens", "3",
                "--device", "cpu", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    assert "loradex: warning" not in r.stderr
    out = json.loads(r.stdout)
    assert out["serving_config"]["quantize"] == "nf4" and out["warning"] is None
    assert out["gate"]["config_key"] == out["config_key"]

    board = json.loads(run_cli("leaderboard", "--json").stdout)
    assert sorted(s["config"] for s in board["sections"]) == ["nf4/fp32 cpu", "none/fp32 cpu"]
    nf4 = json.loads(run_cli("leaderboard", "--quantize", "nf4", "--json").stdout)
    assert [s["config"] for s in nf4["sections"]] == ["nf4/fp32 cpu"] and nf4["sections"][0]["as_served"] is True
    assert json.loads(run_cli("leaderboard", "--config", "as-served", "--json").stdout)["sections"] == nf4["sections"]
    key = board["sections"][0]["config_key"]
    by_key = json.loads(run_cli("leaderboard", "--config", key, "--json").stdout)["sections"]
    assert [s["config_key"] for s in by_key] == [key]
    r = run_cli("leaderboard", "--quantize", "int8")
    assert r.returncode == 0 and "no eval runs under --config int8" in r.stdout
    r = run_cli("leaderboard", "--quantize", "nf4")
    assert "served as nf4/fp32 cpu = what `loradex serve` runs by default" in r.stdout and "CONFIG" in r.stdout


# -- constructed rows: leaderboard, gate, scores_for_config ----------------------------


def test_leaderboard_groups_configs_separately(catalog):
    a, b = add_version(catalog, "alpha", 1), add_version(catalog, "beta", 1)
    add_run(catalog, a, GOOD, BASE, serving_config=NONE)
    add_run(catalog, a, WORSE, BASE, serving_config=NF4)
    add_run(catalog, b, WORSE, BASE, serving_config=NONE)
    add_run(catalog, b, GOOD, BASE, serving_config=NF4)
    add_run(catalog, b, GOOD, BASE)  # recorded without a config: its own section, never mixed in
    sections = build(catalog)
    assert len(sections) == 3 and {s["data_sha256"] for s in sections} == {DATA_A}
    by_cfg = {s["config"]: s for s in sections}
    assert [r["ref"] for r in by_cfg["none/fp32 cpu"]["rows"]] == ["alpha@1", "beta@1"]
    assert [r["ref"] for r in by_cfg["nf4/fp32 cpu"]["rows"]] == ["beta@1", "alpha@1"]
    assert [r["ref"] for r in by_cfg["unknown"]["rows"]] == ["beta@1"]
    assert by_cfg["nf4/fp32 cpu"]["as_served"] and not by_cfg["none/fp32 cpu"]["as_served"]
    assert all(r["config"] == "nf4/fp32 cpu" and r["n"] == len(BASE) for r in by_cfg["nf4/fp32 cpu"]["rows"])
    assert [s["config"] for s in build(catalog, config="nf4")] == ["nf4/fp32 cpu"]
    assert [s["config"] for s in build(catalog, config="as-served")] == ["nf4/fp32 cpu"]
    assert [s["config"] for s in build(catalog, config=config_key(NONE))] == ["none/fp32 cpu"]
    assert build(catalog, config="int8") == []
    text = render_text(sections)
    assert "served as nf4/fp32 cpu = what `loradex serve` runs by default" in text
    assert "served as none/fp32 cpu (not the default server's configuration)" in text
    assert "(recorded before configs were)" in text


def test_scores_for_config_is_none_for_other_configs(catalog):
    a, b, c = add_version(catalog, "alpha", 1), add_version(catalog, "beta", 1), add_version(catalog, "gamma", 1)
    old = add_run(catalog, a, WORSE, BASE, serving_config=NF4)
    new = add_run(catalog, a, GOOD, BASE, serving_config=NF4)
    add_run(catalog, a, GOOD, BASE, serving_config=NONE)  # newer, but another configuration
    add_run(catalog, b, GOOD, BASE, serving_config=NONE)
    scores = scores_for_config(catalog, NF4)
    assert set(scores) == {a["id"], b["id"], c["id"]}
    assert scores[a["id"]]["eval_run_id"] == new["id"] != old["id"]  # the latest under this configuration
    assert scores[a["id"]]["mean"] == pytest.approx(new["metrics"]["similarity"]["mean"])
    assert scores[a["id"]]["config"] == "nf4/fp32 cpu" and scores[a["id"]]["n"] == len(BASE)
    assert scores[b["id"]] is None  # scored only as trained (none): nothing describes it behind nf4
    assert scores[c["id"]] is None
    assert scores_for_config(catalog, config_key(NF4), version_ids=[b["id"]]) == {b["id"]: None}
    assert describe_score("beta@1", None, NF4) == (
        "no eval under nf4/fp32 cpu (run `loradex eval beta@1 --data FILE --quantize nf4 --device cpu`)")
    assert describe_score("alpha@1", scores[a["id"]], NF4).startswith("similarity 0.")
    with pytest.raises(InvalidConfig, match="serving configuration"):
        scores_for_config(catalog, {"base": "tiny"})


def test_gate_with_config_counts_only_that_config(catalog):
    v = add_version(catalog, "bot", 1)
    add_run(catalog, v, GOOD, BASE, serving_config=NONE)
    assert check_promotion(catalog, v)["ok"] is True  # no config: every run counts, as before
    g = check_promotion(catalog, v, config=NF4)
    assert g["ok"] is False and g["eval_run_id"] is None and g["config_key"] == config_key(NF4)
    assert g["reasons"] == [
        f"bot@1 has no eval under the serving configuration nf4/fp32 cpu ({config_key(NF4)}) "
        "(it has evals under none/fp32 cpu only): run `loradex eval bot@1 --data FILE --quantize nf4 --device cpu` first"]
    # the key alone is enough, even for a configuration no run has recorded yet
    g = check_promotion(catalog, v, config=config_key(config("int8")))
    assert "run `loradex eval bot@1 --data FILE --quantize int8 --device cpu` first" in g["reasons"][0]
    run = add_run(catalog, v, GOOD, BASE, serving_config=NF4)
    g = check_promotion(catalog, v, config=config_key(NF4))
    assert g["ok"] is True and g["eval_run_id"] == run["id"]


def test_gate_with_config_compares_production_under_it(catalog):
    v1, v2 = add_version(catalog, "bot", 1), add_version(catalog, "bot", 2)
    add_run(catalog, v1, GOOD, BASE, serving_config=NONE)
    set_production(catalog, "bot", 1)
    add_run(catalog, v2, WORSE, BASE, serving_config=NF4)
    g = check_promotion(catalog, v2, config=NF4)
    assert not g["ok"] and g["production"]["comparable"] is False
    assert "that version has no eval on the same data under nf4/fp32 cpu" in g["reasons"][0]
    assert "`loradex eval bot@1 --data FILE --quantize nf4 --device cpu`" in g["reasons"][0]
    add_run(catalog, v1, GOOD, BASE, serving_config=NF4)
    g = check_promotion(catalog, v2, config=NF4)
    assert not g["ok"] and "worse than production bot@1" in g["reasons"][0]


# -- the migration ------------------------------------------------------------------------


def test_migration_backfills_config_from_decoding(tmp_path):
    import duckdb

    from loradex.hub import migrations
    from loradex.hub.catalog import Catalog, to_json, utcnow

    path = str(tmp_path / "old.duckdb")
    conn = duckdb.connect(path)
    cur = conn.cursor()
    before = [m for m in migrations.MIGRATIONS if m[0] != "007_eval_runs_serving_config"]
    migrations.apply(cur, before)
    files = {"model.safetensors": "f" * 64}
    cur.execute("INSERT INTO bases (name, source, kind, path, architecture, config, layers, files, created_at) "
                "VALUES ('tiny', 'x', 'path', '/x', 'LlamaForCausalLM', '{}', '{}', ?, ?)", [to_json(files), utcnow()])
    for base, decoding in (("tiny", {"quantize": "nf4", "dtype": "float32", "device": "cpu"}),
                           ("gone", {"quantize": "none", "dtype": "bfloat16", "device": "cuda"}),
                           ("tiny", {"max_new_tokens": 8})):
        cur.execute("INSERT INTO eval_runs (adapter_version_id, base, data_sha256, n, metrics, decoding, created_at) "
                    "VALUES (1, ?, ?, 1, '{}', ?, ?)", [base, DATA_A, to_json(decoding), utcnow()])
    conn.close()

    cat = Catalog.open(path, wait_s=5)
    try:
        rows = cat.query("SELECT id, serving_config, config_key FROM eval_runs ORDER BY id")
        applied = [r["name"] for r in cat.query("SELECT name FROM _migrations")]
    finally:
        cat.close()
    assert "007_eval_runs_serving_config" in applied
    want = from_decoding({"name": "tiny", "files": files}, "tiny", {"quantize": "nf4", "dtype": "float32", "device": "cpu"})
    assert rows[0]["serving_config"] == want and want["base_digest"] == manifest_digest(files)
    assert rows[0]["config_key"] == config_key(want) == f"tiny@{manifest_digest(files)[:12]}/nf4/fp32/cpu"
    assert rows[1]["config_key"] == "gone@unknown/none/bf16/cuda"  # base deleted since: digest unknown
    assert rows[2]["serving_config"] is None and rows[2]["config_key"] is None  # nothing recorded: unknown


def test_scores_for_config_survives_the_op_wire(catalog):
    """Through a server (`@op`), the result comes back as it left: int version ids, None for no score."""
    a, b = add_version(catalog, "alpha", 1), add_version(catalog, "beta", 1)
    add_run(catalog, a, GOOD, BASE, serving_config=NF4)
    local = scores_for_config(catalog, NF4)
    entry = scores_for_config.op
    wire = json.loads(json.dumps(entry.dump_result(local)))
    assert entry.load_result(wire) == local and local[b["id"]] is None
    args = json.loads(json.dumps(entry.dump_args((NF4,), {"version_ids": [a["id"]]})))
    assert entry.load_args(args) == {"cfg": NF4, "version_ids": [a["id"]]}
