"""Run a GGUF in llama.cpp (``llama-cpp-python``) and compare its tokens with transformers.

Used by ``loradex export`` (the runtime check recorded with every GGUF export,
when llama-cpp-python is installed: ``bash .ci/setup_llamacpp.sh``) and by the
``llamacpp`` tests.

* prompt token ids are compared first: a tokenizer mismatch (wrong
  ``tokenizer.ggml.pre``, missing CONTROL types, wrong ``add_bos_token``) shows up
  here rather than as a mysterious generation difference;
* ``exact``: free-running greedy tokens, both sides stopped at EOS;
* ``teacher_forced``: llama.cpp's top-1 at every position of the transformers
  continuation (quantized files drift in free-running greedy after a near-tie).
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

from loradex.hub.chat import encode_chat, render_chat
from loradex.hub.errors import MissingDependency

# the `llamacpp` extra; its sdist compiles llama.cpp (~15 min; portable flags in docs/export.md)
INSTALL = "pip install 'loradex[llamacpp]' (or bash .ci/setup_llamacpp.sh in a checkout)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def open_gguf(path: Path, *, lora: Path | None = None, logits_all: bool = False, n_ctx: int = 1024):
    if not available():
        raise MissingDependency(f"llama-cpp-python is not installed; install it with: {INSTALL}")
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_threads=1,
                n_batch=256, logits_all=logits_all, verbose=False, seed=0)
    try:
        yield llm
    finally:
        llm.close()


def hf_prompts(tokenizer, texts: list[str]) -> tuple[list[str], list[list[int]]]:
    """(rendered prompt text, transformers token ids) for each probe, through the chat template."""
    chats = [[{"role": "user", "content": text}] for text in texts]
    return [render_chat(tokenizer, msgs) for msgs in chats], [encode_chat(tokenizer, msgs) for msgs in chats]


def llama_greedy(llm, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if tok in eos or len(out) >= n:
            break
    return out


def llama_teacher_forced(llm, ids: list[int], cont: list[int]) -> int:
    import numpy as np

    llm.reset()
    llm.eval(ids + cont)
    scores = np.asarray(llm.scores[: len(ids) + len(cont)])
    pred = scores[len(ids) - 1: len(ids) - 1 + len(cont)].argmax(-1).tolist()
    return sum(int(p == c) for p, c in zip(pred, cont))


def compare(gguf: Path, hf_model, tokenizer, texts: list[str], *, mode: str, n_tokens: int,
            eos: list[int], lora: Path | None = None, min_agreement: float = 0.9) -> dict:
    """Run the probes through llama.cpp and transformers; returns the numbers and ``ok``."""
    from loradex.promote.merge import cut_at_eos, greedy

    rendered, hf_ids = hf_prompts(tokenizer, texts)
    reference = greedy(hf_model, hf_ids, n_tokens, eos)
    result: dict = {"mode": mode, "probes": len(texts), "n_tokens": n_tokens, "runtime": "llama-cpp-python"}
    import llama_cpp

    result["runtime_version"] = llama_cpp.__version__
    n_ctx = min(1024, int(getattr(hf_model.config, "max_position_embeddings", 1024) or 1024))
    with open_gguf(gguf, lora=lora, logits_all=(mode == "teacher_forced"), n_ctx=n_ctx) as llm:
        # the rendered template is tokenized as transformers does it (encode_chat): no BOS added, since
        # templates that want one (Gemma, Mistral, Llama 2) write it themselves; adding it by the
        # GGUF's add_bos_token as well would give two
        ll_ids = [llm.tokenize(r.encode(), add_bos=False, special=True) for r in rendered]
        result["prompt_ids_equal"] = sum(int(a == b) for a, b in zip(ll_ids, hf_ids))
        if result["prompt_ids_equal"] != len(texts):
            result["ok"] = False
            result["reason"] = "prompt token ids differ between llama.cpp and transformers"
            return result
        if mode == "exact":
            got = [cut_at_eos(llama_greedy(llm, ids, n_tokens, set(eos)), eos) for ids in hf_ids]
            exact = sum(int(a == b) for a, b in zip(reference, got))
            result.update({"exact_probes": exact, "tokens": sum(len(r) for r in reference),
                           "equal_tokens": sum(sum(int(x == y) for x, y in zip(a, b)) for a, b in zip(reference, got)),
                           "ok": exact == len(texts)})
            if not result["ok"]:
                result["first_diff"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                                        for a, b in zip(reference, got)]
        else:
            match = sum(llama_teacher_forced(llm, ids, cont) for ids, cont in zip(hf_ids, reference))
            total = sum(len(c) for c in reference)
            rate = match / total if total else 1.0
            result.update({"teacher_forced": {"match": match, "of": total, "rate": rate},
                           "min_agreement": min_agreement, "ok": rate >= min_agreement})
    return result
