"""One chat encoding (hub/chat.py) for training, evals, merge probes and the llama.cpp check."""
from __future__ import annotations

import json

import pytest

from loradex.hub.chat import encode_chat, render_chat

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def tok(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def test_encode_chat_equals_the_template_s_own_tokenization(tok):
    ids = encode_chat(tok, MSGS)
    direct = list(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert ids == direct
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3        # system, user, assistant header: no extra bos
    assert render_chat(tok, MSGS).endswith("<|im_start|>assistant\n")
    assert not render_chat(tok, MSGS, add_generation_prompt=False).endswith("assistant\n")


def test_every_stage_encodes_a_prompt_alike(tmp_path, tok):
    from loradex.promote.export.llamacpp_check import hf_prompts
    from loradex.promote.merge import encode_prompts
    from loradex.training.data import IGNORE, load_dataset

    user = [{"role": "user", "content": "Capital of France?"}]
    want = encode_chat(tok, user)
    assert encode_prompts(tok, ["Capital of France?"]) == [want]
    assert hf_prompts(tok, ["Capital of France?"]) == ([render_chat(tok, user)], [want])
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": user + [{"role": "assistant", "content": "Paris."}]}) + "\n")
    row = load_dataset(path, tok, 128).rows[0]
    n_prompt = sum(1 for x in row["labels"] if x == IGNORE)
    assert row["input_ids"][:n_prompt] == want                          # training masks exactly the served prompt
