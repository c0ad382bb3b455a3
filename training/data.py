"""Training data: read JSONL, check every row, detect the format, tokenize, mask.

Formats, detected per file from its first row (every row must then match):

* ``chat``: ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``
  ending with an assistant turn;
* ``prompt_completion``: ``{"prompt": ..., "completion": ...}``, each a string or a
  list of chat messages (TRL's "conversational prompt/completion");
* ``text``: ``{"text": "..."}``.

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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import InvalidData
from hub.store import file_sha256

ROLES = ("system", "user", "assistant")
IGNORE = -100


@dataclass
class Example:
    """One checked row, normalized: ``prompt`` is None for plain text rows."""

    line: int
    prompt: list[dict] | str | None
    completion: dict | str | None
    text: str | None = None


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


def _check_messages(value: Any, where: str, field_name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidData(f"{where}: '{field_name}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise InvalidData(f"{where}: {field_name}[{i}] is not an object with role and content")
        if "role" not in msg:
            raise InvalidData(f"{where}: {field_name}[{i}] is missing field 'role'")
        if "content" not in msg:
            raise InvalidData(f"{where}: {field_name}[{i}] is missing field 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise InvalidData(f"{where}: {field_name}[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise InvalidData(f"{where}: {field_name}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def parse_row(row: Any, where: str, fmt: str) -> Example:
    """Check one decoded row of format ``fmt``; return it normalized."""
    line = int(where.rsplit(":", 1)[1])
    if fmt == "chat":
        messages = _check_messages(row["messages"], where, "messages")
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            raise InvalidData(f"{where}: messages has no assistant turn to learn from")
        if last_assistant != len(messages) - 1:
            raise InvalidData(f"{where}: messages must end with an assistant turn (last role is {messages[-1]['role']!r})")
        completion = messages[-1]
        if not completion["content"].strip():
            raise InvalidData(f"{where}: empty completion (the last assistant message has no content)")
        return Example(line, messages[:-1], completion)
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in row:
                raise InvalidData(f"{where}: missing field {key!r} (prompt/completion rows need both)")
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise InvalidData(f"{where}: prompt and completion must both be strings or both be message lists")
        if isinstance(prompt, str):
            if not completion.strip():
                raise InvalidData(f"{where}: empty completion")
            return Example(line, prompt, completion)
        prompt_msgs = _check_messages(prompt, where, "prompt")
        completion_msgs = _check_messages(completion, where, "completion")
        if len(completion_msgs) != 1 or completion_msgs[0]["role"] != "assistant":
            raise InvalidData(f"{where}: completion must be exactly one assistant message")
        if not completion_msgs[0]["content"].strip():
            raise InvalidData(f"{where}: empty completion")
        return Example(line, prompt_msgs, completion_msgs[0])
    text = row["text"]
    if not isinstance(text, str):
        raise InvalidData(f"{where}: 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidData(f"{where}: empty text")
    return Example(line, None, None, text)


def read_examples(path: str | Path) -> tuple[str, list[Example]]:
    """(format, examples) of a JSONL file; raises InvalidData on the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"{path}: no such file")
    fmt: str | None = None
    first_line = 0
    examples: list[Example] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as exc:
            raise InvalidData(f"{path}: not UTF-8 text ({exc})") from None
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise InvalidData(f"{where}: invalid JSON ({exc.args[0] if exc.args else exc})") from None
        if not isinstance(row, dict):
            raise InvalidData(f"{where}: expected a JSON object, got {type(row).__name__}")
        row_fmt = detect_format(row)
        if row_fmt is None:
            raise InvalidData(
                f"{where}: missing field: a row needs 'messages', 'prompt' and 'completion', or 'text' "
                f"(found {', '.join(sorted(row)) or 'no fields'})"
            )
        if fmt is None:
            fmt, first_line = row_fmt, n
        elif row_fmt != fmt:
            raise InvalidData(f"{where}: this row is {row_fmt} but the file's first row (line {first_line}) is {fmt}; use one format per file")
        examples.append(parse_row(row, where, fmt))
    if not examples:
        raise InvalidData(f"{path}: no examples (the file is empty)")
    return fmt, examples


def _render(tokenizer, ex: Example, chat_template: bool, where: str) -> tuple[str, str]:
    """(prompt text, completion text) exactly as the model will see them."""
    if ex.prompt is None:
        return "", ex.text + (tokenizer.eos_token or "")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(ex.prompt, str) and not (chat_template and has_template):
        return ex.prompt, ex.completion + (tokenizer.eos_token or "")
    if not has_template:
        raise InvalidData(f"{where}: chat rows need a base with a chat template, and this base's tokenizer has none")
    prompt = [{"role": "user", "content": ex.prompt}] if isinstance(ex.prompt, str) else ex.prompt
    completion = {"role": "assistant", "content": ex.completion} if isinstance(ex.completion, str) else ex.completion
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + [completion], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise InvalidData(f"{where}: the base's chat template renders the prompt differently with and without the reply; "
                          "cannot tell completion tokens apart")
    return prompt_text, full_text[len(prompt_text):]


def tokenize_example(tokenizer, ex: Example, max_length: int, *, chat_template: bool = True,
                     where: str = "") -> tuple[dict, bool]:
    """({"input_ids", "labels"}, truncated?) with prompt tokens masked to -100."""
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
    path = Path(path).absolute()
    fmt, examples = read_examples(path)
    ds = Dataset(path=path, sha256=file_sha256(path), format=fmt, rows=[])
    for ex in examples:
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
