"""The eval-set reader: training formats in, file:line errors out."""
from __future__ import annotations

import hashlib
import json

import pytest

from evals.data import read_eval_set
from hub.errors import InvalidData


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines if isinstance(lines[0], str) else [json.dumps(x) for x in lines]) + "\n")
    return p


def test_reads_chat_and_prompt_completion(tmp_path):
    p = _write(tmp_path, [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ])
    es = read_eval_set(p)
    assert es.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() and es.format == "mixed"
    refs = [it.reference for it in es.items]
    assert refs == ["Hello.", "4", "Paris.", "d"]
    assert es.items[0].messages[0] == {"role": "system", "content": "Be brief."} and es.items[0].prompt_text == "Hi"
    assert es.items[1].messages == ({"role": "user", "content": "2+2?"},)
    assert es.items[3].prompt_text == "user: a\nassistant: b\nuser: c"
    assert [it.line for it in read_eval_set(p, limit=2).items] == [1, 2]
    assert read_eval_set(p, limit=2).sha256 == es.sha256


@pytest.mark.parametrize("line, problem", [
    ("{not json", "invalid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"text": "hello"}', "expected 'messages' or 'prompt' + 'completion'"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "q"}, {"role": "assistant", "content": "a"}]}', "no user turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}', "content must be a string"),
    ('{"prompt": "q", "completion": "  "}', "reference answer is empty"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, line, problem):
    p = _write(tmp_path, ['{"prompt": "ok", "completion": "fine"}', "", line])
    with pytest.raises(InvalidData) as exc:
        read_eval_set(p)
    assert f"{p}:3" in str(exc.value) and problem in str(exc.value)


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(InvalidData, match="no such file"):
        read_eval_set(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidData, match="no examples"):
        read_eval_set(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidData, match="not UTF-8"):
        read_eval_set(tmp_path / "bin.jsonl")
