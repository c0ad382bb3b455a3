"""The model families the batched engine serves, and what differs between them: one row each.

The runner (``serving/runner.py``) runs every family with one layer loop built from
the loaded transformers model's own modules: its embedding (Gemma's scales by
sqrt(hidden) itself), norms (Gemma's ``1 + w``), rotary embedding (Llama 3 and
other ``rope_parameters`` scalings live in it), MLP, q/k norms and the modeling
file's own ``apply_rotary_pos_emb`` (Phi-3's rotates part of each head). What the
loop cannot learn from the modules is in :data:`FAMILIES`::

    layer i:  x = input_norm(h)
              q, k, v = q_proj/k_proj/v_proj(x)        or split(qkv_proj(x))      [qkv]
              q, k = q_norm(q), k_norm(k)               (Qwen3, Gemma 3)           [qk_norm]
              q, k = rope(q, k, cos/sin of the layer's type)                       [rope_per_layer_type]
              o = attention over keys j with i-W < j <= i (W: the layer's window)  [window]
                  scores soft-capped c*tanh(s/c)        (Gemma 2)                  [attn_softcap]
              Llama-like:  h += o_proj(o);        h += mlp(post_attention_norm(h))
              Gemma:       h += post_attention_norm(o_proj(o))                    [sandwich_norms]
                           h += post_feedforward_norm(mlp(pre_feedforward_norm(h)))
    logits = lm_head(norm(h)), soft-capped where config.final_logit_softcapping is set

Keys are transformers ``model_type`` values; anything else is refused with
:class:`~loradex.hub.errors.InvalidBase` naming the supported families.
"""
from __future__ import annotations

from dataclasses import dataclass

from loradex.hub.errors import InvalidBase


@dataclass(frozen=True)
class Family:
    """How one model family's decoder layer differs from plain Llama."""

    label: str                        # for people: README, error messages
    qkv: str = "separate"             # "separate": q_proj/k_proj/v_proj; "fused": one qkv_proj (Phi-3)
    qk_norm: bool = False             # per-head RMSNorm of q and k before rope (self_attn.q_norm/k_norm)
    sandwich_norms: bool = False      # Gemma 2/3: norms after attention and around the MLP
    window: str = "none"              # sliding-window attention: "none"; "all" layers use
                                      # config.sliding_window (Mistral, Phi-3); "layer_types": the
                                      # layers config.layer_types marks "sliding_attention"
    rope_per_layer_type: bool = False  # Gemma 3: local and global layers have their own rope table
    attn_softcap: bool = False        # Gemma 2: attention scores soft-capped by config.attn_logit_softcapping


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama 1-3.x (incl. Llama 3 rope scaling), SmolLM2"),
    "qwen2": Family("Qwen2 / Qwen2.5", window="layer_types"),
    "qwen3": Family("Qwen3", qk_norm=True, window="layer_types"),
    "mistral": Family("Mistral", window="all"),
    "gemma": Family("Gemma"),
    "gemma2": Family("Gemma 2", sandwich_norms=True, window="layer_types", attn_softcap=True),
    "gemma3_text": Family("Gemma 3 (text)", qk_norm=True, sandwich_norms=True, window="layer_types",
                          rope_per_layer_type=True),
    "phi3": Family("Phi-3", qkv="fused", window="all"),
}


def supported_list() -> str:
    return ", ".join(FAMILIES)


def family_of(config) -> Family:
    """The table row for a transformers config; InvalidBase (one line, naming the supported ones) if none."""
    mtype = getattr(config, "model_type", None)
    fam = FAMILIES.get(mtype)
    if fam is None:
        arch = (getattr(config, "architectures", None) or [mtype])[0]
        raise InvalidBase(f"the batched serving engine does not run {arch} (model_type {mtype!r}); "
                          f"it runs model types {supported_list()}")
    if getattr(config, "use_bidirectional_attention", False):
        raise InvalidBase(f"{mtype} with use_bidirectional_attention is an encoder, not a causal LM; "
                          f"the batched serving engine runs causal decoders only")
    return fam


def layer_windows(fam: Family, config, n_layers: int) -> list[int | None]:
    """Each layer's sliding window W (a query at i sees keys i-W < j <= i), or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if fam.window == "none" or not window:
        return [None] * n_layers
    if fam.window == "all":
        return [int(window)] * n_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    return [int(window) if t == "sliding_attention" else None for t in types[:n_layers]]


def layer_rope_keys(fam: Family, config, n_layers: int) -> list[str | None]:
    """Which rope table each layer uses: its layer type (Gemma 3), else the model's one table (None)."""
    if not fam.rope_per_layer_type:
        return [None] * n_layers
    return list(config.layer_types[:n_layers])
