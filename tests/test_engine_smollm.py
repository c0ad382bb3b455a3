"""The engine on the real default base (SmolLM2-135M, NF4 on CPU): mixed batches and PEFT agreement.

bitsandbytes' CPU 4-bit kernel differs from its first-forward (dequantized)
path, so every comparison here is made within this process, after a warm-up
forward on each model, never against stored strings.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import make_adapter

pytestmark = pytest.mark.integration

SPECS = {"qv16": (16, ("q_proj", "v_proj"), 1), "attn8": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2),
         "mlp4": (4, ("gate_proj", "up_proj", "down_proj"), 3)}
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
NEW = 12


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def real(smollm_folder, tmp_path_factory):
    from loradex.hub.bases import DEFAULT_BASE, add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.registry import register_adapter
    from loradex.hub.store import Store
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    root = tmp_path_factory.mktemp("smol-engine")
    cat = Catalog.open(root / "catalog.duckdb")
    store = Store(root / "store")
    add_base(cat, store, DEFAULT_BASE, str(smollm_folder))
    folders = {}
    for name, (r, targets, seed) in SPECS.items():
        folders[name] = make_adapter(smollm_folder, root / name, r=r, alpha=2 * r, targets=targets, seed=seed, scale=0.1)
        register_adapter(cat, store, folders[name], name, base=DEFAULT_BASE)
    engine = Engine.load(EngineConfig(quantize="nf4", max_loaded=4, batch_window_ms=50), catalog=cat, store=store)
    engine.generate("warm up", max_tokens=2, temperature=0)
    yield {"engine": engine, "catalog": cat, "store": store, "folders": folders}
    engine.shutdown()
    cat.close()


def test_mixed_batch_on_nf4_base_equals_solo_runs(real):
    eng = real["engine"]
    assert eng.loaded.quantize == "nf4"
    q = eng.loaded.model.model.layers[0].self_attn.q_proj
    # NF4 weights through bitsandbytes, dequantized once at load, or loradex's native NF4 kernel
    # (serving/kernels.py, chosen by measurement)
    want = {"dense": "Linear", "native": "NF4Linear", "bnb": "Linear4bit"}[eng.stats()["kernels"]["linear"]]
    assert type(getattr(q, "base", q)).__name__ == want
    specs = [(p, a) for p in PROMPTS for a in (None, *SPECS)]
    solo = {(p, a): eng.generate(messages=chat(p), adapter=a, max_tokens=NEW, temperature=0).token_ids for p, a in specs}
    batch = eng.generate_batch([{"messages": chat(p), "adapter": a, "max_tokens": NEW, "temperature": 0}
                                for p, a in specs])
    for (p, a), out in zip(specs, batch):
        assert out.token_ids == solo[p, a], (p, a)
    for a in SPECS:  # each adapter changes the output, so the equality above is not vacuous
        assert any(solo[p, a] != solo[p, None] for p in PROMPTS), a


def test_engine_agrees_with_peft_on_the_nf4_base(real):
    from peft import PeftModel

    from loradex.hub.bases import DEFAULT_BASE
    from loradex.hub.loading import load_base

    eng = real["engine"]
    loaded = load_base(DEFAULT_BASE, "nf4", catalog=real["catalog"], store=real["store"])
    tok = loaded.tokenizer
    peft = PeftModel.from_pretrained(loaded.model, real["folders"]["qv16"], adapter_name="qv16")
    peft.eval()
    with torch.inference_mode():
        peft(**tok("warm up", return_tensors="pt"))  # bnb repacks its CPU weights on the first forward
        for prompt in PROMPTS:
            text = tok.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")
            out = peft.generate(**ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)
            want = out[0, ids["input_ids"].shape[1]:].tolist()
            got = eng.generate(messages=chat(prompt), adapter="qv16", max_tokens=NEW, temperature=0)
            n = len(got.token_ids)  # ours stops at EOS; PEFT was told not to
            assert n > 0 and got.token_ids == want[:n], prompt
