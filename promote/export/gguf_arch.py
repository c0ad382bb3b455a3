"""What differs per model family when a transformers model becomes a llama.cpp GGUF.

One small table, not a copy of each model. Facts checked against llama.cpp's own
conversion rules (``gguf-py`` constants and ``convert_hf_to_gguf.py``) and by running the
result in llama.cpp against transformers (tests/test_llamacpp_families.py):

    family   GGUF arch  q/k rows   norms      family keys
    llama    llama      permuted   w          rope_freqs tensor for rope_type llama3
    mistral  llama      permuted   w          none: llama.cpp applies no sliding window, so
                                             context_length = the window (noted)
    qwen2    qwen2      as is      w          q/k/v biases through the name map
    qwen3    qwen3      as is      w          attn_q_norm / attn_k_norm
    gemma2   gemma2     as is      1 + w      soft-capping, sliding window (even layers)
    gemma3   gemma3     as is      1 + w      q/k norm, sliding window pattern, local rope base

"as is": llama.cpp runs these families with NEOX-style rope (rotate halves, as
transformers does), so only the llama arch (adjacent pairs) needs the q/k row permutation.
Gemma's RMSNorm multiplies by ``1 + w`` and llama.cpp's by ``w``: every norm weight is
written with 1 added. Gemma's ``sqrt(hidden)`` embedding scale is applied by llama.cpp
itself and is not written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loradex.hub.errors import InvalidConfig


@dataclass(frozen=True)
class GGUFFamily:
    family: str
    arch: str                 # member of gguf.MODEL_ARCH
    permute_qk: bool          # llama's NORM rope rotates adjacent pairs
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)


FAMILIES = {
    "LlamaForCausalLM": GGUFFamily("llama", "LLAMA", permute_qk=True),
    "MistralForCausalLM": GGUFFamily("mistral", "LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": GGUFFamily("qwen2", "QWEN2", permute_qk=False),
    "Qwen3ForCausalLM": GGUFFamily("qwen3", "QWEN3", permute_qk=False),
    "Gemma2ForCausalLM": GGUFFamily("gemma2", "GEMMA2", permute_qk=False, norm_offset=1.0),
    "Gemma3ForCausalLM": GGUFFamily("gemma3", "GEMMA3", permute_qk=False, norm_offset=1.0),
}


def family_of(cfg: dict) -> GGUFFamily:
    from loradex.promote.families import check_architecture

    return FAMILIES[check_architecture(cfg.get("architectures"), "--format gguf", cfg.get("model_type"))]


def _rope(cfg: dict, layer_type: str | None = None) -> dict:
    """The rope parameters of a transformers 4 or 5 config (Gemma 3 keeps one set per layer type)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if layer_type and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    elif isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    return rope


def rope_theta(cfg: dict, layer_type: str | None = None) -> float:
    return float(_rope(cfg, layer_type).get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def rope_type(cfg: dict, layer_type: str | None = None) -> str:
    rope = _rope(cfg, layer_type)
    return rope.get("rope_type") or rope.get("type") or "default"


def hparams(cfg: dict) -> dict:
    """The hyperparameters every family writes, from a transformers 4 or 5 config.json."""
    n_head = cfg["num_attention_heads"]
    rtype = rope_type(cfg)
    allowed = ("default", "linear", "llama3")
    if rtype not in allowed:
        raise InvalidConfig(f"--format gguf: rope type {rtype!r} is not supported by this writer "
                            f"({', '.join(allowed)})")
    return {
        "n_layer": cfg["num_hidden_layers"],
        "n_embd": cfg["hidden_size"],
        "n_ff": cfg["intermediate_size"],
        "n_head": n_head,
        "n_head_kv": cfg.get("num_key_value_heads") or n_head,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        "n_ctx": cfg.get("max_position_embeddings", 2048),
        "eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_theta": rope_theta(cfg),
        "rope_type": rtype,
        "rope_factor": float(_rope(cfg).get("factor") or 1.0),
        "vocab": cfg["vocab_size"],
        "tied": bool(cfg.get("tie_word_embeddings", False)),
    }


def llama3_rope_factors(cfg: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for llama.cpp's ``rope_freqs`` tensor (rope_type llama3).

    transformers scales each inverse frequency by the llama3 rule (long wavelengths / factor,
    short ones kept, a smooth blend between); llama.cpp divides by ``rope_freqs`` instead, so
    the tensor holds original / scaled.
    """
    rope = _rope(cfg)
    base, factor = rope_theta(cfg), float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    final = np.where(medium, blended, scaled)
    return (inv / final).astype(np.float32)


def _layer_types(cfg: dict) -> list[str]:
    types = cfg.get("layer_types")
    if types:
        return list(types)
    return ["full_attention"] * cfg["num_hidden_layers"]


def mistral_window(fam: GGUFFamily, cfg: dict, hp: dict) -> int | None:
    """Mistral's sliding window when the model's context can exceed it (Mistral v0.1: 4096 of 32768), else None."""
    window = cfg.get("sliding_window")
    if fam.family == "mistral" and window and int(window) < hp["n_ctx"]:
        return int(window)
    return None


def context_length(fam: GGUFFamily, cfg: dict, hp: dict) -> int:
    """The context length to declare: Mistral's window where llama.cpp would otherwise run past it."""
    return mistral_window(fam, cfg, hp) or hp["n_ctx"]


def add_family_keys(writer, fam: GGUFFamily, cfg: dict, hp: dict) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Write the family's own keys; returns (extra tensors to add as (name, array), notes for the record)."""
    import gguf

    extra: list[tuple[str, np.ndarray]] = []
    notes: list[str] = []
    if hp["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp["rope_factor"])
    elif hp["rope_type"] == "llama3":
        if fam.arch != "LLAMA":
            raise InvalidConfig(f"--format gguf: rope type llama3 on a {fam.family} model is not supported")
        extra.append(("rope_freqs.weight", llama3_rope_factors(cfg, hp["head_dim"])))

    window = mistral_window(fam, cfg, hp)
    if window:
        # measured (tests/test_llamacpp_families.py): llama.cpp's llama graph attends to the whole
        # context even with llama.attention.sliding_window written, so the file declares the
        # window as its context length, the span over which it equals transformers
        notes.append(f"llama.cpp does not apply Mistral's sliding window ({window} tokens): context_length is "
                     f"written as {window} (not {hp['n_ctx']}); beyond {window} tokens llama.cpp attends to the "
                     f"whole context and differs from transformers")
    if fam.family == "qwen2" and cfg.get("use_sliding_window"):
        raise InvalidConfig("--format gguf: Qwen2 with use_sliding_window=true has no llama.cpp equivalent")
    if fam.family in ("gemma2", "gemma3"):
        types = _layer_types(cfg)
        if cfg.get("sliding_window"):
            writer.add_sliding_window(int(cfg["sliding_window"]))
        scalar = cfg.get("query_pre_attn_scalar")
        if scalar is not None and int(scalar) != hp["head_dim"]:
            raise InvalidConfig(f"--format gguf: query_pre_attn_scalar {scalar} differs from head_dim "
                                f"{hp['head_dim']}; llama.cpp scales queries by 1/sqrt(head_dim) here")
        if fam.family == "gemma2":
            expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hp["n_layer"])]
            if types != expected:
                raise InvalidConfig("--format gguf: Gemma 2 in llama.cpp alternates sliding (even) and full "
                                    f"(odd) layers; this model's layer_types are {types}")
            for key, fn in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                            ("final_logit_softcapping", writer.add_final_logit_softcapping)):
                if cfg.get(key) is not None:
                    fn(float(cfg[key]))
        else:
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
            writer.add_rope_freq_base_swa(rope_theta(cfg, "sliding_attention"))
            if cfg.get("final_logit_softcapping") is not None:
                writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
            if cfg.get("attn_logit_softcapping") is not None:
                raise InvalidConfig("--format gguf: Gemma 3 with attn_logit_softcapping is not supported")
    return extra, notes
