"""Data files: the one JSONL reader that training and evals share, with one set of rules.

Formats, detected per row::

    chat               {"messages": [{"role": "system|user|assistant", "content": "..."}, ..., ASSISTANT]}
    prompt_completion  {"prompt": ..., "completion": ...}    each a string or a list of messages
    text               {"text": "..."}                        (training only: no reference answer)

Chat and prompt/completion rows both end in a reply and may share a file (its
format is then ``mixed``); text rows have no reply and may not share a file with them.

Rules, for training and evals alike:

* a chat row ends with an assistant turn (the reply); the turn before it is the user's;
* a prompt/completion completion is a string or exactly one assistant message; a string
  prompt is one user message, so a string prompt with a message-list completion is the
  conversational form ``[{"role": "user", "content": PROMPT}] -> [reply]``; a string
  prompt with a string completion stays plain text;
* the reply (or text) is not empty; blank lines are skipped.

Every problem is an :class:`InvalidData` naming the file, the line and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loradex.hub.errors import InvalidData

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "prompt_completion", "text")


@dataclass
class Example:
    """One checked row. ``prompt``: messages, or a string for plain prompt/completion rows, or None for text."""

    line: int
    prompt: list[dict] | str | None
    completion: dict | str | None      # the reply: an assistant message, or a string with a string prompt
    text: str | None = None

    @property
    def messages(self) -> list[dict]:
        """The prompt as chat messages (a string prompt is one user turn)."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt or [])

    @property
    def reply(self) -> str:
        return self.completion if isinstance(self.completion, str) else self.completion["content"]


@dataclass
class JsonlFile:
    path: Path
    sha256: str          # of the file's bytes: the data set's identity
    format: str          # chat | prompt_completion | text | mixed (chat and prompt_completion rows)
    examples: list[Example]


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidData(f"{where}: '{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise InvalidData(f"{where}: {field}[{i}] is not an object with role and content")
        for key in ("role", "content"):
            if key not in msg:
                raise InvalidData(f"{where}: {field}[{i}] is missing field {key!r}")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise InvalidData(f"{where}: {field}[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise InvalidData(f"{where}: {field}[{i}].content must be a string, got {type(content).__name__}")
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


def _check_prompt(prompt: list[dict], where: str) -> None:
    if not any(m["role"] == "user" for m in prompt):
        raise InvalidData(f"{where}: no user turn before the reply")
    if prompt[-1]["role"] != "user":
        raise InvalidData(f"{where}: the turn before the reply must be the user's, got {prompt[-1]['role']!r}")


def parse_row(row: Any, where: str, line: int, fmt: str) -> Example:
    """Check one decoded row of format ``fmt``; return it normalized."""
    if fmt == "chat":
        messages = _messages(row["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidData(f"{where}: messages has no assistant turn (the reply)")
        if messages[-1]["role"] != "assistant":
            raise InvalidData(f"{where}: messages must end with an assistant turn (last role is {messages[-1]['role']!r})")
        prompt, reply = messages[:-1], messages[-1]
        if not prompt:
            raise InvalidData(f"{where}: no user turn before the reply")
        _check_prompt(prompt, where)
        ex = Example(line, prompt, reply)
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in row:
                raise InvalidData(f"{where}: missing field {key!r} (prompt/completion rows need both)")
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            ex = Example(line, prompt, completion)
        else:
            if not isinstance(prompt, (str, list)) or not isinstance(completion, (str, list)):
                raise InvalidData(f"{where}: prompt and completion must each be a string or a list of messages")
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, where, "prompt")
            _check_prompt(msgs, where)
            if isinstance(completion, str):
                reply = {"role": "assistant", "content": completion}
            else:
                comp = _messages(completion, where, "completion")
                if len(comp) != 1 or comp[0]["role"] != "assistant":
                    raise InvalidData(f"{where}: completion must be exactly one assistant message")
                reply = comp[0]
            ex = Example(line, msgs, reply)
    else:
        text = row["text"]
        if not isinstance(text, str):
            raise InvalidData(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidData(f"{where}: empty text")
        return Example(line, None, None, text)
    if not ex.reply.strip():
        raise InvalidData(f"{where}: empty completion (the reply has no content)")
    return ex


def read_jsonl(path: str | Path, formats: tuple[str, ...] = FORMATS) -> JsonlFile:
    """Read and check a JSONL data file; ``formats`` are the ones the caller accepts."""
    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidData(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names = [{"chat": "'messages'", "prompt_completion": "'prompt' and 'completion'", "text": "'text'"}[f]
             for f in formats]
    fields = names[0] if len(names) == 1 else ", ".join(names[:-1]) + (", or " if len(names) > 2 else " or ") + names[-1]
    found: dict[str, int] = {}     # format -> first line
    examples: list[Example] = []
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidData(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InvalidData(f"{where}: expected a JSON object, got {type(row).__name__}")
        row_fmt = detect_format(row)
        if row_fmt not in formats:
            found = ", ".join(sorted(row)) or "no fields"
            raise InvalidData(f"{where}: missing field: a row needs {fields} (found {found})")
        other = next(((f, line) for f, line in found.items() if (f == "text") != (row_fmt == "text")), None)
        if other is not None:
            raise InvalidData(f"{where}: this row is {row_fmt} but line {other[1]} is {other[0]}; text rows have no "
                              "reply and cannot share a file with chat or prompt/completion rows")
        found.setdefault(row_fmt, n)
        examples.append(parse_row(row, where, n, row_fmt))
    if not examples:
        raise InvalidData(f"{path}: no examples (the file is empty)")
    fmt = next(iter(found)) if len(found) == 1 else "mixed"
    return JsonlFile(path.absolute(), hashlib.sha256(raw).hexdigest(), fmt, examples)
