"""The hub as a service: while `loradex serve` owns the catalog, every command works through its API.

Two identical workspaces are built; one gets a real `loradex serve` (tiny base, loopback).
Each CLI command in COMMANDS then runs in both, and its exit code, JSON output and error
line must be the same (timestamps and the workspace's own path aside). Long jobs (eval,
train, merge, export) run in the CLI process and record through the server. Then: alias
moves between two requests, the gate over HTTP, jobs, a second server, a replica.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loradex.hub.bases import add_base
from loradex.hub.catalog import Catalog
from loradex.hub.registry import register_adapter
from loradex.hub.settings import Settings
from loradex.hub.store import Store
from tests.catalog_rows import add_run
from tests.helpers import free_port, make_adapter, start_server as start_served, stop_server

pytestmark = pytest.mark.integration

EVAL_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of Brazil?"},
                  {"role": "assistant", "content": "Brasilia."}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]


def _env(root: Path) -> dict:
    return {"LORADEX_HOME": str(root / "home"), "LORADEX_STORE": str(root / "store")}


def start_server(root: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    # the default quantization (NF4), so that "as served" means the same with and without this server
    return start_served("--base", "tiny", *extra, env=_env(root))


def http(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def build_world(root: Path, tiny_base_dir: Path, adapters: dict[str, Path]) -> None:
    settings = Settings(home=root / "home", store=root / "store")
    store = Store(settings.store)
    with Catalog.open(settings.catalog_path) as cat:
        add_base(cat, store, "tiny", str(tiny_base_dir))
        v1 = register_adapter(cat, store, adapters["a1"], "first", base="tiny")
        register_adapter(cat, store, adapters["a2"], "first", base="tiny")
        add_run(cat, v1, [0.8, 0.9, 0.85, 0.95], [0.1, 0.2, 0.15, 0.1])
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS * 4))


def cli(root: Path, *args: str) -> tuple[int, str, str]:
    """Run `loradex ARGS` in this process against workspace ``root`` (cwd = root)."""
    from loradex.cli import main

    old_env = {k: os.environ.get(k) for k in ("LORADEX_HOME", "LORADEX_STORE")}
    old_cwd = os.getcwd()
    os.environ.update(_env(root))
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(root)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


_PROGRESS = re.compile(r"[^\n]*\r[^\n]*\n?")  # progress bars: their rates differ run to run
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?")
# run-time figures, and how an eval was asked for ("as served" by default here, the server's own flags there):
# what it measured (serving_config, config_key) is compared
VOLATILE = {"duration_s", "timings", "per_item_s", "tokens_per_s", "cost_usd", "cost_basis", "pid", "eval_config"}


def normal(text: str, root: Path) -> object:
    """Output with the workspace path, timestamps and run-time figures taken out."""
    text = _PROGRESS.sub("", _TIME.sub("<T>", text.replace(str(root), "<W>")))
    try:
        data = json.loads(text)
    except ValueError:
        return text

    def strip(v):
        if isinstance(v, dict):
            drop = set(VOLATILE)
            if v.get("adapter") == "trained" or "format" in v:
                # a trained adapter and an export carry their workspace's paths inside their files
                drop |= {"digest", "path", "size_bytes", "files"}
            return {k: strip(x) for k, x in v.items() if k not in drop}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(data)


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"  {where}: local {a!r} != served {b!r}"]


# (args, expected exit code); "{W}" is the workspace. Run in order in both workspaces.
COMMANDS = [
    (("base", "list", "--json"), 0),
    (("base", "list"), 0),
    (("list", "--json"), 0),
    (("list",), 0),
    (("show", "first", "--json"), 0),
    (("show", "first@1"), 0),
    (("show", "nosuch"), 3),
    (("register", "{W}/a3", "--name", "second", "--base", "tiny", "--json"), 0),
    (("register", "{W}/a3", "--name", "second", "--base", "tiny", "--json"), 0),  # idempotent
    (("register", "{W}/broken", "--name", "third", "--base", "tiny"), 4),
    (("alias", "set", "first@1", "staging", "--json"), 0),
    (("alias", "set", "first@2", "production"), 6),  # no eval: the gate refuses
    (("alias", "set", "first@2", "production", "--force"), 2),  # --force needs --reason
    (("alias", "set", "first@2", "production", "--force", "--reason", "hotfix for a demo", "--json"), 0),
    (("alias", "set", "first@1", "production"), 6),  # production (v2) has no eval on the same data
    (("alias", "rm", "first", "staging"), 0),
    (("alias", "rm", "first", "staging"), 3),
    (("verify",), 0),
    (("verify", "first@1", "--json"), 0),
    (("leaderboard", "--json"), 0),
    (("leaderboard",), 0),
    (("eval", "show", "1", "--json"), 0),
    (("eval", "show", "99"), 3),
    (("review", "export", "first@1", "--n", "3", "--seed", "1", "--out", "{W}/sheet.csv", "--json"), 0),
    (("review", "import", "{W}/missing.csv"), 2),
    (("jobs", "--json"), 0),
    (("delete", "second@1", "--json"), 0),
    (("delete", "first@2"), 5),  # aliased as production
    (("eval", "first@2", "--data", "{W}/eval.jsonl", "--metrics", "similarity,exact", "--max-new-tokens", "4",
      "--no-progress", "--json"), 0),
    (("train", "--data", "{W}/train.jsonl", "--name", "trained", "--base", "tiny", "--max-steps", "2",
      "--batch-size", "4", "--warmup-ratio", "0", "--learning-rate", "0.05", "--json"), 0),
    (("merge", "first@2", "--probes", "1", "--check-tokens", "4", "--json"), 0),
    (("export", "first@2", "--format", "vllm-lora", "--out", "{W}/vllm-lora", "--json"), 0),
    (("show", "first", "--json"), 0),
    (("list", "--json"), 0),
]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, tiny_base_dir):
    adapters_dir = tmp_path_factory.mktemp("adapters")
    adapters = {k: make_adapter(tiny_base_dir, adapters_dir / k, r=2, alpha=4, seed=i, scale=0.2)
                for i, k in enumerate(("a1", "a2", "a3"))}
    roots = {}
    for name in ("local", "served"):
        root = tmp_path_factory.mktemp(name)
        build_world(root, tiny_base_dir, adapters)
        shutil.copytree(adapters["a3"], root / "a3")
        shutil.copytree(adapters["a3"], root / "broken")
        (root / "broken" / "adapter_config.json").write_text("{broken")
        roots[name] = root
    proc, url = start_server(roots["served"])
    yield roots, url, proc
    stop_server(proc)


def test_every_command_gives_the_same_result_through_the_server(worlds):
    roots, url, _ = worlds
    mismatches = []
    for args, expected in COMMANDS:
        results = {}
        for name, root in roots.items():
            argv = [a.replace("{W}", str(root)) for a in args]
            code, out, err = cli(root, *argv)
            assert code == expected, f"{name}: loradex {' '.join(argv)} -> {code}: {err or out}"
            if code != 0:
                assert err.count("\n") == 1 and "Traceback" not in err, err
            # stderr is compared for failures (the error line); on success it holds progress and notes,
            # e.g. "scoring as the running server serves it" where a server runs
            results[name] = (normal(out, root), normal(err, root) if code else "")
        if results["local"] != results["served"]:
            mismatches.append((args, results["local"], results["served"]))
    assert not mismatches, "\n\n".join(f"{a}\n" + "\n".join(differences(l, s)) for a, l, s in mismatches)
    # the served world's records are where the server put them: in its catalog, visible over HTTP
    status, runs = http(url + "/v1/runs")
    assert status == 200 and [r["adapter"] for r in runs] == ["trained"] and runs[0]["status"] == "completed"
    status, events = http(url + "/v1/adapters/first/aliases")
    forced = [e for e in events if e["forced"]]
    assert forced and forced[0]["reason"] == "hotfix for a demo" and forced[0]["actor"]


def test_alias_move_changes_the_answering_version_at_the_next_request(worlds):
    _, url, _ = worlds

    def answered_by() -> str:
        status, body = http(url + "/generate", "POST", {"adapter": "first@canary", "prompt": "Hi", "max_tokens": 2})
        assert status == 200, body
        return body["adapter"]

    assert http(url + "/v1/adapters/first/aliases/canary", "PUT", {"version": 1})[0] == 200
    assert answered_by() == "first@1"
    assert http(url + "/v1/adapters/first/aliases/canary", "PUT", {"version": 2})[0] == 200
    assert answered_by() == "first@2"
    ids = {m["id"] for m in http(url + "/v1/models")[1]["data"]}
    assert "first@canary" in ids


def test_gate_over_http_refuses_then_forced_with_reason(worlds):
    _, url, _ = worlds
    status, body = http(url + "/v1/adapters/trained/aliases/production", "PUT", {"version": 1})
    assert status == 409 and body["error"]["code"] == "gate_refused" and "no eval" in body["error"]["message"]
    status, body = http(url + "/v1/adapters/trained/aliases/production", "PUT", {"version": 1, "force": True})
    assert status == 400 and "--reason" in body["error"]["message"]
    status, body = http(url + "/v1/adapters/trained/aliases/production", "PUT",
                        {"version": 1, "force": True, "reason": "smoke test", "actor": "ci"})
    assert status == 200 and body["forced"] and body["reason"] == "smoke test" and body["actor"] == "ci"


def test_jobs_run_to_completion_and_report_errors(worlds):
    _, url, _ = worlds

    def wait(job_id: int) -> dict:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status, job = http(f"{url}/v1/jobs/{job_id}")
            assert status == 200
            if job["state"] in ("succeeded", "failed"):
                return job
            time.sleep(0.5)
        pytest.fail(f"job {job_id} did not finish")

    status, job = http(url + "/v1/jobs", "POST", {"kind": "merge", "params": {"ref": "first@1", "probes": 1,
                                                                               "check_tokens": 4}})
    assert status == 202 and job["state"] == "queued"
    done = wait(job["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["base_name"] == "first-v1-merged" and done["result"]["dtype"] == "fp32"
    # while the job ran, requests were answered (the job runs beside the request path)
    assert http(url + "/generate", "POST", {"adapter": "first@1", "prompt": "Hi", "max_tokens": 2})[0] == 200
    status, job = http(url + "/v1/jobs", "POST", {"kind": "merge", "params": {"ref": "nosuch@1"}})
    failed = wait(job["id"])
    assert failed["state"] == "failed" and failed["error_type"] == "NotFound" and "nosuch" in failed["error"]
    status, body = http(url + "/v1/jobs", "POST", {"kind": "compile", "params": {}})
    assert status == 400 and "merge, export, eval" in body["error"]["message"]
    status, body = http(url + "/v1/jobs", "POST", {"kind": "merge", "params": {"ref": "first@1", "colour": 1}})
    assert status == 400 and "colour" in body["error"]["message"]


def test_a_second_server_on_the_same_catalog_refuses_in_one_line(worlds):
    roots, url, proc = worlds
    env = dict(os.environ, **_env(roots["served"]))
    res = subprocess.run([sys.executable, "-m", "loradex", "serve", "--base", "tiny", "--quantize", "none",
                          "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 7
    assert res.stderr.count("\n") == 1 and f"pid {proc.pid}" in res.stderr and url in res.stderr


def test_a_replica_serves_from_the_registry_over_http(worlds, tmp_path):
    roots, url, _ = worlds
    replica_root = tmp_path / "replica"
    proc, replica = start_server(replica_root, "--registry", url)
    try:
        status, body = http(replica + "/generate", "POST", {"adapter": "first@2", "prompt": "Hi", "max_tokens": 2})
        assert status == 200 and body["adapter"] == "first@2"
        # the adapter's files came over HTTP by sha256 into the replica's own store
        fetched = list((replica_root / "store" / "objects").rglob("*"))
        assert any(p.is_file() for p in fetched)
        assert not (replica_root / "home" / "catalog.duckdb").exists()  # it never opened a catalog file
        # and the same answer as the registry gives for the same request
        assert http(url + "/generate", "POST", {"adapter": "first@2", "prompt": "Hi", "max_tokens": 2})[1]["text"] \
            == body["text"]
    finally:
        stop_server(proc)


@pytest.mark.heavy
def test_many_clients_at_once(worlds, tiny_base_dir, tmp_path):
    """8 CLI processes register, 2 evals record, an alias moves while 32 requests are in flight."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    roots, url, _ = worlds
    root = roots["served"]
    env = dict(os.environ, **_env(root))
    folders = [make_adapter(tiny_base_dir, tmp_path / f"c{i}", r=2, alpha=4, seed=100 + i) for i in range(8)]
    assert http(url + "/v1/adapters/first/aliases/live", "PUT", {"version": 1})[0] == 200
    evals_before = len(http(url + "/v1/evals")[1])

    def cli_proc(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "loradex", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    stop = threading.Event()
    moves = []

    def move_alias() -> None:
        version = 1
        while not stop.is_set():
            version = 3 - version
            status, body = http(url + "/v1/adapters/first/aliases/live", "PUT", {"version": version})
            moves.append(status)
            time.sleep(0.05)

    def ask(i: int) -> tuple[int, dict]:
        return http(url + "/generate", "POST", {"adapter": "first@live", "prompt": f"Question {i}?", "max_tokens": 8})

    procs = [cli_proc("register", str(f), "--name", f"conc{i}", "--base", "tiny", "--json") for i, f in enumerate(folders)]
    procs += [cli_proc("eval", "first@1", "--data", str(root / "eval.jsonl"), "--max-new-tokens", "4",
                       "--no-progress", "--no-cache", "--json") for _ in range(2)]
    mover = threading.Thread(target=move_alias)
    mover.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32)))
        outcomes = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    finally:
        stop.set()
        mover.join()
    for code, out, err in outcomes:
        assert code == 0, err
    assert moves and all(s == 200 for s in moves)
    assert all(status == 200 for status, _ in answers), [b for s, b in answers if s != 200]
    assert {body["adapter"] for _, body in answers} <= {"first@1", "first@2"}
    listed = {r["adapter"] for r in http(url + "/v1/adapters")[1]}
    assert {f"conc{i}" for i in range(8)} <= listed
    assert len(http(url + "/v1/evals")[1]) == evals_before + 2
