"""Training data: read JSONL, check every row, detect the format, tokenize, mask.

Formats and row rules are those of ``hub/jsonl.py`` (shared with evals): ``chat``
(messages ending with an assistant turn), ``prompt_completion`` (strings or chat
messages, TRL's "conversational prompt/completion") and ``text``.

Loss is on completion tokens only for ``chat`` and ``prompt_completion``; a chat
row becomes prompt = every message before the last assistant turn, completion =
that turn (TRL's ``assistant_only_loss`` refuses SmolLM2's template, so the
masking is done here)::

    <|im_start|>system ... <|im_start|>user ... <|im_start|>assistant\\n | Paris.<|im_end|>\\n
    labels: -100 -100 ...                                            -100 | Paris.<|im_end|>\\n

``text`` rows train on every token. Every problem is an :class:`InvalidData`
naming the file, the line and what is wrong, raised before any model loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loradex.hub.errors import InvalidData
from loradex.hub.chat import has_chat_template, render_chat
from loradex.hub.jsonl import Example, read_jsonl

IGNORE = -100


@dataclass
class Dataset:
    """A checked, tokenized file."""

    path: Path
    sha256: str
    format: str
    rows: list[dict]               # {"input_ids": [...], "labels": [...]} per example
    truncated: int = 0             # examples cut to max_length
    truncated_lines: list[int] = field(default_factory=list)
    tokens: int = 0                # total tokens after truncation
    trained_tokens: int = 0        # tokens carrying loss

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict:
        return {"examples": len(self.rows), "format": self.format, "truncated": self.truncated,
                "truncated_lines": self.truncated_lines[:20], "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "sha256": self.sha256}


def read_examples(path: str | Path) -> tuple[str, list[Example]]:
    """(format, examples) of a JSONL file; raises InvalidData on the first bad row."""
    data = read_jsonl(path)
    return data.format, data.examples


def _render(tokenizer, ex: Example, chat_template: bool, where: str) -> tuple[str, str]:
    """(prompt text, completion text) exactly as the model will see them."""
    if ex.prompt is None:
        return "", ex.text + (tokenizer.eos_token or "")
    if isinstance(ex.prompt, str) and not (chat_template and has_chat_template(tokenizer)):
        return ex.prompt, ex.completion + (tokenizer.eos_token or "")
    if not has_chat_template(tokenizer):
        raise InvalidData(f"{where}: chat rows need a base with a chat template, and this base's tokenizer has none")
    prompt = ex.messages
    reply = {"role": "assistant", "content": ex.reply}
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full_text = render_chat(tokenizer, prompt + [reply], add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise InvalidData(f"{where}: the base's chat template renders the prompt differently with and without the reply; "
                          "cannot tell completion tokens apart")
    return prompt_text, full_text[len(prompt_text):]


def tokenize_example(tokenizer, ex: Example, max_length: int, *, chat_template: bool = True,
                     where: str = "") -> tuple[dict, bool]:
    """({"input_ids", "labels"}, truncated?) with prompt tokens masked to -100.

    The prompt's ids are exactly ``hub.chat.encode_chat``'s (what eval and serving feed the model);
    the completion is tokenized on its own after them.
    """
    prompt_text, completion_text = _render(tokenizer, ex, chat_template, where)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"] if prompt_text else []
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    if ex.prompt is not None and len(prompt_ids) >= max_length:
        raise InvalidData(
            f"{where}: the prompt alone is {len(prompt_ids)} tokens, at least --max-length {max_length}; "
            "no completion token would be trained (raise --max-length or shorten the prompt)"
        )
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + list(completion_ids)
    truncated = len(input_ids) > max_length
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}, truncated


def load_dataset(path: str | Path, tokenizer, max_length: int, *, chat_template: bool = True) -> Dataset:
    """Read, check and tokenize a JSONL file."""
    data = read_jsonl(Path(path).absolute())
    path = data.path
    ds = Dataset(path=path, sha256=data.sha256, format=data.format, rows=[])
    for ex in data.examples:
        row, truncated = tokenize_example(tokenizer, ex, max_length, chat_template=chat_template,
                                          where=f"{path}:{ex.line}")
        if truncated:
            ds.truncated += 1
            ds.truncated_lines.append(ex.line)
        ds.tokens += len(row["input_ids"])
        ds.trained_tokens += sum(1 for x in row["labels"] if x != IGNORE)
        ds.rows.append(row)
    return ds


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad a batch; padding is masked out of attention and loss."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
