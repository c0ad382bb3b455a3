"""Held-out eval sets: read JSONL in the training formats, hash them, name bad lines.

Accepted rows (one JSON object per line, blank lines skipped)::

    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "REFERENCE"}]}
    {"prompt": "...", "completion": "REFERENCE"}
    {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": "REFERENCE"}]}

The last assistant turn (or the completion) is the reference; everything
before it is the prompt the model sees through its chat template. Every
problem raises :class:`hub.errors.InvalidData` naming the file, the line and
what is wrong.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hub.errors import InvalidData

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class EvalItem:
    """One held-out example: the conversation so far and the reference answer."""

    messages: tuple  # tuple of {"role", "content"} dicts, ending with a user turn
    reference: str
    line: int

    @property
    def prompt_text(self) -> str:
        """What a reader sees as "the prompt": the last user turn, or a transcript for multi-turn rows."""
        turns = [m for m in self.messages if m["role"] != "system"]
        if len(turns) == 1:
            return turns[0]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


@dataclass(frozen=True)
class EvalSet:
    path: str
    sha256: str          # of the file's bytes: the data set's identity in the catalog
    items: list
    format: str          # chat | prompt_completion | mixed


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _messages(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidData(f"{where}: {field!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidData(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidData(f"{where}: {field}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InvalidData(f"{where}: {field}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_row(row, where: str, line: int) -> tuple[EvalItem, str]:
    """(item, format) for one decoded JSON row."""
    if not isinstance(row, dict):
        raise InvalidData(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = _messages(row["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise InvalidData(f"{where}: the last message must be the assistant's reference answer, got role {msgs[-1]['role']!r}")
        prompt = msgs[:-1]
        fmt = "chat"
        reference = msgs[-1]["content"]
    elif "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, where, "prompt")
        if isinstance(c, str):
            reference = c
        else:
            comp = _messages(c, where, "completion")
            if comp[-1]["role"] != "assistant":
                raise InvalidData(f"{where}: completion must end with an assistant message")
            reference = comp[-1]["content"]
        fmt = "prompt_completion"
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise InvalidData(f"{where}: expected 'messages' or 'prompt' + 'completion' fields, found {keys}")
    if not any(m["role"] == "user" for m in prompt):
        raise InvalidData(f"{where}: no user turn before the reference answer")
    if prompt[-1]["role"] != "user":
        raise InvalidData(f"{where}: the turn before the reference must be the user's, got {prompt[-1]['role']!r}")
    if not reference.strip():
        raise InvalidData(f"{where}: the reference answer is empty")
    return EvalItem(tuple(prompt), reference, line), fmt


def read_eval_set(path: str | Path, limit: int | None = None) -> EvalSet:
    """Read a JSONL eval set; ``limit`` keeps the first N items (the hash is of the whole file)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidData(f"{path}: no such file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidData(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    items: list[EvalItem] = []
    formats: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidData(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        item, fmt = parse_row(row, where, lineno)
        items.append(item)
        formats.add(fmt)
    if not items:
        raise InvalidData(f"{path}: no examples (the file is empty)")
    if limit is not None:
        items = items[:limit]
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    return EvalSet(str(p.absolute()), hashlib.sha256(raw).hexdigest(), items, fmt)
