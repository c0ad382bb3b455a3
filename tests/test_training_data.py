"""Training data: format detection, completion-only label masks, and every bad-row error."""
from __future__ import annotations

import json

import pytest

from loradex.hub.errors import InvalidData
from loradex.training.data import IGNORE, collate, load_dataset, read_examples


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from loradex.hub.loading import load_tokenizer

    return load_tokenizer(tiny_base_dir, 512)


def write(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def chat(q, a, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def trained_text(tok, row) -> str:
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])


def masked_text(tok, row) -> str:
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab == IGNORE])


def test_chat_rows_train_on_the_last_assistant_turn_only(tmp_path, tok):
    path = write(tmp_path / "chat.jsonl", [
        chat("What is the capital of France?", "Paris, matey!", system="Talk like a pirate."),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "EARLIER TURN"},
                      {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Final answer."}]},
    ])
    ds = load_dataset(path, tok, 256)
    assert ds.format == "chat" and len(ds) == 2
    first, second = ds.rows
    # the completion is the assistant reply plus the template's end-of-turn token, nothing else
    assert trained_text(tok, first) == "Paris, matey!<|im_end|>\n"
    prompt = masked_text(tok, first)
    assert "Talk like a pirate." in prompt and "What is the capital of France?" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # an earlier assistant turn is context, not target
    assert trained_text(tok, second) == "Final answer.<|im_end|>\n"
    assert "EARLIER TURN" in masked_text(tok, second)
    # masked positions are exactly the prompt prefix
    n_prompt = sum(1 for lab in first["labels"] if lab == IGNORE)
    assert all(lab == IGNORE for lab in first["labels"][:n_prompt])
    assert first["labels"][n_prompt:] == first["input_ids"][n_prompt:]


def test_default_system_prompt_is_masked(tmp_path, tok):
    ds = load_dataset(write(tmp_path / "c.jsonl", [chat("Q?", "A.")]), tok, 256)
    row = ds.rows[0]
    assert "You are a helpful AI assistant named SmolLM" in masked_text(tok, row)
    assert trained_text(tok, row) == "A.<|im_end|>\n"


def test_prompt_completion_strings_use_the_chat_template(tmp_path, tok):
    ds = load_dataset(write(tmp_path / "pc.jsonl", [{"prompt": "2+2?", "completion": "4"}]), tok, 256)
    assert ds.format == "prompt_completion"
    row = ds.rows[0]
    assert trained_text(tok, row) == "4<|im_end|>\n"
    assert "<|im_start|>user\n2+2?" in masked_text(tok, row)


def test_prompt_completion_raw_without_template(tmp_path, tok):
    ds = load_dataset(write(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}]), tok, 256,
                      chat_template=False)
    row = ds.rows[0]
    assert masked_text(tok, row) == "2+2="
    assert trained_text(tok, row) == " 4" + tok.eos_token


def test_conversational_prompt_completion(tmp_path, tok):
    ds = load_dataset(write(tmp_path / "pc.jsonl", [{
        "prompt": [{"role": "user", "content": "Name a color."}],
        "completion": [{"role": "assistant", "content": "Blue."}]}]), tok, 256)
    assert trained_text(tok, ds.rows[0]) == "Blue.<|im_end|>\n"


def test_text_rows_train_on_every_token(tmp_path, tok):
    ds = load_dataset(write(tmp_path / "t.jsonl", [{"text": "Once upon a time there was a fox."}]), tok, 256)
    row = ds.rows[0]
    assert ds.format == "text"
    assert row["labels"] == row["input_ids"]
    assert tok.decode(row["input_ids"]) == "Once upon a time there was a fox." + tok.eos_token


def test_over_long_examples_are_truncated_and_counted(tmp_path, tok):
    long_answer = "word " * 200
    path = write(tmp_path / "long.jsonl", [chat("Q?", "short"), chat("Q?", long_answer), chat("Q2?", long_answer)])
    ds = load_dataset(path, tok, 64)
    assert ds.truncated == 2 and ds.truncated_lines == [2, 3]
    assert all(len(r["input_ids"]) <= 64 and len(r["labels"]) == len(r["input_ids"]) for r in ds.rows)
    assert ds.counts()["truncated"] == 2


def test_collate_pads_and_masks(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(rows, pad_id=tok.pad_token_id)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


BAD_ROWS = [
    ("invalid JSON", ['{"messages": [', ], 1, "invalid JSON"),
    ("not an object", ['[1, 2]'], 1, "expected a JSON object"),
    ("missing field", [json.dumps({"question": "x"})], 1, "missing field"),
    ("missing completion", [json.dumps({"prompt": "x"})], 1, "missing field 'completion'"),
    ("unknown role", [json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                               {"role": "assistant", "content": "x"}]})], 1, "unknown role 'wizard'"),
    ("missing content", [json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]})],
     1, "missing field 'content'"),
    ("empty completion (chat)", [json.dumps(chat("ok?", "fine")), json.dumps(chat("Q?", "   "))], 2, "empty completion"),
    ("empty completion (prompt/completion)", [json.dumps({"prompt": "Q", "completion": ""})], 1, "empty completion"),
    ("no assistant turn", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})], 1, "no assistant turn"),
    ("ends with user", [json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                 {"role": "user", "content": "c"}]})], 1, "must end with an assistant turn"),
    ("text mixed with chat", [json.dumps(chat("Q", "A")), "", json.dumps({"text": "x"})], 3,
     "cannot share a file with chat or prompt/completion rows"),
    ("non-string content", [json.dumps({"messages": [{"role": "user", "content": 3},
                                                     {"role": "assistant", "content": "x"}]})], 1, "must be a string"),
    ("empty text", [json.dumps({"text": ""})], 1, "empty text"),
]


@pytest.mark.parametrize("what,lines,bad_line,message", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_rows_name_file_line_and_problem(tmp_path, tok, what, lines, bad_line, message):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InvalidData) as err:
        load_dataset(path, tok, 128)
    text = str(err.value)
    assert f"bad.jsonl:{bad_line}:" in text, text
    assert message in text, text


def test_empty_and_missing_files(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidData, match="empty.jsonl: no examples"):
        read_examples(tmp_path / "empty.jsonl")
    with pytest.raises(InvalidData, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")


def test_prompt_longer_than_max_length_is_an_error(tmp_path, tok):
    path = write(tmp_path / "p.jsonl", [chat("word " * 100, "answer")])
    with pytest.raises(InvalidData, match=r"p.jsonl:1: the prompt alone is \d+ tokens"):
        load_dataset(path, tok, 32)
