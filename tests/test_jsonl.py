"""Training and evals read data files with one reader (hub/jsonl.py): same rows accepted, same messages.

They used to disagree: training refused a string prompt with a message-list
completion ("must both be strings or both be message lists") while evals took it,
and evals accepted several completion messages.
"""
from __future__ import annotations

import json

import pytest

from loradex.evals.data import read_eval_set
from loradex.hub.errors import InvalidData
from loradex.training.data import load_dataset, read_examples


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _error(fn, path) -> str | None:
    try:
        fn(path)
    except InvalidData as exc:
        return str(exc)
    return None


def test_string_prompt_with_message_completion_is_one_user_turn_everywhere(tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    mixed = _write(tmp_path / "mixed.jsonl", [
        {"prompt": "Capital of France?", "completion": [{"role": "assistant", "content": "Paris."}]}])
    conversational = _write(tmp_path / "conv.jsonl", [
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Paris."}]}])
    item = read_eval_set(mixed).items[0]
    assert item.messages == ({"role": "user", "content": "Capital of France?"},) and item.reference == "Paris."
    fmt, (ex,) = read_examples(mixed)
    assert fmt == "prompt_completion" and ex.messages == list(item.messages) and ex.reply == "Paris."
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    assert load_dataset(mixed, tok, 128).rows == load_dataset(conversational, tok, 128).rows


BAD = {
    "two completion messages": [{"prompt": "Q", "completion": [{"role": "assistant", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}],
    "user completion": [{"prompt": "Q", "completion": [{"role": "user", "content": "a"}]}],
    "assistant before reply": [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x"},
                                             {"role": "assistant", "content": "A"}]}],
    "empty reply": [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}],
    "number prompt": [{"prompt": 3, "completion": "A"}],
    "unknown role": [{"messages": [{"role": "wizard", "content": "Q"}, {"role": "assistant", "content": "A"}]}],
    "no fields": [{"question": "Q"}],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_training_and_evals_refuse_the_same_rows_with_the_same_message(tmp_path, case):
    path = _write(tmp_path / "bad.jsonl", BAD[case])
    train_error = _error(read_examples, path)
    eval_error = _error(read_eval_set, path)
    assert train_error and f"{path}:" in train_error
    if case == "no fields":   # evals also name the formats they take: no 'text'
        assert "a row needs 'messages', 'prompt' and 'completion', or 'text' (found question)" in train_error
        assert "a row needs 'messages' or 'prompt' and 'completion' (found question)" in eval_error
    else:
        assert train_error == eval_error


def test_chat_and_prompt_completion_rows_may_share_a_file_text_rows_may_not(tmp_path):
    both = _write(tmp_path / "both.jsonl", [
        {"prompt": "Q", "completion": "A"},
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}])
    assert read_examples(both)[0] == "mixed" and read_eval_set(both).format == "mixed"
    with_text = _write(tmp_path / "text.jsonl", [{"prompt": "Q", "completion": "A"}, {"text": "hello"}])
    assert _error(read_examples, with_text) == (
        f"{with_text}:2: this row is text but line 1 is prompt_completion; text rows have no reply and "
        "cannot share a file with chat or prompt/completion rows")


def test_text_rows_train_but_have_no_reference(tmp_path):
    path = _write(tmp_path / "text.jsonl", [{"text": "hello"}])
    assert read_examples(path)[0] == "text"
    with pytest.raises(InvalidData, match="text.jsonl:1: missing field: a row needs 'messages' or 'prompt' and "
                                          "'completion' \\(found text\\)"):
        read_eval_set(path)
