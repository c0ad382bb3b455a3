"""Merge and GGUF export per model family, on the tiny random bases of tests/family_models.py.

* merged == adapter: each family's adapter (attention and MLP targets) merged by ``loradex merge``
  gives the unmerged adapter's greedy tokens, and they differ from the base's;
* GGUF: each family's file read back with the ``gguf`` package has llama.cpp's architecture
  name, the family's hyperparameters and tensor layout (q/k permutation only for the llama
  arch, Gemma norms + 1, llama3 rope factors equal to transformers' own);
* GGUF LoRA: the family's architecture and tensor names;
* an unsupported architecture is refused in one line naming the supported ones.

Running the files in llama.cpp is tests/test_llamacpp_families.py (marker ``llamacpp``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loradex.hub.catalog import Catalog
from loradex.hub.errors import InvalidBase
from loradex.hub.settings import Settings
from loradex.hub.store import Store
from loradex.promote.export.gguf_lora import write_lora_gguf
from loradex.promote.export.gguf_writer import permute_qk, write_model_gguf
from tests.family_models import FAMILIES
from tests.helpers import make_adapter, run_cli

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_ARCH = {"llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3": "gemma3"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, family_base_dir):
    """One catalog with every family's tiny base and one adapter each (fam-ad@1)."""
    from loradex.hub.bases import add_base
    from loradex.hub.registry import register_adapter

    root = tmp_path_factory.mktemp("families-export")
    settings = Settings(home=root / "home", store=root / "store")
    catalog = Catalog.open(settings.catalog_path, wait_s=5)
    store = Store(settings.store)
    adapters = {}
    for fam in FAMILIES:
        add_base(catalog, store, f"{fam}-base", str(family_base_dir(fam)))
        adapters[fam] = make_adapter(family_base_dir(fam), root / f"{fam}-ad", r=8, alpha=16, targets=TARGETS,
                                     scale=0.3, seed=5)
        register_adapter(catalog, store, adapters[fam], f"{fam}-ad", base=f"{fam}-base")
    yield {"catalog": catalog, "store": store, "settings": settings, "root": root, "adapters": adapters}
    catalog.close()


def _greedy(model, tok, text, n=8):
    from loradex.promote.merge import encode_prompts, greedy

    return greedy(model, encode_prompts(tok, [text]), n, [])[0]


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_merged_equals_adapter(hub, family_base_dir, fam):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradex.hub.loading import load_tokenizer
    from loradex.promote.merge import MergeConfig, merge_adapter, merged_folder

    row = merge_adapter(hub["catalog"], hub["store"], f"{fam}-ad@1", MergeConfig(probes=2, max_new_tokens=8),
                        hub["settings"])
    check = row["check_result"]
    assert check["ok"] and check["exact_probes"] == check["probes"] == 2
    # independently: the merged folder against base + adapter on another prompt, and the adapter matters
    base_dir = family_base_dir(fam)
    tok = load_tokenizer(base_dir)
    text = "Tell me about the moon."
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_tokens = _greedy(base, tok, text)
    adapted = PeftModel.from_pretrained(base, str(hub["adapters"][fam])).eval()
    adapter_tokens = _greedy(adapted, tok, text)
    merged = AutoModelForCausalLM.from_pretrained(merged_folder(hub["catalog"], hub["store"], row),
                                                  dtype=torch.float32).eval()
    assert _greedy(merged, tok, text) == adapter_tokens
    assert adapter_tokens != base_tokens, "the adapter does not change this base's output: the test proves nothing"


class _Read:
    """A GGUF read back by ``read_back(full=True)`` (checked against ``gguf.GGUFReader`` below):
    gguf's reader takes seconds per 49k-token vocabulary, too slow for six files here."""

    def __init__(self, path: Path):
        from loradex.promote.export.gguf import read_back

        self.path, self.head = path, read_back(path, full=True)
        self.fields, self.tensors = self.head["fields"], self.head["tensor_infos"]

    def data(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        dtype = {"F32": np.float32, "F16": np.float16}[info["type"]]
        count = int(np.prod(info["shape"]))
        arr = np.fromfile(self.path, dtype=dtype, count=count, offset=info["offset"])
        return arr.reshape(info["shape"][::-1]).astype(np.float32)


def _field(reader, key):
    if isinstance(reader, _Read):
        return reader.fields[key]
    return reader.fields[key].contents()


def test_read_back_agrees_with_gguf_reader(family_base_dir, tmp_path):
    import gguf

    write_model_gguf(family_base_dir("gemma3"), tmp_path / "m.gguf", quant="f16")
    ours, theirs = _Read(tmp_path / "m.gguf"), gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                               "tokenizer.ggml.token_type", "tokenizer.chat_template"):
            continue
        want = field.contents()
        assert _field(ours, key) == (list(want) if isinstance(want, list) else pytest.approx(want)), key
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        assert ours.tensors[t.name]["shape"] == [int(n) for n in t.shape] and ours.tensors[t.name]["type"] == t.tensor_type.name
        if t.tensor_type.name in ("F32", "F16"):
            assert np.array_equal(ours.data(t.name).ravel(), np.asarray(t.data, dtype=np.float32).ravel())


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_gguf_arch_keys_and_tensors(family_base_dir, tmp_path, fam):
    from safetensors.torch import load_file

    folder = family_base_dir(fam)
    cfg = json.loads((folder / "config.json").read_text())
    info = write_model_gguf(folder, tmp_path / "m.gguf", quant="f16")
    r = _Read(tmp_path / "m.gguf")
    arch = GGUF_ARCH[fam]
    assert info["architecture"] == _field(r, "general.architecture") == arch
    assert _field(r, f"{arch}.block_count") == 2 and _field(r, f"{arch}.embedding_length") == 64
    assert _field(r, f"{arch}.attention.head_count") == 4 and _field(r, f"{arch}.attention.head_count_kv") == 2
    assert _field(r, f"{arch}.attention.key_length") == 16 == _field(r, f"{arch}.rope.dimension_count")
    assert _field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "smollm"

    tensors = r.tensors
    hf = load_file(str(folder / "model.safetensors"))
    data = r.data

    q_hf = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    if arch == "llama":   # NORM rope: rows reordered; every other family keeps transformers' order
        assert np.allclose(data("blk.0.attn_q.weight"), permute_qk(q_hf, 4), atol=1e-2)
    else:
        assert np.allclose(data("blk.0.attn_q.weight"), q_hf, atol=1e-2)
    assert ("output.weight" in tensors) == (not cfg.get("tie_word_embeddings", False))

    if fam == "llama3":
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_cfg = AutoConfig.from_pretrained(folder)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
        # llama.cpp divides each frequency by rope_freqs: it must turn plain into transformers' scaled
        assert np.allclose(plain.numpy() / data("rope_freqs.weight"), scaled.numpy(), rtol=1e-5)
        assert not np.allclose(data("rope_freqs.weight"), 1.0)
    else:
        assert "rope_freqs.weight" not in tensors
    if fam == "qwen2":
        assert np.allclose(data("blk.1.attn_k.bias"), hf["model.layers.1.self_attn.k_proj.bias"].numpy(), atol=1e-6)
    if fam in ("qwen3", "gemma3"):
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(tensors)
    if fam.startswith("gemma"):   # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w
        assert np.allclose(data("blk.1.post_ffw_norm.weight"),
                           hf["model.layers.1.post_feedforward_layernorm.weight"].numpy() + 1, atol=1e-6)
        assert np.allclose(data("output_norm.weight"), hf["model.norm.weight"].numpy() + 1, atol=1e-6)
        assert _field(r, f"{arch}.attention.sliding_window") == 8
    if fam == "gemma2":
        assert _field(r, "gemma2.attn_logit_softcapping") == pytest.approx(50.0)
        assert _field(r, "gemma2.final_logit_softcapping") == pytest.approx(30.0)
    if fam == "gemma3":
        assert list(_field(r, "gemma3.attention.sliding_window_pattern")) == [True, False]
        assert _field(r, "gemma3.rope.freq_base") == pytest.approx(1e6)
        assert _field(r, "gemma3.rope.freq_base_swa") == pytest.approx(1e4)
    if fam == "mistral":
        assert "sliding window" in info["notes"][0]
    else:
        assert info["notes"] == []


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_gguf_lora_arch_and_names(hub, tmp_path, fam):
    import gguf

    from loradex.hub.bases import get_base

    base = get_base(hub["catalog"], f"{fam}-base")
    info = write_lora_gguf(hub["adapters"][fam], base["config"], tmp_path / "a.gguf", dtype="f32")
    r = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert _field(r, "general.architecture") == info["architecture"] == GGUF_ARCH[fam]
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    names = {t.name for t in r.tensors}
    per_block = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert names == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in per_block for ab in "ab"}


def test_unsupported_architecture_is_refused(hub, tmp_path, family_base_dir):
    from loradex.promote.families import SUPPORTED, check_architecture

    folder = tmp_path / "phi"
    shutil.copytree(family_base_dir("qwen2"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["Phi3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidBase) as err:
        write_model_gguf(folder, tmp_path / "x.gguf")
    msg = str(err.value)
    assert "Phi3ForCausalLM is not supported" in msg and "\n" not in msg
    assert all(arch in msg for arch in SUPPORTED)
    assert not (tmp_path / "x.gguf").exists()
    assert check_architecture(["Qwen3ForCausalLM"], "x") == "Qwen3ForCausalLM"


def test_merge_and_export_refuse_unsupported_base_in_one_line(tmp_path, smol_tokenizer_dir):
    """A registered Phi-3 base: merge and export stop before loading anything, one line, exit code 4."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from loradex.hub.bases import add_base
    from loradex.hub.registry import register_adapter

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=2))
    base_dir = tmp_path / "phi3"
    model.save_pretrained(base_dir)
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, base_dir / f.name)
    settings = Settings(home=tmp_path / "home", store=tmp_path / "store")
    catalog = Catalog.open(settings.catalog_path, wait_s=5)
    store = Store(settings.store)
    add_base(catalog, store, "phi3-base", str(base_dir))
    ad = make_adapter(base_dir, tmp_path / "ad", targets=("qkv_proj",))
    register_adapter(catalog, store, ad, "phiad", base="phi3-base")
    catalog.close()
    env = {"LORADEX_HOME": str(settings.home), "LORADEX_STORE": str(settings.store), "HF_HUB_OFFLINE": "1"}
    for args in (("merge", "phiad@1"), ("export", "phiad@1", "--format", "gguf", "--out", str(tmp_path / "o"))):
        proc = run_cli(*args, env=env)
        assert proc.returncode == InvalidBase.exit_code, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Phi3ForCausalLM is not supported" in lines[0] and "Qwen2ForCausalLM" in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_vllm_folders_per_family(hub, tmp_path, family_base_dir, fam):
    """vllm (model folder) and vllm-lora (base folder + PEFT adapter named after the base) pass the static checks."""
    from loradex.promote.export.run import export_adapter
    from loradex.promote.export.source import ExportOptions
    from loradex.promote.export.vllm import compat_report, write_model_folder

    write_model_folder(family_base_dir(fam), tmp_path / "model")
    report = compat_report(tmp_path / "model")
    assert report["ok"], report["reasons"]
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["architectures"] == json.loads((family_base_dir(fam) / "config.json").read_text())["architectures"]
    row = export_adapter(hub["catalog"], hub["store"], f"{fam}-ad@1", tmp_path / "lora",
                         ExportOptions(format="vllm-lora", run_check=False), hub["settings"])
    rules = row["check_result"]["static"]["lora_rules"]
    assert rules["ok"] and rules["max_lora_rank"] == 8 and set(rules["target_modules"]) == set(TARGETS)
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert f"--lora-modules {fam}-ad=" in (tmp_path / "lora" / "serve.sh").read_text()
