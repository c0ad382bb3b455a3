"""Tiny random-weight bases of each model family the engine and the exports support.

Built in code from each family's transformers config class (2 layers, hidden 64, SmolLM2's
tokenizer and chat template), so tests need no download. Each family sets the features that
make it differ from plain Llama: Llama 3 rope scaling, Qwen2 q/k/v bias, Qwen3 q/k norm,
Mistral sliding window, Gemma 2 soft-capping and alternating local/global attention,
Gemma 3 q/k norm, scaled embeddings and local/global rope.

    from tests.family_models import FAMILIES, build_family
    folder = build_family("qwen2", tmp_path / "qwen2", smol_tokenizer_dir)
"""
from __future__ import annotations

import shutil
from pathlib import Path

VOCAB = 49152  # SmolLM2's tokenizer
# initializer_range: big enough that greedy tokens vary (a tied 0.02 init repeats one token);
# Gemma scales embeddings by sqrt(hidden) and keeps its default
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _llama3():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM, LlamaConfig(**COMMON, initializer_range=0.2, tie_word_embeddings=True, rope_parameters=rope)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(**COMMON, initializer_range=0.2, tie_word_embeddings=True)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM, Qwen3Config(**COMMON, initializer_range=0.2, head_dim=16, tie_word_embeddings=True)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**COMMON, initializer_range=0.2, sliding_window=8, tie_word_embeddings=False)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM, Gemma2Config(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                           hidden_activation="gelu_pytorch_tanh")


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                               layer_types=["sliding_attention", "full_attention"])


FAMILIES = {"llama3": _llama3, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma2": _gemma2,
            "gemma3": _gemma3}


def build_family(family: str, out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """Save a tiny random ``family`` base (weights, config, SmolLM2 tokenizer) in ``out``; return ``out``."""
    import torch

    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cls, config = FAMILIES[family]()
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # random init is tiny on some families (Gemma norms start at 0): make layers matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out
