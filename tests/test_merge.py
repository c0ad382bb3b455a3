"""Merge (promote) on the tiny base: fp32 exactness, the QLoRA path, a failing check, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loradex.hub.errors import CheckFailed, Conflict, InvalidConfig
from loradex.hub.registry import register_adapter
from loradex.promote.merge import MergeConfig, merge_adapter, merged_folder
from tests.helpers import make_adapter, run_cli


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_base_dir):
    # scale 0.5 so the adapter clearly changes the tiny model's greedy tokens
    return make_adapter(tiny_base_dir, tmp_path_factory.mktemp("ad") / "ad", r=8, alpha=16,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), scale=0.5, seed=1)


@pytest.fixture
def version(catalog, store, tiny_base, adapter_dir):
    return register_adapter(catalog, store, adapter_dir, "tinyad", base="tiny")


def _logits(folder_or_model, ids):
    from transformers import AutoModelForCausalLM

    model = folder_or_model
    if not hasattr(model, "forward"):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_fp32_merge_equals_adapter_and_is_registered(catalog, store, version, tiny_base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    row = merge_adapter(catalog, store, "tinyad@1", MergeConfig(dtype="fp32", max_new_tokens=12))
    assert row["merged_into"] == "full-precision" and row["dtype"] == "fp32"
    check = row["check_result"]
    assert check["ok"] and check["exact_probes"] == check["probes"] == 4 and check["probe_source"] == "fixed"

    base = catalog.one("SELECT * FROM bases WHERE name = ?", ["tinyad-v1-merged"])
    assert base["kind"] == "merged" and base["merged_from_version_id"] == version["id"]
    folder = merged_folder(catalog, store, row)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
              "generation_config.json", "loradex_merge.json"):
        assert f in row["files"], f
        assert (folder / f).is_file()
    assert not [f for f in row["files"] if f.endswith((".bin", ".pt"))]
    lineage = json.loads((folder / "loradex_merge.json").read_text())
    assert lineage["adapter_version_id"] == version["id"] and lineage["config"]["dtype"] == "fp32"
    assert store.verify(row["path"], row["files"]) == []

    # independent of the check: merged logits equal base+adapter logits
    ids = list(range(5, 40))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32),
                                    str(adapter_dir))
    base_only = _logits(str(tiny_base_dir), ids)
    want = _logits(ref, ids)
    got = _logits(str(folder), ids)
    assert (want - base_only).abs().max() > 1e-2, "adapter must change the output for this test to mean anything"
    assert torch.allclose(got, want, atol=1e-4)

    # the same merge again is a no-op returning the recorded row
    again = merge_adapter(catalog, store, "tinyad@1", MergeConfig(dtype="fp32"))
    assert again["id"] == row["id"]
    assert catalog.one("SELECT count(*) AS n FROM merges")["n"] == 1


def test_bf16_merge_reports_tolerance(catalog, store, version):
    row = merge_adapter(catalog, store, "tinyad", MergeConfig(dtype="bf16", max_new_tokens=8))
    check = row["check_result"]
    assert row["base_name"] == "tinyad-v1-merged-bf16"
    assert check["ok"] and check["teacher_forced"]["of"] > 0
    assert check["teacher_forced"]["rate"] >= 0.9
    cfg = json.loads((merged_folder(catalog, store, row) / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_qlora_merges_into_dequantized_nf4(catalog, store, tiny_base, adapter_dir, tiny_base_dir):
    from loradex.hub.loading import load_model_folder

    v = register_adapter(catalog, store, adapter_dir, "qad", base="tiny", quantization="nf4")
    row = merge_adapter(catalog, store, "qad@1", MergeConfig(max_new_tokens=8))
    assert row["merged_into"] == "dequantized-nf4"
    assert row["check_result"]["ok"] and "vs_4bit_serving" in row["check_result"]
    from safetensors.torch import load_file

    merged = load_file(str(merged_folder(catalog, store, row) / "model.safetensors"))
    fp32 = load_file(str(tiny_base_dir / "model.safetensors"))
    nf4, _, _ = load_model_folder(tiny_base_dir, quantize="nf4", device="cpu", dtype="fp32")
    deq = {n: p.detach().float() for n, p in nf4.dequantize().named_parameters()}
    key = "model.layers.0.mlp.up_proj.weight"        # not adapted: exactly the dequantized NF4 weight
    assert torch.equal(merged[key], deq[key])
    assert not torch.equal(merged[key], fp32[key])
    qkey = "model.layers.1.self_attn.q_proj.weight"  # adapted: dequantized NF4 + B @ A * alpha / r
    ad = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = ad["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = ad["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert torch.allclose(merged[qkey], deq[qkey] + (b @ a) * (16 / 8), atol=1e-6)
    assert catalog.one("SELECT merged_from_version_id FROM bases WHERE name = ?",
                       ["qad-v1-merged"])["merged_from_version_id"] == v["id"]


def test_failed_check_raises_and_registers_nothing(catalog, store, version, monkeypatch):
    import loradex.promote.merge as merge_mod

    # a broken merge (the LoRA delta dropped) must be caught by the automatic check
    monkeypatch.setattr(merge_mod, "merge_weights", lambda peft_model: peft_model.unload())
    with pytest.raises(CheckFailed) as err:
        merge_adapter(catalog, store, "tinyad@1", MergeConfig(max_new_tokens=12))
    msg = str(err.value)
    assert "probes identical" in msg and "first diff at token" in msg and "nothing was registered" in msg
    assert catalog.one("SELECT count(*) AS n FROM merges")["n"] == 0
    assert catalog.one("SELECT count(*) AS n FROM bases WHERE kind = 'merged'")["n"] == 0
    assert not list((store.root / "tmp").iterdir())


def test_eval_prompts_are_used_as_probes(catalog, store, version):
    from loradex.hub.catalog import utcnow
    from loradex.promote.merge import plan_merge

    with catalog.transaction() as cur:
        cur.execute("INSERT INTO eval_runs (adapter_version_id, base, data_sha256, n, metrics, decoding, created_at) "
                    "VALUES (?, 'tiny', 'x', 2, '{}', '{}', ?)", [version["id"], utcnow()])
        run_id = cur.execute("SELECT max(id) FROM eval_runs").fetchone()[0]
        for i, p in enumerate(["Translate 'cat' to French.", "Name a colour."]):
            cur.execute("INSERT INTO eval_samples (run_id, idx, prompt) VALUES (?, ?, ?)", [run_id, i, p])
    plan = plan_merge(catalog, store, "tinyad@1", MergeConfig())
    assert plan.probe_source == "eval_samples"
    assert plan.probes == ["Translate 'cat' to French.", "Name a colour."]


def test_bad_config_and_name_conflict(catalog, store, version, tiny_base_dir):
    from loradex.hub.bases import add_base

    with pytest.raises(InvalidConfig, match="--dtype"):
        MergeConfig(dtype="int4")
    add_base(catalog, store, "tinyad-v1-merged", str(tiny_base_dir))
    with pytest.raises(Conflict, match="--name"):
        merge_adapter(catalog, store, "tinyad@1")


def test_cli_merge_and_errors(catalog, store, version):
    catalog.close()  # the CLI subprocess needs the catalog file
    res = run_cli("merge", "tinyad@1", "--check-tokens", "6", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["merge"]["base_name"] == "tinyad-v1-merged" and data["merge"]["check_result"]["ok"]
    bad = run_cli("merge", "nosuch@1")
    assert bad.returncode == 3 and bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr


def test_recording_a_merge_takes_only_the_stores_own_temp_folders(catalog, store, tmp_path):
    """merges.record is an op (a client's arguments): its temp folder is deleted after, so it must be the store's."""
    from loradex.promote.merge import MergeResult, record_merge

    victim = tmp_path / "victim"
    (victim / "merged").mkdir(parents=True)
    (victim / "merged" / "keep.txt").write_text("not the store's")
    for tmp, folder in ((victim, victim / "merged"), ("", "merged"), (".", "."), (store.root / "tmp", store.root / "tmp")):
        with pytest.raises(InvalidConfig, match="temp folder"):
            record_merge(catalog, store, None, MergeResult(folder=Path(folder), tmp=Path(tmp)))
    assert (victim / "merged" / "keep.txt").read_text() == "not the store's"
    inside = store.new_tmp()
    with pytest.raises(InvalidConfig, match="inside its temp folder"):
        record_merge(catalog, store, None, MergeResult(folder=victim / "merged", tmp=inside))
    assert (victim / "merged" / "keep.txt").exists()
