"""Test helpers: build PEFT adapters in code, run the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def make_adapter(base_dir: Path, out: Path, *, r: int = 8, alpha: int = 16, targets=("q_proj", "v_proj"),
                 seed: int = 0, noop: bool = False, scale: float = 0.05, **extra) -> Path:
    """A PEFT LoRA adapter over ``base_dir`` with random (non-zero) lora_B, saved with plain PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **extra))
    if not noop:
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                torch.nn.init.normal_(p, std=scale)
    peft_model.save_pretrained(out)
    return out


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "loradex", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, env: dict | None = None, timeout: float = 180, key: str | None = None,
                 cwd: Path | str | None = None) -> tuple[subprocess.Popen, str]:
    """A real `loradex serve ARGS --port P` on loopback, once its /ready answers 200: (process, URL).

    ``env``: variables to set (a None value removes one); ``key``: serve with ``--api-key KEY``.
    """
    import pytest

    port = free_port()
    environ = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    proc = subprocess.Popen([sys.executable, "-m", "loradex", "serve", *args, "--port", str(port),
                             "--log-level", "warning", *(["--api-key", key] if key else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/ready", headers=headers), timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read()}")
        time.sleep(0.3)
    stop_server(proc)
    pytest.fail("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def export_world(root: Path, base_dir: Path, probes: list[str] | None = None) -> dict:
    """A catalog and store under ``root`` holding the default base (from ``base_dir``), an adapter ``smolad``
    (r=8 on the attention projections, seed 7) and its merge. ``probes``, when given, are recorded as the
    adapter's eval prompts first (merge and export probe with those). The caller closes ``world["catalog"]``."""
    from loradex.hub.bases import DEFAULT_BASE, add_base
    from loradex.hub.catalog import Catalog, to_json, utcnow
    from loradex.hub.registry import register_adapter
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store
    from loradex.promote.merge import MergeConfig, merge_adapter

    settings = Settings(home=root / "home", store=root / "store")
    catalog = Catalog.open(settings.catalog_path, wait_s=5)
    store = Store(settings.store)
    add_base(catalog, store, DEFAULT_BASE, str(base_dir))
    ad = make_adapter(base_dir, root / "ad", r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                      scale=0.02, seed=7)
    version = register_adapter(catalog, store, ad, "smolad", base=DEFAULT_BASE)
    if probes:
        with catalog.transaction() as cur:
            cur.execute("INSERT INTO eval_runs (adapter_version_id, base, data_sha256, n, metrics, decoding, created_at) "
                        "VALUES (?, ?, 'x', ?, '{}', '{}', ?)", [version["id"], DEFAULT_BASE, len(probes), utcnow()])
            run_id = cur.execute("SELECT max(id) FROM eval_runs").fetchone()[0]
            for i, p in enumerate(probes):
                cur.execute("INSERT INTO eval_samples (run_id, idx, prompt, scores) VALUES (?, ?, ?, ?)",
                            [run_id, i, p, to_json({})])
    merge = merge_adapter(catalog, store, "smolad@1", MergeConfig(max_new_tokens=8), settings)
    return {"catalog": catalog, "store": store, "settings": settings, "adapter_dir": ad, "merge": merge,
            "base_dir": base_dir, "root": root}


def hf_greedy_chat(model, tok, prompt: str, n: int, *, cut_at_eos: bool = True):
    """transformers' greedy answer to one user message, the reference the runtime suites compare against.

    Returns (messages, prompt text, prompt ids, new ids); with ``cut_at_eos`` the new ids end at the first
    end-of-sequence token. pad_token_id is eos and eos_token_id is left as configured: with pad != eos,
    generate would mask every pad token inside the chat prompt (e.g. <|im_end|>) and answer another prompt."""
    import torch

    msgs = [{"role": "user", "content": prompt}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    if cut_at_eos and tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return msgs, tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), ids, new
