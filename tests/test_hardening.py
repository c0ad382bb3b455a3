"""Hardening (issue 12): one request, adapter or client cannot hurt the others; the store trusts only what it hashed.

Each numbered case of the issue is reproduced here as it was found, and must now hold.
Tiny random base; HTTP cases go through a real uvicorn on loopback (``tests/test_http.py``'s ``Server``).
"""
from __future__ import annotations

import re
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


# -- 2. ReDoS: pattern keys were run as backtracking regexes ---------------------------------------------

EVIL = "(.*.*)*X"


def test_2_an_evil_pattern_key_is_matched_in_linear_time():
    from loradex.hub.peft_format import module_scale, pattern_key

    module = "model.layers.0.self_attn.q_proj" * 4  # re.match would take far longer than the age of the test run
    t0 = time.perf_counter()
    assert pattern_key({EVIL: 2, "q_proj": 4}, module) == "q_proj"
    assert module_scale({"r": 8, "lora_alpha": 16, "rank_pattern": {EVIL: 2}}, module)[0] == 8
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("key", [
    "q_proj", "self_attn.q_proj", r"layers\.0\..*", r"^model\.layers\.[0-9]{1,3}\.mlp\..*", r"(q|v)_proj$",
    r"[^q]_proj", r"\w+\.\d+\..*_proj", r"lay(er)+s\.0.*", r"l.{5}\.0.*", r".*", "", r"layers\.1?0\..*", r"(ab)*q_proj",
])
@pytest.mark.parametrize("module", [
    "model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj", "lm_head", "q_proj", "x.", "",
    "model.layers.0.self_attn.q_proj_extra",
])
def test_2_pattern_matching_equals_peft_s_regex_rule(key, module):
    import re

    from loradex.hub.patterns import matches

    assert matches(key, module) == bool(re.match(rf"(.*\.)?({key})$", module))


@pytest.mark.parametrize("key, says", [
    (r"(a)\1", "GROUPREF"), (r"(?=q)", "ASSERT"), (r"(?i)q_proj", "flags"), (r"a{100000}", "too complex"),
    ("a" * 600, "at most"), ("(", "not a valid regular expression"), (r"(?>a)", "ATOMIC_GROUP"),
])
def test_2_keys_that_cannot_be_matched_safely_are_refused_at_validation(tmp_path, tiny_base, tiny_base_dir, key, says):
    from loradex.hub.errors import InvalidAdapter
    from loradex.hub.validate import validate_adapter
    from tests.helpers import edit_config

    folder = make_adapter(tiny_base_dir, tmp_path / "a", scale=0.3)
    edit_config(folder, rank_pattern={key: 8})
    with pytest.raises(InvalidAdapter, match="rank_pattern") as e:
        validate_adapter(folder, tiny_base)
    assert says in str(e.value)


def test_2_evil_key_registers_and_serves_fast(hsrv, tiny_base_dir, tmp_path):
    """The issue's reproduction: `register` of an adapter with key (.*.*)*X hung, and serving it froze /health."""
    from loradex.hub.registry import register_adapter
    from tests.helpers import edit_config

    folder = make_adapter(tiny_base_dir, tmp_path / "evil", r=4, alpha=8, scale=0.3)
    edit_config(folder, alpha_pattern={EVIL: 4}, rank_pattern={EVIL: 2})
    t0 = time.perf_counter()
    register_adapter(hsrv.catalog, hsrv.store, folder, "evil", base="tiny")
    with hsrv.http() as h:
        r = h.post("/v1/completions", json={"model": "evil", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert h.get("/health").status_code == 200
    assert time.perf_counter() - t0 < 30


# -- 3. one poisoned adapter failed every request in its batch --------------------------------------------

@pytest.mark.parametrize("changes", [
    {"alpha_pattern": {"q_proj": float("nan")}}, {"alpha_pattern": {"q_proj": 1e30}},
    {"rank_pattern": {"q_proj": 0}}, {"rank_pattern": {"q_proj": 2.5}}, {"rank_pattern": ["q_proj"]},
    {"alpha_pattern": {"q_proj": True}}, {"target_modules": [1]}, {"use_rslora": "yes"},
])
def test_3_insane_config_numbers_and_types_are_refused(tmp_path, tiny_base, tiny_base_dir, changes):
    from loradex.hub.errors import InvalidAdapter
    from loradex.hub.validate import validate_adapter
    from tests.helpers import edit_config

    folder = make_adapter(tiny_base_dir, tmp_path / "a", scale=0.3)
    edit_config(folder, **changes)
    with pytest.raises(InvalidAdapter, match=next(iter(changes))):
        validate_adapter(folder, tiny_base)


def test_3_huge_finite_weights_are_refused(tmp_path, tiny_base, tiny_base_dir):
    from safetensors.torch import load_file, save_file

    from loradex.hub.errors import InvalidAdapter
    from loradex.hub.validate import validate_adapter

    folder = make_adapter(tiny_base_dir, tmp_path / "a", scale=0.3)
    path = folder / "adapter_model.safetensors"
    tensors = {k: (v * 1e36 if "lora_B" in k else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    with pytest.raises(InvalidAdapter, match="values up to"):
        validate_adapter(folder, tiny_base)


def test_3_the_serving_reader_refuses_non_finite_weights_naming_the_module(tmp_path, tiny_base_dir):
    from safetensors.torch import load_file, save_file

    from loradex.hub.errors import InvalidAdapter
    from loradex.serving.lora import read_adapter

    folder = make_adapter(tiny_base_dir, tmp_path / "a", scale=0.3)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    assert read_adapter(folder).modules  # intact: read
    bad = sorted(k for k in tensors if "lora_A" in k)[-1]  # one weight of the last module's A
    tensors[bad] = tensors[bad].clone()
    tensors[bad][0, 0] = float("inf")
    save_file(tensors, str(path))
    module = bad.split(".lora_A")[0].split("base_model.model.", 1)[1]
    with pytest.raises(InvalidAdapter, match=re.escape(module) + r": its weights times its scale .* are not finite"):
        read_adapter(folder)


def test_3_a_poisoned_adapter_fails_alone_and_its_batch_goes_on(hsrv, tiny_base_dir, tmp_path):
    """A registered adapter whose weights turn into NaN at serving time (what validation cannot see):
    sampled in one batch with three healthy requests, only its own request fails, naming it."""
    import threading

    from loradex.hub.registry import register_adapter

    eng = hsrv.engine
    folder = make_adapter(tiny_base_dir, tmp_path / "poison", r=4, alpha=8, scale=0.3)
    register_adapter(hsrv.catalog, hsrv.store, folder, "poison", base="tiny")
    real = eng.cache._load

    def load(row):
        w = real(row)
        if row["adapter"] == "poison":
            w.modules = {k: (a, b * float("nan")) for k, (a, b) in w.modules.items()}
        return w

    eng.cache._load = load
    try:
        bodies = [{"model": "poison", "prompt": "Hi", "max_tokens": 4, "temperature": 1.0, "seed": 1},
                  {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0},
                  {"model": "good", "prompt": "Hello there", "max_tokens": 4, "temperature": 1.0, "seed": 2},
                  {"model": "tiny", "prompt": "Once", "max_tokens": 4, "temperature": 0.7, "seed": 3}]
        out: dict[int, httpx.Response] = {}
        blocker = threading.Thread(target=lambda: eng.scheduler.call(lambda: time.sleep(1.0)))
        blocker.start()  # hold the engine so the four land in one prefill
        time.sleep(0.1)

        def post(i):
            with hsrv.http() as h:
                out[i] = h.post("/v1/completions", json=bodies[i])

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        blocker.join()
        bad = out[0]
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "generation_failed", bad.text
        assert "poison@1" in bad.json()["error"]["message"] and "non-finite" in bad.json()["error"]["message"]
        for i in (1, 2, 3):
            assert out[i].status_code == 200, out[i].text
            assert out[i].json()["usage"]["completion_tokens"] == 4
        steps = eng.scheduler.recent_steps()
        assert any("poison@1" in s["labels"] and len(s["labels"]) == 4 for s in steps)  # they did share a batch
        assert _idle(eng) == {"active": 0, "waiting": 0}
    finally:
        eng.cache._load = real
        eng.scheduler.call(lambda: [eng.cache.drop(e) for e in list(eng.cache.entries)])


# -- 4. the store trusted objects and snapshots it already had -------------------------------------------

def test_4_registering_intact_bytes_again_heals_a_corrupted_store(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    import os

    from loradex.hub.registry import register_adapter, resolve, verify

    folder = make_adapter(tiny_base_dir, tmp_path / "a", scale=0.3)
    register_adapter(catalog, store, folder, "heal", base="tiny")
    obj = store.object_path(resolve(catalog, "heal")["files"]["adapter_model.safetensors"])
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:  # corrupt in place: the snapshot's hard link sees it too
        f.seek(100)
        f.write(b"\x00" * 64)
    assert not verify(catalog, store, "heal")[0]["ok"]
    register_adapter(catalog, store, folder, "heal2", base="tiny")   # the same, intact bytes again
    results = verify(catalog, store)
    assert len(results) == 2 and all(r["ok"] for r in results), results  # new version intact, old one healed


def test_4_store_rehashes_before_reuse(tmp_path):
    from loradex.hub.store import Store, file_sha256

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"intact" * 1000)
    store = Store(tmp_path / "store")
    snap = store.put_folder(src)
    obj = store.object_path(snap.files["w.bin"])
    obj.chmod(0o644)
    obj.write_bytes(b"broken")
    again = store.put_folder(src)
    assert again.digest == snap.digest and store.verify(again.relpath, again.files) == []
    assert file_sha256(obj) == snap.files["w.bin"]


# -- 5. client disconnects were ignored for non-streamed and queued requests -----------------------------

def test_5_non_streamed_and_queued_requests_stop_when_the_client_goes(hsrv):
    import threading

    eng = hsrv.engine
    m = eng.metrics
    ok0, cancelled0 = (m.value("requests_total", "tiny", "base", s) for s in ("ok", "cancelled"))
    slow = threading.Event()

    def slow_steps():  # a command between every decode step: ~30 ms a token, so 400 tokens would take 12 s
        while not slow.is_set():
            eng.scheduler.call(lambda: time.sleep(0.03))

    slower = threading.Thread(target=slow_steps)
    slower.start()
    try:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 400, "temperature": 0}
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):  # non-streamed; the client hangs up after 1 s
            with hsrv.http() as h:
                h.post("/v1/completions", json=body, timeout=1.0)
        # queued: the engine is held, the client gives up before admission
        blocker = threading.Thread(target=lambda: eng.scheduler.call(lambda: time.sleep(3.0)))
        blocker.start()
        time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):
            with hsrv.http() as h:
                h.post("/v1/completions", json=body, timeout=1.0)
        blocker.join()
        deadline = time.monotonic() + 8
        while m.value("requests_total", "tiny", "base", "cancelled") < cancelled0 + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.value("requests_total", "tiny", "base", "cancelled") == cancelled0 + 2
        assert m.value("requests_total", "tiny", "base", "ok") == ok0  # neither ran to the end
        assert time.monotonic() - t0 < 10
    finally:
        slow.set()
        slower.join()
    assert _idle(eng) == {"active": 0, "waiting": 0}


# -- 6. the smaller ones -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["good2\n", "good\r", "a\nb", "x" * 129, "..", "a..b"])
def test_6_names_with_a_trailing_newline_or_worse_are_refused(name):
    from loradex.hub.errors import InvalidName
    from loradex.hub.names import check_name

    with pytest.raises(InvalidName):
        check_name(name)
    assert check_name("good2") == "good2"


def test_6_server_paths_are_off_by_default_and_confined_to_allowed_roots(hsrv, tiny_base_dir, tmp_path):
    folder = make_adapter(tiny_base_dir, tmp_path / "srvpath", r=4, scale=0.3)
    with hsrv.http() as h:
        for path in ("/", "/root", str(folder)):
            r = h.post("/adapters", json={"path": path, "name": "bypath"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", r.text
        hsrv.app.state.server.config.allow_path_register = [str(tmp_path / "allowed")]
        try:
            (tmp_path / "allowed").mkdir()
            (tmp_path / "allowed" / "link").symlink_to(folder)  # a link out of the root does not count
            for path in ("/", str(folder), str(tmp_path / "allowed" / "link"), str(tmp_path / "allowed" / ".." / "srvpath")):
                assert h.post("/adapters", json={"path": path, "name": "bypath"}).status_code == 403
            import shutil
            shutil.copytree(folder, tmp_path / "allowed" / "ok")
            r = h.post("/adapters", json={"path": str(tmp_path / "allowed" / "ok"), "name": "bypath"})
            assert r.status_code == 201, r.text
        finally:
            hsrv.app.state.server.config.allow_path_register = []


def test_6_ops_take_server_paths_only_from_this_machine_or_under_allowed_roots(hsrv, tiny_base_dir, tmp_path):
    """The ops API is no way around --allow-path-register: a remote client's paths are confined, the local CLI's are not."""
    from starlette.testclient import TestClient

    folder = make_adapter(tiny_base_dir, tmp_path / "opspath", r=4, scale=0.3)
    sheet = tmp_path / "written-by-a-remote-client.csv"
    remote = TestClient(hsrv.app, client=("10.1.2.3", 40000), headers={"Authorization": f"Bearer {KEY}"})
    calls = [("adapters.register", {"path": str(folder), "name": "viaops"}),
             ("adapters.register", {"path": "/etc", "name": "viaops"}),
             ("bases.add", {"name": "etcbase", "source": "/etc"}),
             ("reviews.import", {"path": "/etc/passwd"}),
             ("reviews.export", {"ref": "good@1", "out": str(sheet)})]
    for name, body in calls:
        r = remote.post(f"/v1/ops/{name}", json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", (name, r.text)
    assert not sheet.exists()
    with hsrv.http() as h:  # the same call from loopback (the CLI on the server's machine) is allowed
        r = h.post("/v1/ops/adapters.register", json={"path": str(folder), "name": "viaops"})
        assert r.status_code == 200, r.text
    hsrv.app.state.server.config.allow_path_register = [str(tmp_path)]
    try:  # and a remote client may use a path under an allowed root
        r = remote.post("/v1/ops/adapters.register", json={"path": str(folder), "name": "viaops"})
        assert r.status_code == 200, r.text
    finally:
        hsrv.app.state.server.config.allow_path_register = []


def _tgz(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_6_broken_archives_are_400_and_tar_gz_stops_at_the_limit(hsrv, tmp_path):
    import io
    import zipfile

    from loradex.hub.errors import InvalidAdapter
    from loradex.serving.uploads import extract_archive

    good = _tgz({"adapter_config.json": b"{}", "adapter_model.safetensors": b"x" * 5000})
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", b"{}" + b" " * 20000)
    raw = bytearray(zbuf.getvalue())
    central = raw.rfind(b"PK\x01\x02")  # under-declare the size in both headers
    raw[22:26] = (10).to_bytes(4, "little")
    raw[central + 24:central + 28] = (10).to_bytes(4, "little")
    cases = {"truncated.tgz": good[: len(good) // 2], "undersized.zip": bytes(raw),
             "clash.tgz": _tgz({"a/adapter_config.json": b"{}", "a": b"file"})}
    with hsrv.http() as h:
        for fname, data in cases.items():
            r = h.post("/adapters", data={"name": "broken"}, files={"file": (fname, data)})
            assert r.status_code == 400, (fname, r.status_code, r.text)
    # a tar.gz bomb: refused while decompressing, after max_bytes, not after inflating it whole
    bomb = tmp_path / "bomb.tgz"
    bomb.write_bytes(_tgz({"adapter_config.json": b"{}", "big.bin": b"\0" * (64 << 20)}))
    t0 = time.perf_counter()
    with pytest.raises(InvalidAdapter, match="expands past"):
        extract_archive(bomb, tmp_path / "x", 1 << 20)
    assert time.perf_counter() - t0 < 5
    assert sum(p.stat().st_size for p in (tmp_path / "x").rglob("*") if p.is_file()) <= 1 << 20


def test_6_openapi_and_docs_need_the_key_and_chunked_bodies_get_413(hsrv):
    with hsrv.http(key=None) as anon:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert anon.get(path).status_code in (401, 404), path
        assert anon.get("/openapi.json").status_code == 401
        assert anon.get("/health").status_code == 200
    with hsrv.http() as h:
        assert "/v1/completions" in h.get("/openapi.json").json()["paths"]

        def chunks():  # no Content-Length: the limit is found while reading
            for _ in range(20):
                yield b" " * 64 * 1024

        r = h.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text


def test_6_serve_on_a_busy_port_says_so_in_one_line(catalog, tiny_base):
    import socket

    from tests.helpers import run_cli

    catalog.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        res = run_cli("serve", "--base", "tiny", "--quantize", "none", "--port", str(port), timeout=120)
    assert res.returncode == 2 and "port in use" in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert time.monotonic() - t0 < 60


def test_a_flood_of_bad_requests_leaves_the_server_answering_others(hsrv):
    from concurrent.futures import ThreadPoolExecutor

    good = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    bad = [{"model": "tiny", "prompt": "Hi", "max_tokens": 1, "seed": 10**30},
           {"model": "no-such", "prompt": "Hi"}, {"model": "tiny", "prompt": "Hi", "max_tokens": 10**9},
           {"model": "tiny", "prompt": "Hi", "n": 99}, {"model": "tiny", "prompt": "x" * 70_000}]
    with hsrv.http() as h:
        t0 = time.perf_counter()
        assert h.post("/v1/completions", json=good).status_code == 200
        alone = time.perf_counter() - t0

        def flood(i):
            with hsrv.http() as fh:
                return fh.post("/v1/completions", json=bad[i % len(bad)]).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = pool.map(flood, range(200))
            t0 = time.perf_counter()
            assert h.post("/v1/completions", json=good).status_code == 200
            during = time.perf_counter() - t0
            statuses = list(statuses)
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert during < 10 * alone + 2
    assert _idle(hsrv.engine) == {"active": 0, "waiting": 0}


def test_6_a_vanishing_temperature_is_greedy_not_a_500(hsrv):
    """temperature 5e-140 made logits / temperature overflow to inf and multinomial fail (found by the fuzz suite)."""
    with hsrv.http() as h:
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "temperature": 5e-140}
        tiny = h.post("/v1/completions", json=body)
        greedy = h.post("/v1/completions", json={**body, "temperature": 0})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.heavy
def test_6_sigkill_during_an_upload_registration_leaves_catalog_and_store_consistent(tiny_base_dir, tmp_path):
    """`kill -9` of `loradex serve` while it receives / registers an uploaded archive, then a restart:
    no ready version without its files, no pending row or dead writer's temp folder left, and the same
    upload then registers fine."""
    import io
    import os
    import signal
    import tarfile
    import threading

    from loradex.hub.bases import add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store
    from tests.helpers import start_server, stop_server

    settings = Settings(home=tmp_path / "home", store=tmp_path / "store")
    store = Store(settings.store)
    with Catalog.open(settings.catalog_path) as cat:
        add_base(cat, store, "tiny", str(tiny_base_dir))
    src = make_adapter(tiny_base_dir, tmp_path / "big", r=8, scale=0.3)
    (src / "README.md").write_text("model card\n" * 2_500_000)  # ~27 MB: a window to kill in
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for f in src.iterdir():
            tf.add(f, arcname=f.name)
    archive = buf.getvalue()
    env = {"LORADEX_HOME": str(settings.home), "LORADEX_STORE": str(settings.store), "LORADEX_API_KEY": None}
    args = ("--base", "tiny", "--quantize", "none", "--max-upload-bytes", str(64 << 20))
    tmp_root = store.root / "tmp"

    def upload(url: str) -> httpx.Response | None:
        try:
            return httpx.post(url + "/adapters", files={"file": ("big.tar", archive)}, data={"name": "big"}, timeout=120)
        except httpx.HTTPError:
            return None

    kills = 0
    for delay in (0.0, 0.3):  # kill at different points: receiving, then extracting / hashing / storing
        proc, url = start_server(*args, env=env)
        t = threading.Thread(target=upload, args=(url,))
        t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and t.is_alive():
            if tmp_root.exists() and any(p.name.startswith(f"{proc.pid}-") for p in tmp_root.iterdir()):
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.001)
        t.join(130)
        proc.wait()
    assert kills == 2

    proc, url = start_server(*args, env=env)  # the restart: opens the catalog, clears the dead writers' leftovers
    try:
        assert not [p for p in tmp_root.iterdir()] if tmp_root.exists() else True
        with httpx.Client(base_url=url, timeout=120) as h:
            listed = h.get("/v1/adapters").json()
            for v in listed:  # whatever finished before a kill is complete
                assert all(x["ok"] for x in h.get(f"/v1/adapters/{v['ref']}/verify").json()), v
            r = upload(url)
            assert r is not None and r.status_code == 201, r.text if r is not None else "no answer"
            ref = f"big@{r.json()['version']}"
            assert [x["ok"] for x in h.get(f"/v1/adapters/{ref}/verify").json()] == [True]
    finally:
        stop_server(proc)
    with Catalog.open(settings.catalog_path) as cat:
        assert cat.query("SELECT id FROM adapter_versions WHERE status <> 'ready'") == []
        for r in cat.query("SELECT path, files FROM adapter_versions WHERE status = 'ready'"):
            assert store.verify(r["path"], r["files"]) == []


def test_6_fuzz_findings_tiny_top_p_bad_base_source_and_surrogates_are_4xx(hsrv, tmp_path):
    """Found by the fuzz suite at 40 cases per route: each was a 500."""
    from starlette.testclient import TestClient

    with hsrv.http() as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "top_p": 5e-324,
                                            "temperature": 1.0, "seed": 1})
        assert r.status_code == 200, r.text  # top_p 0 in float32 kept no token: now the top token stays
        r = h.post("/v1/bases", json={"name": "zbase", "source": "Z"})  # neither a path nor an org/name id
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_base", r.text
    remote = TestClient(hsrv.app, client=("10.1.2.3", 40000), headers={"Authorization": f"Bearer {KEY}"})
    body = b'{"name": "zbase", "source": "/\\udb8a\\ude9a"}'  # a lone surrogate: no file name can hold it
    for path in ("/v1/ops/bases.add", "/v1/bases"):
        r = remote.post(path, content=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    r = remote.post("/v1/bases", json={"name": "zbase", "source": "/etc"})  # the resource route is confined too
    assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", r.text
