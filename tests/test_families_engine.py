"""The serving engine on every supported model family vs transformers + PEFT.

Per family (the tiny random bases of tests/family_models.py, plus Gemma 1 and
Phi-3 built here): the base is added from its local folder with ``add_base``, three
random LoRA adapters (targets include the MLP; Phi-3's are its fused ``qkv_proj`` and
``gate_up_proj``) are registered, and ONE mixed batch through the Engine (the bare
base and each adapter, on two prompts longer than the sliding window of 8) must give,
row for row, the greedy tokens of transformers + PEFT run one row at a time. On fp32
and on NF4 (bitsandbytes' CPU path): both sides load the weights the same way and run
a warm-up forward first, because bnb repacks its CPU weights on the first forward.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.family_models import COMMON, FAMILIES, build_family, save_random_model
from tests.helpers import make_adapter

MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", *MLP), ("k_proj", "up_proj", "down_proj")]
PHI3_TARGETS = [("qkv_proj",), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("gate_up_proj", "down_proj")]
PROMPTS = ["The quick brown fox jumps over the lazy dog, and then it", "1 2 3 4 5 6 7 8 9 10 11 12 13"]
NEW = 10


def _phi3():  # fused qkv/gate_up, sliding window on every layer, rope on half of each head
    from transformers import Phi3Config, Phi3ForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return Phi3ForCausalLM, Phi3Config(**COMMON, initializer_range=0.2, sliding_window=8, tie_word_embeddings=False,
                                       rope_parameters=rope)


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM, GemmaConfig(**COMMON, initializer_range=0.1, head_dim=16,
                                         hidden_activation="gelu_pytorch_tanh")


EXTRA = {"phi3": _phi3, "gemma": _gemma}


def _build_extra(family: str, out: Path, tokenizer_dir: Path) -> Path:
    """Like tests.family_models.build_family, for the families only this module tests."""
    cls, config = EXTRA[family]()
    return save_random_model(cls, config, out, tokenizer_dir)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, family_base_dir, smol_tokenizer_dir):
    """``base_folder(family)``: that family's tiny base folder, built once."""
    root = tmp_path_factory.mktemp("families-extra")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = (family_base_dir(family) if family in FAMILIES
                             else _build_extra(family, root / family, smol_tokenizer_dir))
        return built[family]

    return get


@pytest.fixture(scope="module")
def hub(tmp_path_factory, base_folder):
    """A catalog and store; ``hub["add"](family)`` adds that base and its 3 adapters once (name = family)."""
    from loradex.hub.bases import add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.registry import register_adapter
    from loradex.hub.store import Store

    root = tmp_path_factory.mktemp("families-engine")
    cat = Catalog.open(root / "catalog.duckdb")
    store = Store(root / "store")
    added: dict[str, dict] = {}

    def add(family: str) -> dict:
        if family not in added:
            folder = base_folder(family)
            base = add_base(cat, store, family, str(folder))
            targets = PHI3_TARGETS if family == "phi3" else TARGETS
            adapters = {}
            for i, t in enumerate(targets):
                name = f"{family}-a{i}"
                ad = make_adapter(folder, root / name, r=4 * (i + 1), alpha=8, targets=t, seed=10 + i, scale=0.3)
                register_adapter(cat, store, ad, name, base=family)
                adapters[name] = ad
            added[family] = {"base": base, "folder": folder, "adapters": adapters}
        return added[family]

    yield {"catalog": cat, "store": store, "add": add}
    cat.close()


def _peft_reference(folder, adapters: dict, quantize: str, prompt_ids: list[list[int]]) -> dict:
    """{(adapter or None, prompt index): greedy tokens} from transformers + PEFT, one row at a time."""
    from peft import PeftModel

    from loradex.hub.loading import load_model_folder
    from loradex.serving.kernels import dense_layers

    model, _, dtype = load_model_folder(folder, quantize=quantize, device="cpu")
    if quantize == "nf4":  # the NF4 weights in fp32, exactly: bitsandbytes' own CPU product is bf16 on avx512_bf16
        assert dense_layers(model, dtype) > 0
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(adapters[n], adapter_name=n)
    peft.eval()
    out = {}
    with torch.inference_mode():
        peft(torch.tensor([prompt_ids[0]]))  # warm-up (bnb repacks its CPU weights on the first forward)

        def run(key):
            for j, ids in enumerate(prompt_ids):
                got = peft.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
                out[key, j] = got[0, len(ids):].tolist()

        for n in names:
            peft.set_adapter(n)
            run(n)
        with peft.disable_adapter():
            run(None)
    return out


NATIVE_FAMILIES = {"llama", "llama3", "qwen2", "qwen3", "mistral"}  # the Llama-style layer (serving/fastpath.py)


@pytest.mark.parametrize("quantize", ["none", "nf4", "nf4-native"])
@pytest.mark.parametrize("family", [*FAMILIES, *EXTRA])
def test_mixed_batch_equals_peft(hub, family, quantize, monkeypatch):
    """``nf4-native``: the NF4 base served by loradex's own CPU kernels (forced), decode steps through
    serving/fastpath.py where the family's layer allows it."""
    from loradex.serving import native
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    if quantize == "nf4-native":
        if native.library() is None:
            pytest.fail(f"native kernels unavailable on this machine: {native.status()['reason']}")
        monkeypatch.setenv("LORADEX_KERNELS", "native")
    got = hub["add"](family)
    adapters = got["adapters"]
    eng = Engine.load(EngineConfig(base=family, quantize=quantize.split("-")[0], max_loaded=4, batch_window_ms=200),
                      catalog=hub["catalog"], store=hub["store"])
    try:
        assert type(eng.scheduler.runner).__name__ == "Runner"
        # warm-up: every adapter loaded, bnb weights repacked, before the compared batch
        eng.generate_batch([{"prompt": "warm up", "adapter": a, "max_tokens": 1, "temperature": 0} for a in adapters])
        prompt_ids = [eng.encode(p) for p in PROMPTS]
        assert all(len(ids) > 8 for ids in prompt_ids)  # past the sliding window, so the window matters
        rows = [(a, j) for j in range(len(PROMPTS)) for a in (None, *adapters)]
        before = eng.scheduler.recent_steps()[-1]["step"]
        outs = eng.generate_batch([{"prompt": prompt_ids[j], "adapter": a, "max_tokens": NEW, "temperature": 0}
                                   for a, j in rows])
        prefills = [s for s in eng.scheduler.recent_steps() if s["step"] > before and s["phase"] == "prefill"]
        assert [len(s["ids"]) for s in prefills] == [len(rows)]  # one mixed batch
        if quantize == "nf4-native":
            runner = eng.scheduler.runner
            assert eng.loaded.info["kernels"]["linear"] == "native"
            fast = family in NATIVE_FAMILIES
            assert (runner.native_reason is None) == fast, runner.native_reason
            assert bool(runner._native) == fast
            decode = eng.stats()["kernels"]["decode"]
            assert decode == "native" if fast else decode == f"torch ({runner.native_reason})"
    finally:
        eng.shutdown()
    want = _peft_reference(got["folder"], adapters, quantize.split("-")[0], prompt_ids)
    for (a, j), out in zip(rows, outs):
        n = len(out.token_ids)  # the engine stops at EOS; PEFT was told not to
        assert n > 0 and out.token_ids == want[a, j][:n], (family, quantize, a, j)
    for a in adapters:  # each adapter changes the output, so the equality above is not vacuous
        assert any(want[a, j] != want[None, j] for j in range(len(PROMPTS))), a


@pytest.mark.parametrize("family", [*FAMILIES, *EXTRA])
def test_runner_logits_equal_transformers(base_folder, family):
    """Logits, not only greedy tokens (soft-capping the final logits never changes an argmax): ragged
    prefill and decode steps vs transformers' full forward of each row. Gemma 2 runs with strong
    soft-caps here, so that both its caps change the numbers."""
    from transformers import AutoModelForCausalLM

    from loradex.serving.runner import Runner

    folder = base_folder(family)
    caps = {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 3.0} if family == "gemma2" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **caps).eval()
    if caps:  # the tiny Gemma 2's scores are ~0.01; make them reach the cap
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(30)
    runner = Runner(model)
    seqs = [list(range(5, 19)), [1, 99, 12], list(range(300, 311))]
    logits, cache = runner.prefill(seqs)
    for step in range(3):
        with torch.inference_mode():
            for i, ids in enumerate(seqs):
                want = model(torch.tensor([ids])).logits[0, -1].float()
                assert torch.allclose(logits[i], want, atol=1e-4, rtol=0), (family, step, i)
        nxt = [int(t) for t in logits.argmax(-1)]
        for ids, t in zip(seqs, nxt):
            ids.append(t)
        logits = runner.decode(nxt, cache)


@pytest.mark.parametrize("family", [*FAMILIES, *EXTRA])
def test_base_record_and_plan_know_the_family_shapes(hub, family):
    """`base add` recorded the layer shapes adapters are checked against, and `plan` counts what training makes."""
    from safetensors import safe_open

    from loradex.training.plan import make_plan

    got = hub["add"](family)
    base, (name, folder) = got["base"], next(iter(got["adapters"].items()))
    targets = (PHI3_TARGETS if family == "phi3" else TARGETS)[0]
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        in_adapter = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    plan = make_plan(base=family, r=4, targets=",".join(targets), catalog_opener=lambda: hub["catalog"])
    assert plan["architecture"] == base["architecture"] and plan["total_params"] == base["num_parameters"]
    assert plan["trainable_params"] == in_adapter
    attn = "model.layers.0.self_attn."
    proj = [attn + "qkv_proj"] if family == "phi3" else [attn + "q_proj", attn + "k_proj"]
    assert all(p in base["layers"] for p in proj + ["model.layers.1.mlp.down_proj"])


def test_shipped_configs_of_the_newer_families():
    """Qwen3-8B and Gemma-2-9B as published (8.19B and 9.24B parameters on their model cards)."""
    from loradex.training.plan import make_plan

    qwen3, gemma2 = make_plan(base="qwen3-8b", r=16), make_plan(base="gemma-2-9b", r=16)
    assert (qwen3["architecture"], qwen3["total_params"]) == ("Qwen3ForCausalLM", 8_190_735_360)
    assert (gemma2["architecture"], gemma2["total_params"]) == ("Gemma2ForCausalLM", 9_241_705_984)
    # r=16 on q_proj,v_proj: 36 layers x 16 x ((4096+4096) + (4096+1024)); 42 x 16 x ((3584+4096) + (3584+2048))
    assert qwen3["trainable_params"] == 36 * 16 * (8192 + 5120)
    assert gemma2["trainable_params"] == 42 * 16 * (7680 + 5632)


def test_unsupported_architecture_is_refused_naming_the_supported_ones(hub, tmp_path, smol_tokenizer_dir, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from loradex.hub.bases import add_base
    from loradex.hub.errors import InvalidBase
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine
    from loradex.serving.families import FAMILIES as SERVED

    config = GPT2Config(vocab_size=COMMON["vocab_size"], n_embd=32, n_layer=1, n_head=2, n_positions=64)
    config.architectures = ["GPT2LMHeadModel"]
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / "gpt2" / f.name)
    add_base(hub["catalog"], hub["store"], "tiny-gpt2", str(tmp_path / "gpt2"))  # registering is fine
    import loradex.hub.loading as loading

    def never(*a, **k):
        raise AssertionError("the weights were read before the architecture was checked")

    monkeypatch.setattr(loading, "load_model_folder", never)  # refused from the catalog record, before loading
    with pytest.raises(InvalidBase) as exc:
        Engine.load(EngineConfig(base="tiny-gpt2", quantize="none"), catalog=hub["catalog"], store=hub["store"])
    msg = str(exc.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg and "'gpt2'" in msg
    assert all(t in msg for t in SERVED)
