"""The OpenAI routes' engine dependency, without a model: not ready -> 503, and a stand-in engine via overrides."""
from __future__ import annotations

import pytest

KEY = "k-1"


class StandInEngine:
    """Just what /ready and /v1/models/{model} ask of an engine."""

    base_name = "stand-in"

    def stats(self) -> dict:
        return {"base": self.base_name, "quantize": "nf4", "device": "cpu", "active": 2, "waiting": 1, "context": 64,
                "loaded_adapters": [{"adapter": "a", "version": 3, "slot": 0, "users": 2, "pinned": True}],
                "lora_bank_bytes": 1024, "merged_models": [],
                "kernels": {"linear": "dense", "lm_head": "fp16", "reason": "measured"}}

    def resolve(self, model=None, adapter=None):
        from loradex.serving.errors import ModelNotFound
        from loradex.serving.router import Target

        if model == self.base_name:
            return Target(self, None, "base", model)
        if model == "a@3":
            return Target(self, {"adapter": "a", "version": 3}, "adapter", model)
        raise ModelNotFound(f"model {model!r} not found")


@pytest.fixture
def client(tmp_path):
    """An app over an empty home (its base never loads), behind an API key."""
    from fastapi.testclient import TestClient

    from loradex.hub.settings import Settings
    from loradex.serving.app import create_app
    from loradex.serving.config import EngineConfig, ServerConfig

    app = create_app(ServerConfig(engine=EngineConfig(base="no-such-base", quantize="none"), api_key=KEY),
                     settings=Settings(home=tmp_path / "home", store=tmp_path / "store"))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        app.state.server.wait_loaded(30)
        yield app, c


def test_engine_dependency_answers_503_until_an_engine_is_there(client):
    app, c = client
    assert c.get("/health").json() == {"status": "ok"}
    for method, url, body in (("GET", "/ready", None), ("GET", "/v1/models", None), ("GET", "/v1/models/x", None),
                              ("POST", "/v1/completions", {"model": "x", "prompt": "hi"}),
                              ("POST", "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}]}),
                              ("POST", "/generate", {"prompt": "hi"})):
        r = c.request(method, url, json=body)
        assert r.status_code == 503, url
        assert r.json()["error"]["code"] == "not_ready" and "no-such-base" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "60"
    assert c.get("/ready", headers={"Authorization": "Bearer wrong"}).status_code == 401  # the key is checked first


def test_engine_dependency_can_be_overridden(client):
    from loradex.serving.deps import get_engine

    app, c = client
    engine = StandInEngine()
    app.dependency_overrides[get_engine] = lambda: engine
    r = c.get("/ready")
    assert r.status_code == 200 and r.json() == {"ready": True, **engine.stats()}
    r = c.get("/v1/models/a@3")
    assert r.status_code == 200
    card = r.json()
    assert (card["id"], card["object"], card["root"], card["parent"]) == ("a@3", "model", "stand-in", "stand-in")
    assert c.get("/v1/models/stand-in").json()["parent"] is None
    r = c.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
