"""The HTTP API through a real uvicorn on loopback, called with the real `openai` package (tiny base)."""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.helpers import make_adapter

KEY = "test-key-123"
ADAPTERS = {f"ad{i}": (4 + 4 * (i % 3), ("q_proj", "v_proj") if i % 2 else ("q_proj", "k_proj", "o_proj", "down_proj"), i)
            for i in range(5)}
PROMPT = "The quick brown fox"


class Server:
    """uvicorn running create_app(config) in a thread; .url, .client(), .http()."""

    def __init__(self, config, settings, catalog, store, wait_ready: bool = True):
        import uvicorn

        from loradex.serving.app import create_app

        self.app = create_app(config, settings=settings, catalog=catalog, store=store)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.app.state.server.wait_loaded(60)
        assert self.app.state.server.ready or not wait_ready

    @property
    def engine(self):
        return self.app.state.server.engine

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _home(tmp_path_factory, tiny_base_dir, adapters: dict[str, tuple]):
    from loradex.hub.bases import add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.registry import register_adapter
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store

    root = tmp_path_factory.mktemp("http-home")
    settings = Settings(home=root / "home", store=root / "store")
    cat = Catalog.open(settings.catalog_path, role="server")
    store = Store(settings.store)
    add_base(cat, store, "tiny", str(tiny_base_dir))
    for name, (r, targets, seed) in adapters.items():
        folder = make_adapter(tiny_base_dir, root / "src" / name, r=r, alpha=2 * r, targets=targets, seed=seed, scale=0.3)
        register_adapter(cat, store, folder, name, base="tiny")
    return root, settings, cat, store


@pytest.fixture(scope="module")
def srv(tiny_base_dir, tmp_path_factory):
    from loradex.serving.config import EngineConfig, ServerConfig

    root, settings, cat, store = _home(tmp_path_factory, tiny_base_dir, ADAPTERS)
    config = ServerConfig(engine=EngineConfig(base="tiny", quantize="none", max_loaded=2, batch_window_ms=20),
                          api_key=KEY, max_body_bytes=64 * 1024, max_upload_bytes=8 << 20,
                          allow_path_register=[str(tmp_path_factory.getbasetemp())])
    server = Server(config, settings, cat, store)
    server.root, server.catalog, server.store = root, cat, store
    yield server
    server.stop()
    cat.close()


@pytest.fixture(scope="module")
def solo(srv):
    """Greedy completions of PROMPT for the base and each adapter, each run alone."""
    c = srv.client()
    out = {}
    for model in ["tiny", *ADAPTERS]:
        out[model] = c.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    assert len(set(out.values())) == len(out)  # every adapter changes the output
    return out


def test_completions_models_and_adapter_selection(srv, solo):
    c = srv.client()
    r = c.completions.create(model="ad1", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.model == "ad1"
    assert r.choices[0].text == solo["ad1"] and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == 4 and r.usage.total_tokens == 14
    # NAME@VERSION, the adapter body field and the query parameter (which wins)
    assert c.completions.create(model="ad2@1", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text == solo["ad2"]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"adapter": "ad3"})
    assert r.choices[0].text == solo["ad3"]
    r = c.completions.create(model="ad1", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"adapter": "ad3"},
                             extra_query={"adapter": "ad4"})
    assert r.choices[0].text == solo["ad4"]
    # several prompts and n
    r = c.completions.create(model="ad0", prompt=[PROMPT, "Hello"], max_tokens=10, temperature=0, n=2)
    assert len(r.choices) == 4 and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == solo["ad0"]
    models = c.models.list().data
    ids = {m.id: m for m in models}
    assert ids["tiny"].parent is None
    for name in ADAPTERS:
        assert ids[name].parent == "tiny" and ids[f"{name}@1"].parent == "tiny"
    assert c.models.retrieve("ad1@1").parent == "tiny"


def test_chat_and_streaming(srv):
    c = srv.client()
    messages = [{"role": "user", "content": "Say something"}]
    r = c.chat.completions.create(model="ad2", messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 10  # the chat template adds a system prompt
    stream = c.chat.completions.create(model="ad2", messages=messages, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # completions stream, raw SSE: data lines and the [DONE] terminator
    with srv.http() as h:
        with h.stream("POST", "/v1/completions", json={"model": "ad0", "prompt": PROMPT, "max_tokens": 6,
                                                        "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    body = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in body[-1]  # not asked for


def test_errors_are_openai_shaped_with_the_right_classes(srv):
    c = srv.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="ad1@7", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"adapter": "nope"})
    assert e.value.body["param"] == "adapter"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="word " * 300, max_tokens=400)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=2, n=9)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=2, stop=["a", "b", "c", "d", "e"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=2)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        srv.client(key="wrong").models.list()
    with srv.http(key=None) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert h.get("/health").json() == {"status": "ok"}  # the one open route
        assert h.get("/metrics").status_code == 401
    with srv.http() as h:
        r = h.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 70000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = h.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()


def test_queue_full_is_429_and_disconnect_frees_the_row(tiny_base_dir, tmp_path_factory):
    from loradex.serving.config import EngineConfig, ServerConfig

    root, settings, cat, store = _home(tmp_path_factory, tiny_base_dir, {})
    config = ServerConfig(engine=EngineConfig(base="tiny", quantize="none", max_batch=1, max_queued=2))
    server = Server(config, settings, cat, store)
    eng = server.engine
    try:
        # Hold the engine thread busy for a moment so that submitted requests stay queued.
        blocker = threading.Thread(target=lambda: eng.scheduler.call(lambda: time.sleep(2.0)))
        blocker.start()
        time.sleep(0.1)
        c = server.client()
        queued = [threading.Thread(target=lambda: c.completions.create(model="tiny", prompt="x", max_tokens=2))
                  for _ in range(2)]
        for t in queued:
            t.start()
        deadline = time.monotonic() + 5
        while eng.counts()["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
        blocker.join()
        for t in queued:
            t.join(30)
        # a client that walks away mid-stream frees its batch row long before max_tokens
        cancelled0 = eng.metrics.value("requests_total", "tiny", "base", "cancelled")
        with server.http() as h:
            body = {"model": "tiny", "prompt": "x", "max_tokens": 500, "temperature": 0, "stream": True}
            with h.stream("POST", "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                next(lines)
        deadline = time.monotonic() + 10
        while eng.counts() != {"active": 0, "waiting": 0} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.counts() == {"active": 0, "waiting": 0}
        assert eng.metrics.value("requests_total", "tiny", "base", "cancelled") == cancelled0 + 1
        r = c.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert r.choices[0].finish_reason == "length"
    finally:
        server.stop()
        cat.close()


def test_32_concurrent_requests_over_4_adapters(srv, solo):
    c = srv.client()
    names = ["ad0", "ad1", "ad2", "tiny"]

    def call(i):
        model = names[i % 4]
        return model, c.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    assert len(results) == 32
    for model, text in results:
        assert text == solo[model], model


def test_lru_rotation_with_max_loaded_2(srv, solo):
    eng = srv.engine
    loads0, evictions0 = eng.metrics.total("adapter_loads_total"), eng.metrics.total("adapter_evictions_total")
    c = srv.client()
    for _ in range(2):
        for name in ADAPTERS:
            assert c.completions.create(model=name, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text == solo[name]
            assert len(eng.cache.entries) <= 2
    assert eng.metrics.total("adapter_loads_total") - loads0 >= 8
    assert eng.metrics.total("adapter_evictions_total") - evictions0 >= 8
    with srv.http() as h:
        text = h.get("/metrics").text
    for family in ("loradex_adapter_loads_total", "loradex_adapter_evictions_total", "loradex_adapter_hits_total",
                   "loradex_batch_size_bucket", "loradex_request_latency_seconds_bucket",
                   'loradex_generated_tokens_total{adapter="ad1@1"}', 'loradex_http_requests_total{route="/v1/completions"'):
        assert family in text, family
    assert "loradex_adapters_loaded 2" in text


def _tar_bytes(folder, prefix="adapter", extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(folder.iterdir()):
            tf.add(f, arcname=f"{prefix}/{f.name}")
        if extra:
            extra(tf)
    return buf.getvalue()


def test_register_list_delete_while_serving(srv, tiny_base_dir, tmp_path):
    c = srv.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="hot", prompt=PROMPT, max_tokens=4)
    folder = make_adapter(tiny_base_dir, tmp_path / "hot", r=4, seed=21, scale=0.3)
    with srv.http() as h:
        r = h.post("/adapters", json={"path": str(folder), "name": "hot", "description": "registered live"})
        assert r.status_code == 201 and r.json()["version"] == 1
        out1 = c.completions.create(model="hot", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        # an uploaded archive becomes version 2
        folder2 = make_adapter(tiny_base_dir, tmp_path / "hot2", r=4, seed=22, scale=0.3)
        r = h.post("/adapters", data={"name": "hot"}, files={"file": ("hot2.tar.gz", _tar_bytes(folder2))})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 2
        out2 = c.completions.create(model="hot", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        assert out2 != out1
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w") as zf:
            for f in folder.iterdir():
                zf.write(f, f.name)
        r = h.post("/adapters", data={"name": "hotzip"}, files={"file": ("a.zip", zbuf.getvalue())})
        assert r.status_code == 201, r.text
        listing = h.get("/adapters").json()["adapters"]
        refs = {a["ref"]: a for a in listing}
        assert {"hot@1", "hot@2", "hotzip@1", "ad0@1"} <= set(refs)
        assert "score" in refs["hot@1"] and isinstance(refs["ad0@1"]["loaded"], bool)
        assert refs["hot@1"]["score"] is None and "no eval under" in refs["hot@1"]["score_note"]
        r = h.delete("/adapters/hot@2")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert c.completions.create(model="hot", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == out1
        assert h.delete("/adapters/hot@2").status_code == 404
        r = h.post("/generate", json={"prompt": PROMPT, "adapter": "hot@1", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["text"] == out1 and r.json()["path"] == "adapter"


def test_bad_uploads_are_refused(srv, tiny_base_dir, tmp_path):
    folder = make_adapter(tiny_base_dir, tmp_path / "up", r=4, seed=31, scale=0.3)

    def add_link(tf):
        info = tarfile.TarInfo("adapter/evil")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)

    def add_dotdot(tf):
        data = b"x"
        info = tarfile.TarInfo("../escape.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    def add_abs(tf):
        data = b"x"
        info = tarfile.TarInfo("/tmp/abs.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with srv.http() as h:
        for extra, word in ((add_link, "link"), (add_dotdot, ".."), (add_abs, "absolute")):
            r = h.post("/adapters", data={"name": "evil"}, files={"file": ("a.tgz", _tar_bytes(folder, extra=extra))})
            assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
        r = h.post("/adapters", data={"name": "evil"}, files={"file": ("a.bin", b"not an archive")})
        assert r.status_code == 400
        r = h.post("/adapters", json={"path": str(tmp_path / "missing"), "name": "evil"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
        assert not (tmp_path.parent / "escape.txt").exists()
        assert all(a["adapter"] != "evil" for a in h.get("/adapters").json()["adapters"])


def test_corrupted_adapter_refused_while_others_serve(srv, tiny_base_dir, tmp_path, solo):
    from loradex.hub.registry import register_adapter

    folder = make_adapter(tiny_base_dir, tmp_path / "rot", r=4, seed=41, scale=0.3)
    row = register_adapter(srv.catalog, srv.store, folder, "rot", base="tiny")
    weights = srv.store.resolve(row["path"]) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    c = srv.client()
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model="rot", prompt=PROMPT, max_tokens=4)
    assert e.value.body["code"] == "adapter_integrity" and "sha256" in e.value.body["message"]
    with pytest.raises(openai.InternalServerError):  # streaming requests get the same HTTP error up front
        c.completions.create(model="rot", prompt=PROMPT, max_tokens=4, stream=True)
    assert c.completions.create(model="ad0", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text == solo["ad0"]
    with srv.http() as h:
        assert 'loradex_adapter_load_failures_total{adapter="rot@1"} 2' in h.get("/metrics").text


def test_not_ready_is_503_and_health_still_answers(tiny_base_dir, tmp_path_factory):
    from loradex.serving.config import EngineConfig, ServerConfig

    root, settings, cat, store = _home(tmp_path_factory, tiny_base_dir, {})
    server = Server(ServerConfig(engine=EngineConfig(base="missing-base", quantize="none")), settings, cat, store,
                    wait_ready=False)
    try:
        with server.http() as h:
            assert h.get("/health").status_code == 200
            r = h.get("/ready")
            assert r.status_code == 503 and r.headers["retry-after"] and "missing-base" in r.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError) as e:
            server.client().completions.create(model="x", prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "not_ready"
    finally:
        server.stop()
        cat.close()
