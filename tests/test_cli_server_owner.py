"""While `loradex serve` owns the catalog, CLI commands go through its API or explain why not."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from loradex.hub.registry import register_adapter
from tests.helpers import make_adapter, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    register_adapter(catalog, store, make_adapter(tiny_base_dir, tmp_path / "first", r=2, alpha=4), "first", base="tiny")
    catalog.close()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loradex", "serve", "--base", "tiny", "--quantize", "none",
                             "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read()}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_cli_goes_through_the_server(server, tiny_base_dir, tmp_path):
    second = make_adapter(tiny_base_dir, tmp_path / "second", r=2, alpha=4, seed=5)
    res = run_cli("register", str(second), "--name", "second", "--base", "tiny", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["adapter"] == "second"
    res = run_cli("list", "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(r["ref"] for r in json.loads(res.stdout)) == ["first@1", "second@1"]
    # the server serves what the CLI just registered through it
    with urllib.request.urlopen(server + "/v1/models") as r:
        ids = {m["id"] for m in json.loads(r.read())["data"]}
    assert "second@1" in ids
    # a bad adapter sent through the server still gets its specific one-line error
    (second / "adapter_config.json").write_text("{broken")
    res = run_cli("register", str(second), "--name", "third", "--base", "tiny")
    assert res.returncode != 0 and "not valid JSON" in res.stderr and res.stderr.count("\n") == 1
    res = run_cli("delete", "second@1", "--json")
    assert res.returncode == 0, res.stderr
