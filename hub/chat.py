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


def pad_id(tokenizer) -> int | None:
    """The id batches are padded with: the tokenizer's pad token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def completion_logprobs(model, batch: Sequence[tuple[list[int], int]], pad_id: int):
    """One forward over ``batch`` of (token ids, number of prompt tokens), right-padded with ``pad_id``.

    Returns two tensors [rows]: the sum of log p(token) over each row's tokens after its prompt (each
    predicted from everything before it), and how many such tokens the row has. Perplexity (evals) and
    DPO's pair scores (training) both read completions this way."""
    import torch

    device = next(model.parameters()).device
    width = max(len(seq) for seq, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (seq, n_prompt) in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    # position t predicts token t+1
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:].to(device)
    valid = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(dim=1), valid.sum(dim=1)
