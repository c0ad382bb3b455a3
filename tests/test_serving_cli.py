"""`loradex serve` as a real process: owns the catalog, answers clients, shuts down cleanly on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

from tests.helpers import make_adapter, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_owns_catalog_answers_and_stops_gracefully(catalog, store, tiny_base, tiny_base_dir, settings, tmp_path):
    from loradex.hub.registry import register_adapter

    register_adapter(catalog, store, make_adapter(tiny_base_dir, tmp_path / "a", r=4, seed=3, scale=0.3), "cli-ad", base="tiny")
    catalog.close()  # the server must own the file
    port = _free_port()
    env = dict(os.environ, LORADEX_API_KEY="k-123")
    proc = subprocess.Popen([sys.executable, "-m", "loradex", "serve", "--base", "tiny", "--quantize", "none",
                             "--port", str(port), "--max-loaded", "2", "--drain-s", "5",
                             "--allow-path-register", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/ready", headers={"Authorization": "Bearer k-123"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.3)
        owner = settings.catalog_path.with_name("catalog.duckdb.owner.json")
        assert owner.exists()
        # other CLI processes go through the API; without the key the server refuses, in one line
        res = run_cli("show", "cli-ad", env={"LORADEX_LOCK_WAIT": "1"})
        assert res.returncode == 2 and "API key" in res.stderr and res.stderr.count("\n") == 1
        res = run_cli("show", "cli-ad", "--json", env={"LORADEX_API_KEY": "k-123"})
        assert res.returncode == 0 and json.loads(res.stdout)["versions"][0]["adapter"] == "cli-ad"
        res = run_cli("list", "--json", env={"LORADEX_API_KEY": "k-123"})
        assert res.returncode == 0 and "cli-ad@1" in res.stdout
        c = openai.OpenAI(base_url=url + "/v1", api_key="k-123", max_retries=0)
        r = c.completions.create(model="cli-ad", prompt="Hello", max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer k-123"}) as h:
            # registration goes through the server while it owns the catalog
            folder = make_adapter(tiny_base_dir, tmp_path / "b", r=4, seed=4, scale=0.3)
            assert h.post("/adapters", json={"path": str(folder), "name": "cli-ad-2"}).status_code == 201
        assert c.completions.create(model="cli-ad-2", prompt="Hello", max_tokens=3).usage.completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not owner.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = run_cli("list", "--json")  # the catalog is free again, with the adapter registered over HTTP
    assert res.returncode == 0 and "cli-ad-2" in res.stdout


def test_serve_unknown_base_fails_in_one_line(catalog, tiny_base):
    catalog.close()
    res = run_cli("serve", "--base", "no-such-base", "--quantize", "none", "--port", str(_free_port()))
    assert res.returncode != 0
    assert "base 'no-such-base' not found" in res.stderr
    res = run_cli("serve", "--max-loaded", "0", "--port", str(_free_port()))
    assert res.returncode == 2 and "--max-loaded" in res.stderr.strip().splitlines()[-1]
