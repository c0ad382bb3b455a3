"""Held-out eval sets: the training formats (read by ``hub/jsonl.py``, same rules and messages).

Accepted rows (one JSON object per line, blank lines skipped; chat and prompt/completion rows may mix)::

    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "REFERENCE"}]}
    {"prompt": "...", "completion": "REFERENCE"}
    {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": "REFERENCE"}]}

The last assistant turn (or the completion) is the reference; everything
before it is the prompt the model sees through its chat template (a string
prompt is one user turn). ``text`` rows have no reference and are refused.
Every problem raises :class:`hub.errors.InvalidData` naming the file, the line
and what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loradex.hub.jsonl import read_jsonl
from loradex.hub.store import file_sha256  # noqa: F401  (evals.leaderboard hashes data files through here)


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


def read_eval_set(path: str | Path, limit: int | None = None) -> EvalSet:
    """Read a JSONL eval set; ``limit`` keeps the first N items (the hash is of the whole file)."""
    data = read_jsonl(path, formats=("chat", "prompt_completion"))
    items = [EvalItem(tuple(ex.messages), ex.reply, ex.line) for ex in data.examples]
    if limit is not None:
        items = items[:limit]
    return EvalSet(str(data.path), data.sha256, items, data.format)
