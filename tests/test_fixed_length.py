"""vLLM's ``ignore_eos`` and ``min_tokens`` extras through the HTTP API (fixed-length benchmarks), tiny base.

The tiny random base never picks its real EOS, so a copy of it declares the token greedy decoding picks
first as an extra end-of-sequence id (generation_config.json): without the extras a greedy request then
ends after one token.
"""
from __future__ import annotations

import json
import shutil

import pytest

KEY = "k-fixed"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tiny_base_dir):
    from fastapi.testclient import TestClient

    from loradex.hub.bases import add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.loading import load_tokenizer
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store
    from loradex.serving.app import create_app
    from loradex.serving.config import EngineConfig, ServerConfig

    root = tmp_path_factory.mktemp("fixed-length")
    # the first greedy token of PROMPT on the plain tiny base, found with a plain transformers forward
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    ids = load_tokenizer(tiny_base_dir)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    folder = root / "eos-base"
    shutil.copytree(tiny_base_dir, folder)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen["eos_token_id"] = [2, first]
    gen_path.write_text(json.dumps(gen))

    settings = Settings(home=root / "home", store=root / "store")
    cat = Catalog.open(settings.catalog_path, role="server")
    add_base(cat, Store(settings.store), "eosy", str(folder))
    cat.close()
    app = create_app(ServerConfig(engine=EngineConfig(base="eosy", quantize="none"), api_key=KEY), settings=settings)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        app.state.server.wait_loaded(60)
        assert app.state.server.ready
        yield app, c, first


def _completion(c, **extra):
    r = c.post("/v1/completions", json={"model": "eosy", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_plain_request_stops_at_the_declared_eos(app_client):
    _, c, _ = app_client
    out = _completion(c)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 1


def test_ignore_eos_generates_exactly_max_tokens(app_client):
    _, c, _ = app_client
    for max_tokens in (5, 12):
        out = _completion(c, ignore_eos=True, max_tokens=max_tokens)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == max_tokens
    chat = c.post("/v1/chat/completions", json={"model": "eosy", "messages": [{"role": "user", "content": PROMPT}],
                                                 "max_tokens": 7, "temperature": 0.8, "seed": 3, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 7
    assert chat.json()["choices"][0]["finish_reason"] == "length"


def test_min_tokens_suppresses_eos_until_reached(app_client):
    app, c, first = app_client
    engine = app.state.server.engine
    out = _completion(c, min_tokens=4)
    assert out["usage"]["completion_tokens"] >= 4
    # the same request in-process shows the token ids: no EOS among the first min_tokens
    done = engine.generate(PROMPT, model="eosy", max_tokens=12, temperature=0, min_tokens=4)
    assert done.completion_tokens == out["usage"]["completion_tokens"]
    assert first not in done.token_ids[:4] and 2 not in done.token_ids[:4]
    if done.finish_reason == "stop":  # it stopped at an EOS once allowed (EOS tokens are not in token_ids)
        assert done.completion_tokens >= 4


def test_min_tokens_over_max_tokens_is_a_400(app_client):
    _, c, _ = app_client
    r = c.post("/v1/completions", json={"model": "eosy", "prompt": PROMPT, "max_tokens": 3, "min_tokens": 5})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "min_tokens"
    r = c.post("/v1/completions", json={"model": "eosy", "prompt": PROMPT, "max_tokens": 3, "min_tokens": -1})
    assert r.status_code in (400, 422)
