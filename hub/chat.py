"""Chat prompts: how every stage turns messages into the token ids a model sees.

Training, eval generation, merge probes and the llama.cpp export check all
encode through here, so one conversation gives one id sequence everywhere::

    messages --tokenizer's chat template--> text --tokenize, no extra special tokens--> ids

No special tokens are added on top of the template's own (SmolLM2's template
already starts with ``<|im_start|>``, its bos; adding bos again would double it).
"""
from __future__ import annotations

from typing import Sequence


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The template's text for ``messages`` (ending with the assistant header when ``add_generation_prompt``)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of :func:`render_chat`'s text."""
    return list(tokenizer(render_chat(tokenizer, messages, add_generation_prompt), add_special_tokens=False)["input_ids"])
