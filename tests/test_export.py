"""Export formats on the tiny base: GGUF structure read back, GGUF LoRA, vLLM rules, Modelfile, registration.

Running the files in llama.cpp / vLLM is in test_llamacpp.py / test_vllm.py (markers).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from loradex.hub.catalog import Catalog
from loradex.hub.errors import CheckFailed, InvalidConfig
from loradex.hub.settings import Settings
from loradex.hub.store import Store, file_sha256
from loradex.promote.export.gguf_writer import permute_qk
from loradex.promote.export.run import export_adapter
from loradex.promote.export.source import ExportOptions
from tests.helpers import make_adapter, run_cli

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_base_dir):
    """One catalog with the tiny base, adapter tinyad@1 and its fp32 merge, shared by the module."""
    from loradex.hub.bases import add_base
    from loradex.hub.registry import register_adapter
    from loradex.promote.merge import MergeConfig, merge_adapter

    root = tmp_path_factory.mktemp("export-hub")
    settings = Settings(home=root / "home", store=root / "store")
    catalog = Catalog.open(settings.catalog_path, wait_s=5)
    store = Store(settings.store)
    add_base(catalog, store, "tiny", str(tiny_base_dir))
    ad = make_adapter(tiny_base_dir, root / "ad", r=8, alpha=16, targets=TARGETS, scale=0.3, seed=2)
    version = register_adapter(catalog, store, ad, "tinyad", base="tiny")
    merge = merge_adapter(catalog, store, "tinyad@1", MergeConfig(max_new_tokens=6), settings)
    yield {"catalog": catalog, "store": store, "version": version, "merge": merge, "adapter_dir": ad,
           "settings": settings, "root": root}
    catalog.close()


def _export(hub, fmt, out, **kw):
    kw.setdefault("run_check", False)
    return export_adapter(hub["catalog"], hub["store"], "tinyad@1", out, ExportOptions(format=fmt, **kw),
                          hub["settings"])


def _assert_registered(hub, row, fmt, *, merged: bool):
    assert row["format"] == fmt and row["adapter_version_id"] == hub["version"]["id"]
    assert row["merge_id"] == (hub["merge"]["id"] if merged else None)
    out = Path(row["path"])
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(row["files"]) == on_disk
    for rel, sha in row["files"].items():
        assert file_sha256(out / rel) == sha
    assert row["size_bytes"] == sum((out / rel).stat().st_size for rel in row["files"])
    assert row["method"] and row["check_result"]
    manifest = json.loads((out / "loradex_export.json").read_text())
    assert manifest["adapter_version_id"] == hub["version"]["id"] and manifest["options"]["format"] == fmt


_READERS: dict = {}


def _reader(path):
    """gguf.GGUFReader, once per file (it takes seconds on a 49k-token vocabulary)."""
    import gguf

    if str(path) not in _READERS:
        _READERS[str(path)] = gguf.GGUFReader(str(path))
    return _READERS[str(path)]


def _field(reader, key):
    return reader.fields[key].contents()


def test_gguf_f16_structure(hub, tmp_path):
    import gguf
    from safetensors.torch import load_file

    row = _export(hub, "gguf", tmp_path / "g")
    _assert_registered(hub, row, "gguf", merged=True)
    path = tmp_path / "g" / "tinyad-v1-merged.f16.gguf"
    r = _reader(path)
    names = {t.name: t for t in r.tensors}
    per_block = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    expected = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(names) == expected                      # tied embeddings: no output.weight
    assert names["token_embd.weight"].tensor_type.name == "F16"
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert list(names["blk.0.attn_k.weight"].shape) == [64, 32]   # GGUF order: [in, out]
    assert list(names["blk.1.ffn_down.weight"].shape) == [128, 64]
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == 2 and _field(r, "llama.embedding_length") == 64
    assert _field(r, "llama.attention.head_count") == 4 and _field(r, "llama.attention.head_count_kv") == 2
    assert _field(r, "llama.rope.dimension_count") == 16
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "smollm"
    static = row["check_result"]["static"]
    assert static["tensors"] == len(r.tensors) and static["metadata"]["tokenizer.ggml.pre"] == "smollm"
    assert row["check_result"]["runtime"] == {"skipped": "--no-run-check"}
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    assert _field(r, "tokenizer.ggml.bos_token_id") == 1 and _field(r, "tokenizer.ggml.eos_token_id") == 2
    merged_dir = Path(hub["store"].resolve(hub["merge"]["path"]))
    assert _field(r, "tokenizer.chat_template") == (merged_dir / "chat_template.jinja").read_text()
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 49152 and tokens[2] == "<|im_end|>"
    special = json.loads((merged_dir / "tokenizer.json").read_text())["added_tokens"]
    assert all(types[t["id"]] == gguf.TokenType.CONTROL for t in special if t["special"])
    assert types[1000] == gguf.TokenType.NORMAL

    # q/k rows are permuted from HF halves to GGML pairs; un-permuting gives the HF weights back
    hf = load_file(str(merged_dir / "model.safetensors"))
    q = np.asarray(names["blk.1.attn_q.weight"].data, dtype=np.float32)
    k = np.asarray(names["blk.1.attn_k.weight"].data, dtype=np.float32)
    want_q = hf["model.layers.1.self_attn.q_proj.weight"].numpy()
    want_k = hf["model.layers.1.self_attn.k_proj.weight"].numpy()
    assert np.allclose(q, permute_qk(want_q, 4), atol=1e-3) and not np.allclose(q, want_q, atol=1e-3)
    assert np.allclose(k, permute_qk(want_k, 2), atol=1e-3)
    v = np.asarray(names["blk.1.attn_v.weight"].data, dtype=np.float32)
    assert np.allclose(v, hf["model.layers.1.self_attn.v_proj.weight"].numpy(), atol=1e-3)


def test_permute_is_the_rope_reordering():
    # one head of 8 rows: HF halves (0..3 | 4..7) -> GGML pairs (0,4,1,5,2,6,3,7)
    w = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_qk(w, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(InvalidConfig):
        permute_qk(np.zeros((6, 2)), 4)


def test_gguf_q8_0_types_and_values(hub, tmp_path):
    import gguf
    from safetensors.torch import load_file

    row = _export(hub, "gguf", tmp_path / "q", quant="q8_0")
    r = _reader(tmp_path / "q" / "tinyad-v1-merged.q8_0.gguf")
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.ffn_up.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["output_norm.weight"] == "F32"
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    t = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight")
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(32, 64)
    want = load_file(str(Path(hub["store"].resolve(hub["merge"]["path"])) / "model.safetensors"))[
        "model.layers.0.self_attn.v_proj.weight"].numpy()
    assert np.abs(got - want).max() < np.abs(want).max() / 100
    assert row["check_result"]["static"]["tensor_types"]["Q8_0"] == 2 * 7 + 1


def test_gguf_lora_structure_rslora_and_no_fake_url(hub, tmp_path, tiny_base_dir):
    from safetensors.torch import load_file

    from loradex.promote.export.gguf_lora import write_lora_gguf

    ad = make_adapter(tiny_base_dir, tmp_path / "rs", r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj"),
                      use_rslora=True, seed=3)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).exists()  # a local path, as PEFT writes it
    info = write_lora_gguf(ad, hub["catalog"].one("SELECT config FROM bases WHERE name='tiny'")["config"],
                           tmp_path / "rs.gguf", base_name="tiny")
    r = _reader(tmp_path / "rs.gguf")
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    assert math.isclose(_field(r, "adapter.lora.alpha"), 8 * math.sqrt(4), rel_tol=1e-6)
    assert info["rslora"] and info["pairs"] == 6
    for key, f in r.fields.items():
        if f.types and f.types[0].name == "STRING":
            assert "huggingface.co" not in str(f.contents()), key
    assert _field(r, "general.base_model.0.name") == "tiny"
    names = {t.name: t for t in r.tensors}
    assert set(names) == {f"blk.{i}.attn_{p}.weight.lora_{x}" for i in range(2) for p in "qkv" for x in "ab"}
    w = load_file(str(ad / "adapter_model.safetensors"))
    b_q = w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    b_k = w["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].numpy()
    b_v = w["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].numpy()
    a_q = w["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].numpy()
    got = {n: np.asarray(names[f"blk.0.attn_{n}.weight.lora_b"].data) for n in "qkv"}
    assert np.array_equal(got["q"], permute_qk(b_q, 4))     # lora_B of q/k permuted like the base rows
    assert np.array_equal(got["k"], permute_qk(b_k, 2))
    assert np.array_equal(got["v"], b_v)
    assert np.array_equal(np.asarray(names["blk.0.attn_q.weight.lora_a"].data), a_q)


def test_gguf_lora_export_registered_with_base(hub, tmp_path):
    row = _export(hub, "gguf-lora", tmp_path / "gl")
    _assert_registered(hub, row, "gguf-lora", merged=False)
    assert set(row["files"]) == {"tinyad-v1.lora.f32.gguf", "tiny.f16.gguf", "loradex_export.json"}
    r = _reader(tmp_path / "gl" / "tinyad-v1.lora.f32.gguf")
    assert _field(r, "adapter.lora.alpha") == 16.0
    assert len(r.tensors) == 2 * 2 * len(TARGETS)
    assert "--lora" in row["check_result"]["command"]


def test_vllm_lora_rules_on_compatible_adapter(hub):
    from loradex.promote.export.vllm import check_lora_folder

    rep = check_lora_folder(hub["adapter_dir"])
    assert rep["ok"], rep["reasons"]
    assert rep["max_lora_rank"] == 8 and rep["target_modules"] == sorted(TARGETS)


def _fake_adapter(folder: Path, r: int, **cfg) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"], "bias": "none"}
    config.update(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(r, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, r)}
    for m in cfg.get("modules_to_save") or []:
        tensors[f"base_model.model.{m}.modules_to_save.default.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_vllm_rules_flag_incompatible_adapter_with_reasons(tmp_path):
    from loradex.promote.export.vllm import check_lora_folder

    bad = _fake_adapter(tmp_path / "bad", 1024, modules_to_save=["lm_head"], use_dora=True, bias="lora_only",
                        target_modules=["q_proj", "conv1d"], init_lora_weights="pissa")
    rep = check_lora_folder(bad)
    assert not rep["ok"] and rep["max_lora_rank"] is None
    text = " | ".join(rep["reasons"])
    for needle in ("rank 1024 exceeds", "modules_to_save=['lm_head']", "DoRA", "bias='lora_only'", "conv1d",
                   "pissa", "lm_head.modules_to_save"):
        assert needle in text, needle
    assert check_lora_folder(_fake_adapter(tmp_path / "r300", 300))["max_lora_rank"] == 320
    assert check_lora_folder(_fake_adapter(tmp_path / "r9", 9))["max_lora_rank"] == 16
    assert not check_lora_folder(tmp_path / "missing")["ok"]
    # a score/classifier head is the one modules_to_save vLLM accepts
    assert check_lora_folder(_fake_adapter(tmp_path / "score", 8, modules_to_save=["score"]))["ok"]

    res = run_cli("export", "--check-vllm", str(bad))
    assert res.returncode == CheckFailed.exit_code
    assert "rank 1024 exceeds" in res.stderr and "modules_to_save" in res.stderr


def test_vllm_merged_export_tokenizer_and_report(hub, tmp_path):
    from transformers import AutoTokenizer

    from loradex.promote.export.vllm import compat_report

    row = _export(hub, "vllm", tmp_path / "v")
    _assert_registered(hub, row, "vllm", merged=True)
    model = tmp_path / "v" / "model"
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tok_cfg
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["model_max_length"] == 512
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    report = json.loads((tmp_path / "v" / "vllm_compat.json").read_text())
    assert report["ok"] and set(report["checks"]) >= {"architecture", "config_fields", "dtype", "tokenizer_files",
                                                      "tokenizer_class", "generation_config", "weights"}
    # the raw transformers-5 folder is what the report exists to catch
    raw = compat_report(Path(hub["store"].resolve(hub["merge"]["path"])))
    assert not raw["ok"] and any("TokenizersBackend" in r for r in raw["reasons"])
    tok = AutoTokenizer.from_pretrained(model)
    orig = AutoTokenizer.from_pretrained(hub["store"].resolve(hub["merge"]["path"]))
    msgs = [{"role": "user", "content": "Add 12 and 30."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == orig.apply_chat_template(msgs, tokenize=False)
    assert tok("x 12 y")["input_ids"] == orig("x 12 y")["input_ids"]
    assert row["check_result"]["command"].startswith("vllm serve ")


def test_vllm_lora_export_command(hub, tmp_path):
    row = _export(hub, "vllm-lora", tmp_path / "vl")
    _assert_registered(hub, row, "vllm-lora", merged=False)
    out = tmp_path / "vl"
    cmd = row["check_result"]["command"]
    assert cmd == (f"vllm serve {out / 'base'} --max-model-len 512 --enable-lora --max-lora-rank 8 "
                   f"--lora-modules tinyad={out / 'adapter'}")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "base" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cmd in (out / "serve.sh").read_text()


def test_ollama_modelfile_merged_and_adapter_forms(hub, tmp_path):
    row = _export(hub, "ollama", tmp_path / "o")
    _assert_registered(hub, row, "ollama", merged=True)
    text = (tmp_path / "o" / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./tinyad-v1-merged.f16.gguf" in lines and (tmp_path / "o" / "tinyad-v1-merged.f16.gguf").is_file()
    assert not any(line.startswith("ADAPTER") for line in lines)
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}" in text and "{{ .System }}" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER num_ctx 512" in lines

    row = _export(hub, "ollama", tmp_path / "oa", as_adapter=True)
    _assert_registered(hub, row, "ollama", merged=False)
    lines = (tmp_path / "oa" / "Modelfile").read_text().splitlines()
    assert "FROM ./tiny.f16.gguf" in lines and "ADAPTER ./tinyad-v1.lora.f32.gguf" in lines
    assert (tmp_path / "oa" / "tinyad-v1.lora.f32.gguf").is_file()


def test_every_export_is_listed_with_lineage(hub):
    rows = hub["catalog"].query("SELECT e.format, e.merge_id, m.adapter_version_id AS merged_from FROM exports e "
                                "LEFT JOIN merges m ON m.id = e.merge_id ORDER BY e.id")
    formats = {r["format"] for r in rows}
    assert formats == {"gguf", "gguf-lora", "vllm", "vllm-lora", "ollama"}
    assert all(r["merged_from"] == hub["version"]["id"] for r in rows if r["merge_id"] is not None)


def test_bad_options_and_out_folder(hub, tmp_path):
    with pytest.raises(InvalidConfig, match="--quant"):
        ExportOptions(format="gguf", quant="q4_k")
    with pytest.raises(InvalidConfig, match="--quant"):
        ExportOptions(format="vllm", quant="f16")
    with pytest.raises(InvalidConfig, match="--as-adapter"):
        ExportOptions(format="gguf", as_adapter=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(InvalidConfig, match="not empty"):
        _export(hub, "gguf", tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_cli_export_and_errors(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    from loradex.hub.registry import register_adapter

    register_adapter(catalog, store, make_adapter(tiny_base_dir, tmp_path / "ad", scale=0.3), "cliad", base="tiny")
    catalog.close()
    res = run_cli("export", "cliad", "--format", "gguf", "--out", str(tmp_path / "out"), "--no-run-check", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["export"]["format"] == "gguf" and data["export"]["merge_id"] is not None
    assert (tmp_path / "out" / "cliad-v1-merged.f16.gguf").is_file()
    res = run_cli("export", "cliad", "--format", "gguf", "--out", str(tmp_path / "o2"), "--quant", "q4")
    assert res.returncode == 2 and "--quant" in res.stderr and res.stderr.count("\n") == 1
    res = run_cli("export", "cliad", "--format", "gguf", "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "not empty" in res.stderr
    res = run_cli("export", "nosuch", "--format", "vllm", "--out", str(tmp_path / "o3"))
    assert res.returncode == 3
    with Catalog.open(Settings().catalog_path, wait_s=5) as cat:
        assert cat.one("SELECT count(*) AS n FROM exports")["n"] == 1


def test_a_skipped_llamacpp_run_says_so_and_names_the_extra(monkeypatch):
    """Without llama-cpp-python the export succeeds, but its output says the GGUF was not run."""
    import tomllib
    from types import SimpleNamespace

    from loradex.promote.export import gguf, llamacpp_check
    from loradex.promote.export.source import ExportOptions
    from loradex.promote.cli import _export_text

    monkeypatch.setattr(llamacpp_check, "available", lambda: False)
    rt = gguf._runtime(ExportOptions(format="gguf"), run=lambda: pytest.fail("must not run"))
    assert "NOT run" in rt["skipped"] and "loradex[llamacpp]" in rt["skipped"]
    plan = SimpleNamespace(source=SimpleNamespace(label="x@1", merge=None))
    row = {"format": "gguf", "path": "/out", "files": {}, "size_bytes": 0, "id": 1, "method": "m"}
    text = _export_text(plan, row, SimpleNamespace(check={"runtime": rt}, notes=[], command=None))
    assert "runtime check: skipped (llama-cpp-python is not installed, so the GGUF was NOT run" in text
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["llamacpp"] == ["llama-cpp-python==0.3.36"]
