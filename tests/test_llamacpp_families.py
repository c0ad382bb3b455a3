"""GGUF f16 and GGUF LoRA of each model family, run in llama.cpp (llama-cpp-python) against transformers.

Marker ``llamacpp`` (CI: ``bash .ci/setup_llamacpp.sh``; ``make test-runtimes``). Per family, on the
tiny random bases of tests/family_models.py with an adapter on attention and MLP layers:

* merged f16 GGUF (the adapter merged with PEFT) vs the unmerged adapter in transformers;
* the base's f16 GGUF + the adapter's GGUF LoRA vs the same adapter in transformers.

Comparison: the prompt token ids must be equal; then llama.cpp's top-1 is read at every position of
transformers' greedy continuation (teacher-forced) and must agree wherever transformers' own top-2
margin is at least ``TIE`` (random tiny models have near-ties that f16 rounding may flip); and
llama.cpp's free-running greedy tokens must equal transformers' up to the first such near-tie
(the whole continuation when there is none).

Mistral runs without a sliding window (as Mistral v0.2/v0.3 ship): llama.cpp applies none, so a
windowed model agrees only within its window (the writer records that; test_families_export.py).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp

try:
    import llama_cpp
except ImportError:  # collected but deselected in the default run; an error when the marker is asked for
    llama_cpp = None


@pytest.fixture(autouse=True)
def _needs_llama_cpp():
    if llama_cpp is None:
        pytest.fail("llama-cpp-python is not installed: run bash .ci/setup_llamacpp.sh")


from tests.family_models import FAMILIES  # noqa: E402
from tests.helpers import make_adapter  # noqa: E402

N = 24
TIE = 0.05
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["Write a long story about a dragon who learns to bake bread.", "What is 17 times 23? Show your working."]


@pytest.fixture(scope="module")
def family(tmp_path_factory, family_base_dir):
    """family(name) -> (base folder, adapter folder); Mistral's copy has no sliding window."""
    made = {}

    def get(fam: str):
        if fam not in made:
            root = tmp_path_factory.mktemp(f"llamacpp-{fam}")
            base = family_base_dir(fam)
            if fam == "mistral":
                base = shutil.copytree(base, root / "base")
                cfg = json.loads((base / "config.json").read_text())
                cfg["sliding_window"] = None
                (base / "config.json").write_text(json.dumps(cfg))
            made[fam] = base, make_adapter(base, root / "ad", r=8, alpha=16, targets=TARGETS, scale=0.3, seed=5)
        return made[fam]

    return get


def _adapter_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _compare(gguf_path, hf_model, tok, *, lora=None) -> dict:
    from loradex.promote.export.llamacpp_check import hf_prompts, llama_greedy, open_gguf
    from loradex.promote.merge import greedy

    rendered, hf_ids = hf_prompts(tok, PROMPTS)
    reference = greedy(hf_model, hf_ids, N, [])
    out = {"decisive_agree": 0, "decisive": 0, "near_ties": 0, "free_equal_before_tie": 0, "of": 0}
    with open_gguf(gguf_path, lora=lora, logits_all=True, n_ctx=256) as llm:
        for text, ids, ref in zip(rendered, hf_ids, reference):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
            seq = ids + ref
            with torch.no_grad():
                hf = hf_model(torch.tensor([seq])).logits[0, len(ids) - 1: len(seq) - 1].float().numpy()
            llm.reset()
            llm.eval(seq)
            ll = np.asarray(llm.scores[len(ids) - 1: len(seq) - 1])
            top2 = np.sort(hf, -1)[:, -2:]
            decisive = (top2[:, 1] - top2[:, 0]) >= TIE
            agree = hf.argmax(-1) == ll.argmax(-1)
            out["decisive"] += int(decisive.sum())
            out["decisive_agree"] += int((agree & decisive).sum())
            out["near_ties"] += int((~decisive).sum())
            first_tie = int(np.argmin(decisive)) if not decisive.all() else len(ref)
            free = llama_greedy(llm, ids, N, set())
            out["free_equal_before_tie"] += int(free[:first_tie] == ref[:first_tie])
            out["of"] += 1
            out.setdefault("max_logit_diff", 0.0)
            out["max_logit_diff"] = max(out["max_logit_diff"], float(np.abs(hf - ll).max()))
    print(out)
    return out


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_merged_gguf_f16_runs_like_transformers(family, tmp_path, fam):
    from loradex.hub.loading import load_tokenizer
    from loradex.promote.export.gguf_writer import write_model_gguf

    base, adapter = family(fam)
    model = _adapter_model(base, adapter)
    merged = _adapter_model(base, adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    for f in base.iterdir():
        if not f.name.endswith(".safetensors") and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, tmp_path / "merged" / f.name)
    info = write_model_gguf(tmp_path / "merged", tmp_path / "m.f16.gguf", quant="f16")
    assert info["family"] in fam
    got = _compare(tmp_path / "m.f16.gguf", model, load_tokenizer(base))
    assert got["decisive_agree"] == got["decisive"] > 0
    assert got["free_equal_before_tie"] == got["of"] == len(PROMPTS)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_gguf_lora_over_f16_base_runs_like_transformers(family, tmp_path, fam):
    from loradex.hub.loading import load_tokenizer
    from loradex.promote.export.gguf_lora import write_lora_gguf
    from loradex.promote.export.gguf_writer import write_model_gguf

    base, adapter = family(fam)
    write_model_gguf(base, tmp_path / "base.f16.gguf", quant="f16")
    cfg = json.loads((base / "config.json").read_text())
    write_lora_gguf(adapter, cfg, tmp_path / "ad.lora.gguf", dtype="f32")
    model = _adapter_model(base, adapter)
    got = _compare(tmp_path / "base.f16.gguf", model, load_tokenizer(base), lora=tmp_path / "ad.lora.gguf")
    assert got["decisive_agree"] == got["decisive"] > 0
    assert got["free_equal_before_tie"] == got["of"] == len(PROMPTS)
    # the LoRA matters: the base GGUF alone disagrees with the adapter somewhere
    alone = _compare(tmp_path / "base.f16.gguf", model, load_tokenizer(base))
    assert alone["decisive_agree"] < alone["decisive"]
