"""Test helpers: build PEFT adapters in code, run the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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
