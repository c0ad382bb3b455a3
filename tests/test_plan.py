"""`loradex plan`: parameter counts from the config alone (meta device), memory, time and cost."""
from __future__ import annotations

import json

import pytest

from loradex.hub.errors import InvalidConfig, NotFound
from loradex.training.plan import format_plan, make_plan, shipped_configs


def test_shipped_configs():
    assert {"llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "smollm2-135m"} <= set(shipped_configs())


def test_llama_31_8b_figures():
    plan = make_plan(base="llama-3.1-8b", r=16, targets="q_proj,v_proj")
    assert plan["total_params"] == 8_030_261_248
    assert plan["trainable_params"] == 6_815_744
    # fp32 safetensors of the LoRA weights; bf16 weights are 2 bytes/param, NF4 far less
    assert plan["adapter_bytes"] == 6_815_744 * 4
    assert plan["weights_bytes"]["bf16"] == 2 * 8_030_261_248
    assert plan["weights_bytes"]["nf4"] < plan["weights_bytes"]["bf16"] / 2.5
    text = format_plan(plan)
    assert "8,030,261,248" in text and "6,815,744" in text


def test_r8_llama2_7b_is_the_seed_figure(tmp_path):
    """The seed's 4,194,304 trainable parameters are r=8 on q,v of Llama-2-7B (32 layers, 4096 wide, MHA)."""
    cfg = json.loads(shipped_configs()["llama-3.1-8b"].read_text())
    cfg.update(num_key_value_heads=32, vocab_size=32000, intermediate_size=11008, rope_scaling=None,
               max_position_embeddings=4096, rope_theta=10000.0)
    path = tmp_path / "llama2.json"
    path.write_text(json.dumps(cfg))
    plan = make_plan(config_json=str(path), r=8, targets="q_proj,v_proj")
    assert plan["trainable_params"] == 4_194_304 and plan["total_params"] == 6_738_415_616


def test_other_shipped_bases_and_all_linear():
    assert make_plan(base="smollm2-135m", r=16)["trainable_params"] == 921_600  # STACK.md's measured figure
    assert make_plan(base="smollm2-135m", r=16, targets="all-linear")["trainable_params"] == 4_884_480
    assert make_plan(base="qwen2.5-7b", r=16)["total_params"] == 7_615_616_512
    assert make_plan(base="mistral-7b", r=16)["total_params"] == 7_248_023_552


def test_data_estimate_scales_with_epochs_and_price(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "Say hi " * 5, "completion": "hi " * 10}) for _ in range(300)))
    one = make_plan(base="llama-3.1-8b", data=str(data), epochs=1, gpu="a10g")
    two = make_plan(base="llama-3.1-8b", data=str(data), epochs=2, gpu="a10g")
    h100 = make_plan(base="llama-3.1-8b", data=str(data), epochs=1, gpu="h100")
    assert one["data"]["examples"] == 300 and one["data"]["tokens"] > 0
    assert two["data"]["estimated_seconds"] == pytest.approx(2 * one["data"]["estimated_seconds"])
    assert one["data"]["estimated_usd"] == pytest.approx(one["data"]["estimated_seconds"] / 3600 * 1.10)
    assert h100["data"]["estimated_seconds"] < one["data"]["estimated_seconds"]
    assert "cost (rough)" in format_plan(one)


def test_plan_errors(tmp_path):
    with pytest.raises(InvalidConfig, match="--gpu"):
        make_plan(base="llama-3.1-8b", gpu="abacus")
    with pytest.raises(InvalidConfig, match="--targets"):
        make_plan(base="smollm2-135m", targets="nope_proj")
    with pytest.raises(NotFound, match="not a shipped config"):
        make_plan(base="no-such-base")
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    with pytest.raises(InvalidConfig, match="no model_type"):
        make_plan(config_json=str(bad))


def test_plan_registered_base_counts_tokens_with_its_tokenizer(tmp_path, catalog, tiny_base):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    plan = make_plan(base="tiny", data=str(data), catalog_opener=lambda: catalog, gpu="cpu")
    assert plan["data"]["method"] == "tokenizer" and plan["data"]["examples"] == 1
    assert plan["total_params"] == tiny_base["num_parameters"]


def test_cli_plan_prints_the_figures(capsys):
    from loradex.cli import main

    assert main(["plan", "--base", "llama-3.1-8b", "--r", "16", "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "6,815,744" in out
    assert main(["plan", "--base", "llama-3.1-8b", "--quantize", "int3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize" in err[0]
