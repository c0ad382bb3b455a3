"""The PEFT adapter format has one reading (hub/peft_format.py), and it is PEFT's own.

Validation, the batched server and the GGUF LoRA export used to carry their own
copies of the key regex and of rank_pattern/alpha_pattern matching; the copies
matched a regex key only against the module's full name, where PEFT also matches
a dotted suffix, and the export refused ``lora_A.<adapter name>.weight`` keys the
others accepted.
"""
from __future__ import annotations

import pytest

from loradex.hub import peft_format
from loradex.hub.peft_format import module_scale, parse_key, pattern_key

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("patterns, module", [
    (["q_proj"], MODULE),
    (["self_attn.q_proj"], MODULE),
    (["attn.q_proj"], MODULE),                        # not a dotted suffix: no match
    ([MODULE], MODULE),
    ([r"layers\.0\..*"], MODULE),                     # regex on a suffix: the case the copies got wrong
    ([r"model\.layers\.0\..*"], MODULE),
    ([r".*\.0\.self_attn\.q_proj"], MODULE),
    ([r"layers\.1\..*"], MODULE),
    (["v_proj", "q_proj", r"layers\.0\..*"], MODULE),  # the first matching key in config order wins
    ([r"layers\.0\..*", "q_proj"], MODULE),
    (["proj"], MODULE),
    (["q_proj"], "model.layers.0.self_attn.q_proj_extra"),
])
def test_pattern_matching_is_peft_s(patterns, module):
    from peft.utils.other import get_pattern_key

    peft_key = get_pattern_key(patterns, module)   # PEFT returns the module name itself when nothing matches
    expected = peft_key if peft_key in patterns else None
    assert pattern_key(dict.fromkeys(patterns, 1), module) == expected


def test_a_regex_key_matches_a_dotted_suffix():
    # the old copies used re.fullmatch on the full name, so this rank fell back to r=8
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {r"layers\.0\..*": 4}, "alpha_pattern": {"q_proj": 2}}
    assert module_scale(cfg, MODULE) == (4, 2.0, 0.5)
    assert module_scale(cfg, "model.layers.1.self_attn.v_proj") == (8, 16.0, 2.0)
    assert module_scale({**cfg, "use_rslora": True}, MODULE) == (4, 2.0, 1.0)


@pytest.mark.parametrize("key, parsed", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (MODULE, "lora_A")),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", (MODULE, "lora_B")),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.my_adapter.weight", (MODULE, "lora_B")),
    ("model.layers.0.self_attn.q_proj.lora_A.weight", (MODULE, "lora_A")),
    ("base_model.model.model.embed_tokens.lora_embedding_A", ("model.embed_tokens", "lora_embedding_A")),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", None),       # lora_bias=True
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", None),  # DoRA
    ("base_model.model.lm_head.weight", None),                                       # modules_to_save
])
def test_tensor_keys(key, parsed):
    assert parse_key(key) == parsed


def test_unbatchable_settings_are_named():
    assert peft_format.unbatchable({"r": 8}) == []
    assert peft_format.unbatchable({"use_dora": True, "bias": "all", "lora_bias": True,
                                    "modules_to_save": ["lm_head"]}) == [
        "use_dora=true", "bias='all'", "lora_bias=true", "modules_to_save=['lm_head']"]


def test_every_reader_agrees_with_peft_on_a_patterned_adapter(tmp_path, tiny_base, tiny_base_dir):
    """A real PEFT adapter whose rank/alpha patterns are regexes on a suffix: PEFT, validation,
    the server's reader and the GGUF LoRA export give every module the same rank and scale."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loradex.hub.validate import validate_adapter
    from loradex.serving.lora import read_adapter
    from tests.helpers import make_adapter

    patterns = {"rank_pattern": {r"layers\.0\..*": 4}, "alpha_pattern": {r"layers\.1\.self_attn\.v_proj": 3}}
    folder = make_adapter(tiny_base_dir, tmp_path / "patterned", r=8, alpha=16, **patterns)

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], **patterns))
    peft_says = {name.removeprefix("base_model.model."): (mod.r["default"], mod.scaling["default"])
                 for name, mod in model.named_modules() if isinstance(getattr(mod, "scaling", None), dict)}
    assert {r for r, _ in peft_says.values()} == {4, 8}

    validated = validate_adapter(folder, tiny_base)          # used to refuse: "has rank 4 but the config says r=8"
    assert sorted(validated.modules) == sorted(peft_says)
    served = read_adapter(folder)
    cfg = peft_format.read_config(folder)
    raw = load_file(str(folder / peft_format.WEIGHTS))
    for module, (r, scale) in peft_says.items():
        assert module_scale(cfg, module)[0::2] == (r, pytest.approx(scale))   # the export's scale rule
        # the server folds PEFT's scale into B
        a, b_scaled = served.modules[module]
        assert a.shape[0] == r
        torch.testing.assert_close(b_scaled, raw[f"base_model.model.{module}.lora_B.weight"] * scale)
