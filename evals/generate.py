"""Model-side work on a plain transformers model: teacher-forced perplexity, and a reference greedy generator.

``loradex eval`` generates on the serving engine (:mod:`evals.engine_eval`), so a
score describes what ``loradex serve`` answers; it uses
:func:`reference_perplexities` here on the engine's loaded model.
:func:`generate_outputs` (``transformers.generate``, left-padded batches) is the
plain-transformers reference the engine is checked against, kept for that.

Prompts go through the base's chat template with ``hub.chat.encode_chat``
(``add_generation_prompt=True``), exactly as serving and training see them. Batches are formed from
length-sorted items (less padding) and results are put back in item order.

Generation pads on the **left** so every row's last prompt token sits at the
end of the batch, where the first new token is predicted::

    [pad pad p1 p2 p3] -> g1 g2 ...
    [p1 p2 p3 p4 p5 ] -> g1 g2 ...

Perplexity pads on the right and scores only the reference tokens plus the
end-of-turn token (the prompt is context, not scored).
"""
from __future__ import annotations

import math
from typing import Callable

from loradex.hub.chat import completion_logprobs, encode_chat, pad_id


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_outputs(model, tokenizer, items, *, max_new_tokens: int, batch_size: int,
                     on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy completions for ``items`` (EvalItem-like, with ``.messages``), in item order."""
    import torch
    from transformers import GenerationConfig

    encoded = [encode_chat(tokenizer, it.messages) for it in items]
    pad = pad_id(tokenizer)
    gen_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(items)
    for batch in _batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = encoded[i]
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config)
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(batch))
    return outputs


def reference_perplexities(model, tokenizer, items, *, batch_size: int,
                           on_batch: Callable[[int], None] | None = None) -> list[float]:
    """exp(mean NLL) of each item's reference (+ end of turn) after its templated prompt."""
    pad = pad_id(tokenizer)
    seqs: list[tuple[list[int], int]] = []  # (ids, number of prompt tokens)
    for it in items:
        p = encode_chat(tokenizer, it.messages)
        ref = tokenizer(it.reference, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ref = ref + [tokenizer.eos_token_id]
        seqs.append((p + ref, len(p)))
    result: list[float] = [math.nan] * len(items)
    for batch in _batches([len(s[0]) for s in seqs], batch_size):
        sums, counts = completion_logprobs(model, [seqs[i] for i in batch], pad)
        nll = -sums / counts
        for row, i in enumerate(batch):
            result[i] = float(math.exp(nll[row].item()))
        if on_batch:
            on_batch(len(batch))
    return result
