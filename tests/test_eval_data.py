"""The eval-set reader: training formats in, file:line errors out."""
from __future__ import annotations

import hashlib
import json

import pytest

from loradex.evals.data import read_eval_set
from loradex.hub.errors import InvalidData


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines if isinstance(lines[0], str) else [json.dumps(x) for x in lines]) + "\n")
    return p


def test_reads_chat_and_prompt_completion(tmp_path):
    chat = _write(tmp_path, [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ], "chat.jsonl")
    es = read_eval_set(chat)
    assert es.sha256 == hashlib.sha256(chat.read_bytes()).hexdigest() and es.format == "chat"
    assert [it.reference for it in es.items] == ["Hello.", "d"]
    assert es.items[0].messages[0] == {"role": "system", "content": "Be brief."} and es.items[0].prompt_text == "Hi"
    assert es.items[1].prompt_text == "user: a\nassistant: b\nuser: c"
    pc = _write(tmp_path, [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Paris."}]},
        {"prompt": "Capital of Italy?", "completion": [{"role": "assistant", "content": "Rome."}]},
    ], "pc.jsonl")
    es = read_eval_set(pc)
    assert es.format == "prompt_completion" and [it.reference for it in es.items] == ["4", "Paris.", "Rome."]
    assert es.items[0].messages == ({"role": "user", "content": "2+2?"},)
    assert es.items[2].messages == ({"role": "user", "content": "Capital of Italy?"},)
    assert [it.line for it in read_eval_set(pc, limit=2).items] == [1, 2]
    assert read_eval_set(pc, limit=2).sha256 == es.sha256
    both = _write(tmp_path, [json.loads(x) for x in (chat.read_text() + pc.read_text()).splitlines()], "both.jsonl")
    es = read_eval_set(both)
    assert es.format == "mixed" and [it.reference for it in es.items] == ["Hello.", "d", "4", "Paris.", "Rome."]


PC_OK = '{"prompt": "ok", "completion": "fine"}'


@pytest.mark.parametrize("line, problem", [
    ("{not json", "invalid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"text": "hello"}', "a row needs 'messages' or 'prompt' and 'completion' (found text)"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "q"}, {"role": "user", "content": "a"}]}',
     "must end with an assistant turn"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": "q"}, {"role": "assistant", "content": "a"}]}', "no user turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}', "content must be a string"),
    ('{"prompt": "q", "completion": "  "}', "empty completion"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, line, problem):
    p = _write(tmp_path, [PC_OK, "", line])
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
