"""Hardening (issue 12): one request, adapter or client cannot hurt the others; the store trusts only what it hashed.

Each numbered case of the issue is reproduced here as it was found, and must now hold.
Tiny random base; HTTP cases go through a real uvicorn on loopback (``tests/test_http.py``'s ``Server``).
"""
from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import make_adapter
from tests.test_http import KEY, Server, _home


@pytest.fixture(scope="module")
def hsrv(tiny_base_dir, tmp_path_factory):
    """A server with two adapters, a small queue (--max-queued 4) and an API key."""
    from loradex.serving.config import EngineConfig, ServerConfig

    root, settings, cat, store = _home(tmp_path_factory, tiny_base_dir,
                                       {"good": (4, ("q_proj", "v_proj"), 1), "other": (4, ("q_proj",), 2)})
    config = ServerConfig(engine=EngineConfig(base="tiny", quantize="none", max_loaded=4, max_queued=4,
                                              batch_window_ms=20),
                          api_key=KEY, max_body_bytes=64 * 1024, max_upload_bytes=8 << 20)
    server = Server(config, settings, cat, store)
    server.root, server.catalog, server.store = root, cat, store
    yield server
    server.stop()
    cat.close()


def _idle(eng, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while eng.counts() != {"active": 0, "waiting": 0} and time.monotonic() < deadline:
        time.sleep(0.02)
    return eng.counts()


# -- 1. an out-of-range seed leaked a queue slot for ever ---------------------------------------------

def test_1_out_of_range_seed_is_400_and_leaks_no_queue_slot(hsrv):
    eng = hsrv.engine
    with hsrv.http() as h:
        for seed in (99999999999999999999999, -1, 2**63):
            for n in (1, 2):
                r = h.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1, "seed": seed,
                                                    "n": n})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["param"] == "seed"
        # seed + i for n > 1 passes the top: refused before anything is queued
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1, "seed": 2**63 - 1,
                                            "n": 2, "temperature": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        assert _idle(eng) == {"active": 0, "waiting": 0}
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1, "seed": 7})
        assert r.status_code == 200, r.text


def test_1_a_submit_that_fails_after_counting_returns_its_slot(hsrv):
    """Whatever makes building a request fail (here a seed torch refuses, set past validation), the count comes back."""
    from loradex.serving.sampling import SamplingParams

    eng = hsrv.engine
    target = eng.resolve("tiny")
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=1)
    params.seed = 10**30
    for _ in range(eng.config.max_queued + 2):
        with pytest.raises(Exception):
            eng.submit(eng.encode("Hi"), target, params, lambda ev: None)
    assert eng.counts()["waiting"] == 0
    assert eng.generate("Hi", model="tiny", max_tokens=1, temperature=0).completion_tokens == 1
