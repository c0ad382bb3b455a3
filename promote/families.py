"""The model families merge and export support, and the one-line refusal for any other.

Merge goes through transformers + PEFT and works for whatever transformers loads, but
loradex only promises (and tests) what it has checked end to end: the families below,
each merged, exported to GGUF and vLLM and compared token for token (tests/family_models.py
builds a tiny random base of each).
"""
from __future__ import annotations

from loradex.hub.errors import InvalidBase

# transformers architecture -> the family name users know
SUPPORTED = {
    "LlamaForCausalLM": "Llama 3.x",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2/Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3 (text)",
}


def supported_list() -> str:
    return ", ".join(f"{family} ({arch})" for arch, family in SUPPORTED.items())


def check_architecture(archs, what: str, model_type: str | None = None) -> str:
    """The supported architecture in ``archs`` (a name or a list), else ``InvalidBase`` naming the supported ones."""
    names = [archs] if isinstance(archs, str) else list(archs or [])
    for name in names:
        if name in SUPPORTED:
            return name
    shown = ", ".join(names) or model_type or "unknown"
    raise InvalidBase(f"{what}: architecture {shown} is not supported; supported: {supported_list()}")
