"""Exports run in llama.cpp (llama-cpp-python) on the real SmolLM2-135M base, compared with transformers.

Marker ``llamacpp`` (CI runs it after ``bash .ci/setup_llamacpp.sh``):

* merged GGUF f16: same prompt token ids, then the same 32 greedy tokens as transformers
  (both sides stop at EOS);
* merged GGUF q8_0: teacher-forced top-1 agreement along transformers' continuation;
* GGUF LoRA over the f16 base GGUF: the same 32 greedy tokens as base + adapter in transformers.

Each export also records its own runtime check; the tests assert it and re-check one
prompt independently with llama_cpp's API.
"""
from __future__ import annotations

import pytest
import torch

from loradex.promote.export.run import export_adapter
from loradex.promote.export.source import ExportOptions
from tests.helpers import export_world, hf_greedy_chat

pytestmark = pytest.mark.llamacpp

N = 32
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a bicycle works, step by step.",
    "What is 17 times 23? Show your working.",
]


@pytest.fixture(scope="module")
def real(tmp_path_factory, smollm_folder):
    world = export_world(tmp_path_factory.mktemp("llamacpp"), smollm_folder, PROMPTS)
    yield world
    world["catalog"].close()


def _export(real, fmt, out, **kw):
    return export_adapter(real["catalog"], real["store"], "smolad@1", out,
                          ExportOptions(format=fmt, check_tokens=N, **kw), real["settings"])



def _llama_greedy(path, text, lora=None):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=1,
                          verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        out = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(t)
            if t == llm.token_eos() or len(out) == N:
                break
        return ids, out
    finally:
        llm.close()


def test_merged_gguf_f16_equals_transformers(real, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = _export(real, "gguf", tmp_path / "f16")
    rt = row["check_result"]["runtime"]
    print(f"\nf16 llama.cpp vs transformers: {rt['exact_probes']}/{rt['probes']} probes, "
          f"{rt['equal_tokens']}/{rt['tokens']} tokens equal")
    assert rt["ok"] and rt["prompt_ids_equal"] == rt["probes"] == len(PROMPTS)
    assert rt["exact_probes"] == len(PROMPTS) and rt["tokens"] >= 2 * N

    merged = real["store"].resolve(real["merge"]["path"])
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    text, hf_ids, hf_new = hf_greedy_chat(model, tok, PROMPTS[2], N)[1:]   # digits: the pre-tokenizer matters here
    ll_ids, ll_new = _llama_greedy(tmp_path / "f16" / "smolad-v1-merged.f16.gguf", text)
    assert ll_ids == hf_ids
    assert ll_new == hf_new and len(hf_new) >= 8


def test_merged_gguf_q8_0_teacher_forced_agreement(real, tmp_path):
    row = _export(real, "gguf", tmp_path / "q8", quant="q8_0")
    rt = row["check_result"]["runtime"]
    tf = rt["teacher_forced"]
    print(f"\nq8_0 teacher-forced top-1 agreement: {tf['match']}/{tf['of']} = {tf['rate']:.3f}")
    assert rt["prompt_ids_equal"] == len(PROMPTS)
    assert tf["of"] >= 2 * N and tf["rate"] >= 0.9
    assert row["check_result"]["static"]["tensor_types"]["Q8_0"] > 200


def test_gguf_lora_over_f16_base_equals_base_plus_adapter(real, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = _export(real, "gguf-lora", tmp_path / "lora")
    rt = row["check_result"]["runtime"]
    print(f"\nGGUF LoRA over f16 base vs transformers base+adapter: {rt['exact_probes']}/{rt['probes']} probes, "
          f"{rt['equal_tokens']}/{rt['tokens']} tokens equal")
    assert rt["ok"] and rt["exact_probes"] == len(PROMPTS)

    base = AutoModelForCausalLM.from_pretrained(real["base_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(real["base_dir"])
    text, hf_ids, base_new = hf_greedy_chat(base, tok, PROMPTS[0], N)[1:]
    ad_model = PeftModel.from_pretrained(base, str(real["adapter_dir"])).eval()
    _, _, ad_new = hf_greedy_chat(ad_model, tok, PROMPTS[0], N)[1:]
    assert ad_new != base_new, "the adapter must change the greedy tokens for this test to prove anything"
    out = tmp_path / "lora"
    ll_ids, ll_new = _llama_greedy(out / "smollm2-135m-instruct.f16.gguf", text, lora=out / "smolad-v1.lora.f32.gguf")
    assert ll_ids == hf_ids and ll_new == ad_new
