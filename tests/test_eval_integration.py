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

from evals import evaluate
from evals.gate import check_promotion
from hub.registry import register_adapter
from tests.helpers import make_adapter, run_cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "data" / "pirate.jsonl"
HELD_OUT = REPO / "examples" / "data" / "pirate-eval.jsonl"
DEMO = REPO / "examples" / "demo-adapters" / "pirate"
N_EVAL = 12
MAX_NEW = 24


def fit_style_adapter(base_dir: Path, data: Path, out: Path, *, steps: int = 16, batch: int = 8, lr: float = 3e-3,
                      seed: int = 0) -> Path:
    """A few AdamW steps of LoRA (r=8, q/v) on the completion tokens of a chat JSONL."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.generate import prompt_ids

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    examples = []
    for row in rows:
        msgs = row["messages"]
        p = prompt_ids(tok, msgs[:-1])
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
