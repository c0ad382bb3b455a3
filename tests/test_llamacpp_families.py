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

SentencePiece-style tokenizers (``mistral-spm``: Llama 2 / Mistral v0.1 style, ``gemma2-spm`` and
``gemma3-spm``: Gemma style; tests/family_models.py ``build_spm_tokenizer``, no download) on tiny
Mistral, Gemma 2 and Gemma 3 bases
sized to them: the same merged and LoRA comparisons, and llama.cpp's ids for plain prompts (with
BOS) and chat prompts equal transformers'.

Mistral runs without a sliding window in those comparisons (as Mistral v0.2/v0.3 ship). With one
(window 8), ``test_mistral_sliding_window_is_not_applied_by_llamacpp`` pins the measured fact behind
the writer's choice (context_length written as the window): llama.cpp agrees with windowed
transformers within the window and with *unwindowed* transformers beyond it.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.family_models import FAMILIES, build_family_spm
from tests.helpers import make_adapter

pytestmark = pytest.mark.llamacpp

N = 24
TIE = 0.05
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["Write a long story about a dragon who learns to bake bread.", "What is 17 times 23? Show your working."]
SPM = {"mistral-spm": ("mistral", "llama"), "gemma2-spm": ("gemma2", "gemma"),  # name -> (family, tokenizer style)
       "gemma3-spm": ("gemma3", "gemma")}
CASES = list(FAMILIES) + list(SPM)
PLAIN = ["Bread rises because yeast feeds on the sugars in flour.", "Hello world! 3.14 apples, naïve café 中文 🙂",
         "two  spaces\tand a tab\nand a new line"]


@pytest.fixture(scope="module")
def family(tmp_path_factory, family_base_dir):
    """family(name) -> (base folder, adapter folder); Mistral's copy has no sliding window."""
    made = {}

    def get(fam: str):
        if fam not in made:
            root = tmp_path_factory.mktemp(f"llamacpp-{fam}")
            if fam in SPM:
                base = build_family_spm(SPM[fam][0], root / "spm-base", SPM[fam][1])
            else:
                base = family_base_dir(fam)
            if fam.startswith("mistral"):
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
            # the rendered template carries its own BOS where the family has one (HF encodes it without adding)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
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


@pytest.mark.parametrize("fam", CASES)
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
    assert info["family"] in fam and info["tokenizer"]["model"] == ("llama" if fam in SPM else "gpt2")
    got = _compare(tmp_path / "m.f16.gguf", model, load_tokenizer(base))
    assert got["decisive_agree"] == got["decisive"] > 0
    assert got["free_equal_before_tie"] == got["of"] == len(PROMPTS)


@pytest.mark.parametrize("fam", CASES)
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


@pytest.mark.parametrize("fam", list(SPM))
def test_spm_tokenization_equals_transformers(family, tmp_path, fam):
    """Plain prompts with BOS (and the chat prompts, in _compare) tokenize to transformers' ids."""
    from loradex.hub.loading import load_tokenizer
    from loradex.promote.export.llamacpp_check import open_gguf
    from loradex.promote.export.gguf_writer import write_model_gguf

    base, _ = family(fam)
    info = write_model_gguf(base, tmp_path / "b.gguf", quant="f16")
    assert info["tokenizer"]["add_space_prefix"] == (fam == "mistral-spm")
    tok = load_tokenizer(base)
    bytes_used = 0
    with open_gguf(tmp_path / "b.gguf") as llm:
        for text in PLAIN:
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id
            bytes_used += sum(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
            assert llm.detokenize(ids).decode() == tok.decode(ids, skip_special_tokens=True), text
    assert bytes_used > 0, "no prompt reached the byte-fallback tokens"


def test_mistral_sliding_window_is_not_applied_by_llamacpp(tmp_path):
    """Window 8: the written context_length is 8; llama.cpp equals windowed transformers up to 8 tokens and
    unwindowed transformers after (so the window is ignored; if this starts failing, llama.cpp applies it)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from loradex.promote.export.llamacpp_check import open_gguf
    from loradex.promote.export.gguf_writer import write_model_gguf

    base = build_family_spm("mistral", tmp_path / "base", "llama")
    assert json.loads((base / "config.json").read_text())["sliding_window"] == 8
    info = write_model_gguf(base, tmp_path / "w.gguf", quant="f32")
    assert gguf.GGUFReader(str(tmp_path / "w.gguf")).fields["llama.context_length"].contents() == 8
    assert "sliding window (8 tokens)" in info["notes"][0]
    ids = list(range(10, 34))
    with torch.no_grad():
        windowed = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(torch.tensor([ids]))
        full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, sliding_window=None).eval()(
            torch.tensor([ids]))
    windowed, full = windowed.logits[0].numpy(), full.logits[0].numpy()
    with open_gguf(tmp_path / "w.gguf", logits_all=True, n_ctx=64) as llm:
        llm.eval(ids)
        ll = np.asarray(llm.scores[: len(ids)])
    within, beyond = slice(0, 8), slice(8, len(ids))
    print({"within_vs_windowed": float(np.abs(ll[within] - windowed[within]).max()),
           "beyond_vs_full": float(np.abs(ll[beyond] - full[beyond]).max()),
           "beyond_vs_windowed": float(np.abs(ll[beyond] - windowed[beyond]).max())})
    assert np.abs(ll[within] - windowed[within]).max() < 0.05
    assert np.abs(ll[beyond] - full[beyond]).max() < 0.05
    assert np.abs(ll[beyond] - windowed[beyond]).max() > 0.5


@pytest.mark.parametrize("fam", list(SPM))
def test_export_with_runtime_check_passes_for_spm_base(family, tmp_path, fam):
    """`loradex export --format gguf` (f32) and `gguf-lora` of an adapter on a SentencePiece-style base: the
    export's own llama.cpp check (prompt ids, then greedy tokens) passes and records it."""
    from loradex.hub.bases import add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.registry import register_adapter
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store
    from loradex.promote.export.run import export_adapter
    from loradex.promote.export.source import ExportOptions

    base, adapter = family(fam)
    settings = Settings(home=tmp_path / "home", store=tmp_path / "store")
    catalog = Catalog.open(settings.catalog_path, wait_s=5)
    try:
        store = Store(settings.store)
        add_base(catalog, store, "b", str(base))
        register_adapter(catalog, store, adapter, "ad", base="b")
        for fmt, quant in (("gguf", "f32"), ("gguf-lora", "f32")):
            row = export_adapter(catalog, store, "ad@1", tmp_path / fmt, ExportOptions(format=fmt, quant=quant,
                                                                                       check_tokens=12), settings)
            check = row["check_result"]
            runtime = check.get("runtime") or check
            print(fmt, {k: runtime.get(k) for k in ("ok", "prompt_ids_equal", "exact_probes", "probes")})
            assert runtime["ok"] and runtime["prompt_ids_equal"] == runtime["probes"] > 0, check
    finally:
        catalog.close()


def test_metaspace_first_tokenizes_as_the_note_says(tmp_path):
    """legacy=false (Metaspace "first"): plain text agrees; text after a special token or starting with a space
    gets one more "▁" in llama.cpp, as the writer's note says (if this starts failing, revisit the note)."""
    from loradex.hub.loading import load_tokenizer
    from loradex.promote.export.gguf_writer import write_model_gguf
    from loradex.promote.export.llamacpp_check import open_gguf

    base = build_family_spm("mistral", tmp_path / "base", "metaspace")
    info = write_model_gguf(base, tmp_path / "m.gguf", quant="f16")
    assert any("follows a special token" in n for n in info["notes"])
    tok = load_tokenizer(base)
    space = tok.convert_tokens_to_ids("▁")
    with open_gguf(tmp_path / "m.gguf") as llm:
        plain = PLAIN[0]
        assert llm.tokenize(plain.encode(), add_bos=True, special=False) == tok(plain)["input_ids"]
        # (text, add BOS, where llama.cpp's extra "▁" lands): after [INST]; after the BOS it adds
        for text, bos, at in (("<s>[INST] What is bread?[/INST]", False, 2), (" leading space", True, 1)):
            hf = tok(text, add_special_tokens=bos)["input_ids"]
            ll = llm.tokenize(text.encode(), add_bos=bos, special=True)
            assert ll == hf[:at] + [space] + hf[at:], (text, ll, hf)
