"""Registration: the validated path every adapter takes, and every way it refuses."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from loradex.hub.errors import Conflict, InvalidAdapter, InvalidName, NotFound
from loradex.hub.registry import delete_version, list_adapters, register_adapter, resolve, set_alias, verify
from tests.helpers import edit_config, make_adapter, run_cli


@pytest.fixture(scope="module")
def tiny_adapter_src(tmp_path_factory, tiny_base_dir):
    """One plain-PEFT adapter over the tiny base, copied fresh by ``tiny_adapter``."""
    return make_adapter(tiny_base_dir, tmp_path_factory.mktemp("src") / "ad", r=4, alpha=8)


@pytest.fixture
def tiny_adapter(tmp_path, tiny_adapter_src):
    dest = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_src, dest)
    return dest


def _snapshot_state(catalog, store):
    rows = catalog.query("SELECT adapter, version, status FROM adapter_versions ORDER BY id")
    files = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file()) if store.root.exists() else []
    return rows, files


def test_register_records_everything(catalog, store, tiny_base, tiny_adapter):
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert os.path.isabs(cfg["base_model_name_or_path"])  # a local folder, as real adapters often have
    row = register_adapter(catalog, store, tiny_adapter, "style", base="tiny")
    assert (row["adapter"], row["version"], row["base"], row["status"]) == ("style", 1, "tiny", "ready")
    assert row["rank"] == 4 and row["alpha"] == 8.0
    assert row["target_modules"] == ["q_proj", "v_proj"]
    # 2 layers x (q: A 4x64 + B 64x4, v: A 4x64 + B 32x4)
    assert row["param_count"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert set(row["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    stored = store.resolve(row["path"])
    assert load_file(str(stored / "adapter_model.safetensors")).keys() == load_file(str(tiny_adapter / "adapter_model.safetensors")).keys()
    assert row["size_bytes"] == sum((tiny_adapter / f).stat().st_size for f in row["files"])


def test_base_guessed_from_adapter_config(catalog, store, tiny_base, tiny_adapter, tiny_base_dir):
    row = register_adapter(catalog, store, tiny_adapter, "guessed")  # base_model_name_or_path == tiny's path
    assert row["base"] == "tiny"
    edit_config(tiny_adapter, base_model_name_or_path="/nowhere/else")
    with pytest.raises(InvalidAdapter, match="pass --base"):
        register_adapter(catalog, store, tiny_adapter, "guessed2")


def test_idempotent_and_versioned(catalog, store, tiny_base, tiny_adapter, tmp_path, tiny_base_dir):
    v1 = register_adapter(catalog, store, tiny_adapter, "x", base="tiny")
    again = register_adapter(catalog, store, tiny_adapter, "x", base="tiny")
    assert again["version"] == 1 and again["id"] == v1["id"]
    assert again["existing"] is True and "existing" not in v1  # lets the CLI say "already registered"
    other = make_adapter(tiny_base_dir, tmp_path / "other", r=4, alpha=8, seed=1)
    v2 = register_adapter(catalog, store, other, "x", base="tiny")
    assert v2["version"] == 2 and v2["digest"] != v1["digest"]
    assert resolve(catalog, "x")["version"] == 2
    assert resolve(catalog, "x@1")["digest"] == v1["digest"]
    assert resolve(catalog, "x@v2")["version"] == 2


def test_a_missing_folder_is_the_error_not_the_base(catalog, store, tiny_base, tmp_path, capsys):
    missing = tmp_path / "missing"
    with pytest.raises(InvalidAdapter, match=f"^{missing}: no such folder$"):
        register_adapter(catalog, store, missing, "x")  # no --base: used to say "cannot tell which base"
    with pytest.raises(InvalidAdapter, match="no such folder"):
        register_adapter(catalog, store, missing, "x", base="tiny")
    from loradex.cli import main

    catalog.close()
    assert main(["register", str(missing), "--name", "x"]) == InvalidAdapter.exit_code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such folder" in err


def test_typos_get_did_you_mean(catalog, store, tiny_base, tiny_adapter):
    from loradex.hub.bases import get_base

    register_adapter(catalog, store, tiny_adapter, "pirate", base="tiny")
    set_alias(catalog, "pirate@1", "staging")
    with pytest.raises(NotFound, match="adapter 'pirat' not found; did you mean 'pirate'\\?"):
        resolve(catalog, "pirat")
    with pytest.raises(NotFound, match="no alias 'stagin'; did you mean 'staging'\\?"):
        resolve(catalog, "pirate@stagin")
    with pytest.raises(NotFound, match="^adapter 'zzz' not found$"):
        resolve(catalog, "zzz")
    with pytest.raises(NotFound, match="base 'tinyy' not found; did you mean 'tiny'\\?"):
        get_base(catalog, "tinyy")
    with pytest.raises(NotFound, match="did you mean 'smollm2-135m-instruct'"):
        get_base(catalog, "smollm2-135m-instrct", provision=False)


# -- every validation rule: specific message, nothing written ------------------------

def _break_pickle(d, tmp):
    torch.save({"w": torch.zeros(1)}, d / "adapter_model.bin")
    os.remove(d / "adapter_model.safetensors")


def _break_symlink(d, tmp):
    outside = tmp / "outside.md"
    outside.write_text("secret")
    os.symlink(outside, d / "README.md") if not (d / "README.md").exists() else (os.remove(d / "README.md"), os.symlink(outside, d / "README.md"))


def _break_missing_config(d, tmp):
    os.remove(d / "adapter_config.json")


def _break_bad_json(d, tmp):
    (d / "adapter_config.json").write_text("{not json")


def _break_peft_type(d, tmp):
    edit_config(d, peft_type="IA3")


def _break_rank(d, tmp):
    edit_config(d, r=0)


def _break_alpha(d, tmp):
    edit_config(d, lora_alpha=-3)


def _break_rank_mismatch(d, tmp):
    edit_config(d, r=8)


def _break_target_missing(d, tmp):
    edit_config(d, target_modules=["q_proj", "query_key_value"])


def _break_shapes(d, tmp):
    t = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in t if "q_proj.lora_A" in k)
    t[key] = torch.randn(4, 65)
    save_file(t, str(d / "adapter_model.safetensors"))


def _break_unknown_module(d, tmp):
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 64)
    t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 4)
    save_file(t, str(d / "adapter_model.safetensors"))


def _break_nan(d, tmp):
    t = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in t if "lora_B" in k)
    t[key][0, 0] = float("nan")
    save_file(t, str(d / "adapter_model.safetensors"))


def _break_noop(d, tmp):
    t = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in t.items()}, str(d / "adapter_model.safetensors"))


def _break_dora(d, tmp):
    edit_config(d, use_dora=True)


def _break_modules_to_save(d, tmp):
    edit_config(d, modules_to_save=["lm_head"])


def _break_bias(d, tmp):
    edit_config(d, bias="all")


def _break_extra_tensor(d, tmp):
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.lm_head.weight"] = torch.randn(10, 64)
    save_file(t, str(d / "adapter_model.safetensors"))


def _break_not_safetensors(d, tmp):
    (d / "adapter_model.safetensors").write_bytes(b"garbage" * 10)


BROKEN = [
    (_break_pickle, "pickle-format weights are refused"),
    (_break_symlink, "outside the adapter folder"),
    (_break_missing_config, "missing adapter_config.json"),
    (_break_bad_json, "not valid JSON"),
    (_break_peft_type, "only LORA adapters"),
    (_break_rank, "rank r=0"),
    (_break_alpha, "lora_alpha=-3"),
    (_break_rank_mismatch, "has rank 4 but the config says r=8"),
    (_break_target_missing, r"target_modules \['query_key_value'\] match no module"),
    (_break_shapes, "do not fit the base layer"),
    (_break_unknown_module, "which base 'tiny' does not have"),
    (_break_nan, "NaN or infinite"),
    (_break_noop, "no-op: every lora_B is zero"),
    (_break_dora, "DoRA"),
    (_break_modules_to_save, "modules_to_save"),
    (_break_bias, "bias='all'"),
    (_break_extra_tensor, "not a LoRA A/B weight"),
    (_break_not_safetensors, "cannot be read as safetensors"),
]


@pytest.mark.parametrize("breaker,message", BROKEN, ids=[b.__name__[7:] for b, _ in BROKEN])
def test_invalid_adapter_refused_and_nothing_written(catalog, store, tiny_base, tiny_adapter, tmp_path, breaker, message):
    register_adapter(catalog, store, tiny_adapter, "good", base="tiny")  # something already there
    before = _snapshot_state(catalog, store)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapter, broken)
    breaker(broken, tmp_path)
    with pytest.raises(InvalidAdapter, match=message):
        register_adapter(catalog, store, broken, "bad", base="tiny")
    assert _snapshot_state(catalog, store) == before
    assert catalog.one("SELECT count(*) AS n FROM adapters WHERE name = 'bad'")["n"] == 0


def test_noop_allowed_when_asked(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    noop = make_adapter(tiny_base_dir, tmp_path / "noop", r=4, alpha=8, noop=True)
    row = register_adapter(catalog, store, noop, "noop", base="tiny", allow_noop=True)
    assert row["version"] == 1


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "a" * 129, "x\x00y", "-lead", "a..b"])
def test_bad_names_refused(catalog, store, tiny_base, tiny_adapter, name):
    with pytest.raises(InvalidName):
        register_adapter(catalog, store, tiny_adapter, name, base="tiny")
    assert catalog.one("SELECT count(*) AS n FROM adapter_versions")["n"] == 0


def test_unknown_base_refused(catalog, store, tiny_adapter):
    with pytest.raises(NotFound, match="base 'nope' not found"):
        register_adapter(catalog, store, tiny_adapter, "x", base="nope")


def test_hf_cache_snapshot_layout(catalog, store, tiny_base, tiny_adapter, tmp_path):
    """A Hugging Face cache snapshot: files are links into the repo's blobs/."""
    from loradex.hub.store import file_sha256

    repo = tmp_path / "hf" / "models--someone--style-lora"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for f in tiny_adapter.iterdir():
        blob = repo / "blobs" / file_sha256(f)
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    row = register_adapter(catalog, store, repo, "from-cache", base="tiny")
    assert row["version"] == 1
    assert register_adapter(catalog, store, snap, "from-cache", base="tiny")["version"] == 1


def test_alias_and_delete(catalog, store, tiny_base, tiny_adapter, tmp_path, tiny_base_dir):
    register_adapter(catalog, store, tiny_adapter, "a", base="tiny")
    v2 = register_adapter(catalog, store, make_adapter(tiny_base_dir, tmp_path / "o", r=4, alpha=8, seed=3), "a", base="tiny")
    set_alias(catalog, "a@1", "staging")
    assert resolve(catalog, "a@staging")["version"] == 1
    with pytest.raises(Conflict, match="aliased as staging"):
        delete_version(catalog, store, "a@1")
    with pytest.raises(Conflict, match="explicit version"):
        delete_version(catalog, store, "a")
    delete_version(catalog, store, "a@1", force=True)
    with pytest.raises(NotFound):
        resolve(catalog, "a@staging")
    assert [r["version"] for r in list_adapters(catalog)] == [2]
    assert store.verify(v2["path"], v2["files"]) == []
    events = catalog.query("SELECT alias, version FROM alias_events ORDER BY id")
    assert events == [{"alias": "staging", "version": 1}]


def test_verify_reports_tampering(catalog, store, tiny_base, tiny_adapter):
    row = register_adapter(catalog, store, tiny_adapter, "t", base="tiny")
    assert verify(catalog, store)[0]["ok"]
    target = store.resolve(row["path"]) / "adapter_model.safetensors"
    os.chmod(target, 0o644)
    with open(target, "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff")
    res = verify(catalog, store)
    assert not res[0]["ok"] and "adapter_model.safetensors" in res[0]["problems"][0]
    from loradex.hub.errors import IntegrityError
    from loradex.hub.registry import adapter_folder

    with pytest.raises(IntegrityError, match="sha256"):
        adapter_folder(catalog, store, "t@1")


def test_sixteen_threads_register_at_once(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    srcs = [make_adapter(tiny_base_dir, tmp_path / f"a{i}", r=2, alpha=4, seed=i) for i in range(16)]
    errors = []

    def work(i):
        try:
            register_adapter(catalog, store, srcs[i], f"thread-{i % 8}", base="tiny")
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = list_adapters(catalog)
    assert len(rows) == 16 and all(r["status"] == "ready" for r in rows)
    assert sorted((r["adapter"], r["version"]) for r in rows) == sorted((f"thread-{i}", v) for i in range(8) for v in (1, 2))
    assert all(r["ok"] for r in verify(catalog, store))


@pytest.mark.heavy
def test_eight_cli_processes_at_once(settings, catalog, store, tiny_base, tiny_base_dir, tmp_path):
    srcs = [make_adapter(tiny_base_dir, tmp_path / f"p{i}", r=2, alpha=4, seed=100 + i) for i in range(8)]
    catalog.close()  # the processes must be able to take the file
    procs = [subprocess.Popen([sys.executable, "-m", "loradex", "register", str(src), "--name", f"proc-{i}", "--base", "tiny"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, src in enumerate(srcs)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1] for o in outs]
    res = run_cli("list", "--json")
    rows = json.loads(res.stdout)
    assert sorted(r["adapter"] for r in rows) == [f"proc-{i}" for i in range(8)]
    assert all(r["status"] == "ready" for r in rows)


KILL_TARGET = """
import sys
from loradex.hub.catalog import Catalog
from loradex.hub.store import Store
from loradex.hub.registry import register_adapter
cat = Catalog.open(sys.argv[1]); store = Store(sys.argv[2])
print("go", flush=True)
register_adapter(cat, store, sys.argv[3], "big", base="tiny")
cat.close()
"""


@pytest.mark.heavy
def test_sigkill_mid_write_leaves_nothing_half_done(settings, catalog, store, tiny_base, tiny_base_dir, tmp_path):
    src = make_adapter(tiny_base_dir, tmp_path / "big", r=16, alpha=16)
    (src / "README.md").write_text("model card\n" * 3_000_000)  # ~33 MB widens the write window
    catalog.close()
    tmp_root = store.root / "tmp"
    killed_mid_write = 0
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILL_TARGET, str(settings.catalog_path), str(store.root), str(src)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if tmp_root.exists() and any(p.name.startswith(f"{proc.pid}-") for p in tmp_root.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_write += 1
                break
            time.sleep(0.0005)
        proc.wait()
        from loradex.hub.catalog import Catalog

        with Catalog.open(settings.catalog_path) as cat:
            ready = cat.query("SELECT path, files FROM adapter_versions WHERE status = 'ready'")
            for r in ready:  # no ready version without its files
                assert store.verify(r["path"], r["files"]) == []
            if ready:
                break  # a run finished before we could kill it: the invariant held
    assert killed_mid_write >= 1
    # every visible snapshot is complete; leftovers are only under tmp/
    for snap in (store.root / "snapshots").iterdir() if (store.root / "snapshots").exists() else []:
        manifest = json.loads((snap / ".loradex-manifest.json").read_text())
        assert store.verify(str(snap.relative_to(store.root)), manifest) == []
    # the next command cleans up the dead writer's pending row and temp files
    res = run_cli("list", "--json")
    assert res.returncode == 0, res.stderr
    from loradex.hub.catalog import Catalog

    with Catalog.open(settings.catalog_path) as cat:
        assert cat.one("SELECT count(*) AS n FROM adapter_versions WHERE status = 'pending'")["n"] == 0
    assert not tmp_root.exists() or not list(tmp_root.iterdir())
    res = run_cli("register", str(src), "--name", "big", "--base", "tiny", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "ready"
