"""Integration on the real default base (SmolLM2-135M-Instruct): lift, gate, no-skill refusal.

The style adapter is the training stage's shipped demo adapter when present
(``examples/demo-adapters/pirate``); otherwise it is fitted here in a few
steps of plain PEFT on the pirate demo data (completion-only loss), which is
enough to learn the "Arr, matey! ... Yo-ho-ho!" style.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loradex.evals import evaluate
from loradex.evals.gate import check_promotion
from loradex.hub.registry import register_adapter
from tests.helpers import make_adapter, run_cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "data" / "pirate.jsonl"
HELD_OUT = REPO / "examples" / "data" / "pirate-eval.jsonl"
DEMO = REPO / "examples" / "demo-adapters" / "pirate"
N_EVAL = 8
MAX_NEW = 24


def fit_style_adapter(base_dir: Path, data: Path, out: Path, *, steps: int = 16, batch: int = 8, lr: float = 3e-3,
                      seed: int = 0) -> Path:
    """A few AdamW steps of LoRA (r=8, q/v) on the completion tokens of a chat JSONL."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loradex.hub.chat import encode_chat

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    examples = []
    for row in rows:
        msgs = row["messages"]
        p = encode_chat(tok, msgs[:-1])
        c = tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((p + c, len(p)))
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch_rows = rng.sample(examples, batch)
        width = max(len(ids) for ids, _ in batch_rows)
        ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (seq, n_prompt) in enumerate(batch_rows):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
            labels[i, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def style_adapter_dir(smollm_folder, tmp_path_factory) -> Path:
    if (DEMO / "adapter_config.json").is_file():
        return DEMO
    return fit_style_adapter(smollm_folder, TRAIN, tmp_path_factory.mktemp("pirate") / "adapter", steps=10, batch=4, lr=5e-3)


@pytest.mark.heavy
def test_style_adapter_lifts_and_passes_gate_no_skill_is_refused(catalog, store, settings, smollm, smollm_folder,
                                                                   style_adapter_dir, tmp_path):
    from loradex.hub.catalog import Catalog

    register_adapter(catalog, store, style_adapter_dir, "pirate", base="smollm2-135m-instruct")
    run = evaluate(catalog, store, "pirate@1", HELD_OUT, metrics=("similarity",), max_new_tokens=MAX_NEW,
                   limit=N_EVAL, batch_size=8, settings=settings)
    lift = run["paired"]["similarity"]
    assert lift["ci_low"] > 0, lift
    assert run["metrics"]["similarity"]["mean"] > run["base_metrics"]["similarity"]["mean"]
    assert run["win_rate"]["rate"] > 0.5
    # scored as trained (LoRA on the fp32 base), and the run says so
    assert run["serving_config"]["quantize"] == "none" and run["serving_config"]["base"] == "smollm2-135m-instruct"
    gate = check_promotion(catalog, {"id": run["adapter_version_id"], "adapter": "pirate", "version": 1})
    assert gate["ok"], gate["reasons"]
    nf4 = dict(run["serving_config"], quantize="nf4")  # what the default server runs: no eval there yet
    assert "--quantize nf4" in check_promotion(catalog, {"id": run["adapter_version_id"], "adapter": "pirate",
                                                         "version": 1}, config=nf4)["reasons"][0]
    assert gate["lift"]["ci_low"] == pytest.approx(lift["ci_low"])
    catalog.close()
    # the CLI's gate judges as the default server serves it (NF4): not scored there, so refused, saying how
    r = run_cli("alias", "set", "pirate@1", "production")
    assert r.returncode == 6 and "--quantize nf4" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run_cli("alias", "set", "pirate@1", "production", "--force", "--reason", "scored as trained in this test")
    assert r.returncode == 0, r.stderr

    # a no-skill version: every lora_B zero, registered with --allow-noop
    noop = make_adapter(smollm_folder, tmp_path / "noop", r=8, alpha=16, noop=True)
    cat = Catalog.open(settings.catalog_path, wait_s=30)
    try:
        register_adapter(cat, store, noop, "pirate", base="smollm2-135m-instruct", allow_noop=True)
        run2 = evaluate(cat, store, "pirate@2", HELD_OUT, metrics=("similarity",), max_new_tokens=MAX_NEW,
                        limit=N_EVAL, batch_size=8, settings=settings)
        # the base pass was served from the cache, and a zero adapter generates exactly what the base did
        assert run2["decoding"]["base_cached"] is True
        samples = cat.query("SELECT output, base_output FROM eval_samples WHERE run_id = ?", [run2["id"]])
        assert all(s["output"] == s["base_output"] for s in samples)
        assert run2["paired"]["similarity"]["diff"] == pytest.approx(0.0, abs=1e-6)
        gate2 = check_promotion(cat, {"id": run2["adapter_version_id"], "adapter": "pirate", "version": 2})
        assert not gate2["ok"]
        assert any("not positive at 95%" in r for r in gate2["reasons"])
        assert any("worse than production pirate@1" in r for r in gate2["reasons"])
        assert gate2["production"]["candidate_mean"] < gate2["production"]["mean"]
    finally:
        cat.close()
    r = run_cli("alias", "set", "pirate@2", "production")  # the CLI's gate: as the default (NF4) server serves it
    assert r.returncode == 6 and "no eval under the serving configuration nf4" in r.stderr
    r = run_cli("alias", "set", "pirate@2", "production", "--force", "--reason", "integration test override", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["forced"] is True
    r = run_cli("leaderboard", "--data", str(HELD_OUT), "--json")
    rows = json.loads(r.stdout)["sections"][0]["rows"]
    assert [row["ref"] for row in rows] == ["pirate@1", "pirate@2"]
