"""``loradex plan``: what a LoRA/QLoRA run will need, from the model config alone.

The model is built on PyTorch's meta device (shapes, no weights, no memory) and
wrapped with PEFT exactly as ``loradex train`` would, so the parameter counts are
PEFT's own. For the shipped Llama-3.1-8B config with r=16 on q_proj,v_proj:
8,030,261,248 total and 6,815,744 trainable parameters.

Estimates (rough, and labelled so):

* weights: bf16 = 2 bytes/param; NF4 = 4.127 bits per quantized Linear weight
  (4-bit codes + double-quantized absmax) with embeddings, norms and lm_head in bf16;
* LoRA training state: fp32 weights + grads + two Adam moments = 16 bytes/param;
* activations: per layer ``34 * tokens * hidden`` bytes (Korthikanti et al. 2022,
  without the attention matrix: SDPA/flash does not store it), or only the layer
  inputs with gradient checkpointing, plus fp32 logits and their gradient;
* time: 4 x params FLOPs per trained token (forward 2N + input-gradient backward
  2N; frozen weights need no weight gradient) over an effective throughput per
  device (peak x an assumed utilisation); the cpu figure was measured here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from loradex.hub.errors import InvalidConfig, NotFound

CONFIG_DIR = Path(__file__).parent / "configs"
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)   # codes + fp8 absmax per 64 + fp32 scale per 256 blocks
# effective training throughput, TFLOP/s (dense bf16 peak x ~35% utilisation; cpu: measured,
# SmolLM2-135M fp32 LoRA on 1 thread of this 2-core machine)
EFFECTIVE_TFLOPS = {
    "cpu": 0.07, "t4": 65 * 0.35, "l4": 121 * 0.35, "a10g": 70 * 0.35, "a100-40gb": 312 * 0.35,
    "a100-80gb": 312 * 0.35, "h100": 989 * 0.35, "h200": 989 * 0.35,
}
DEVICE_MEMORY_GB = {"t4": 16, "l4": 24, "a10g": 24, "a100-40gb": 40, "a100-80gb": 80, "h100": 80, "h200": 141}
QLORA_SLOWDOWN = 1.3  # dequantizing NF4 weights on every matmul


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the model configs shipped in training/configs."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidConfig(f"--config-json {path}: cannot read ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise InvalidConfig(f"--config-json {path}: not a transformers config.json (no model_type)")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def meta_model(config_dict: dict):
    """The model built on the meta device from a config dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config_dict)
    model_type = cfg.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError) as exc:
        raise InvalidConfig(f"model_type {model_type!r} is not known to transformers ({exc})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), config


def count_params(config_dict: dict, r: int, targets: str) -> dict:
    """Total / trainable parameters and the Linear-weight share, via PEFT on the meta device."""
    import torch

    from loradex.hub import quiet

    quiet.install()
    from peft import LoraConfig, get_peft_model

    model, config = meta_model(config_dict)
    total = sum(p.numel() for p in model.parameters())
    linear_in_layers = sum(m.weight.numel() for n, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    target_list = "all-linear" if targets.strip() == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    try:
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_list,
                                                      task_type="CAUSAL_LM"))
    except ValueError as exc:
        raise InvalidConfig(f"--targets {targets}: {exc}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "linear_in_layers": linear_in_layers,
            "hidden": config.hidden_size, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
            "architecture": (config.architectures or [type(model).__name__])[0]}


def _data_tokens(data: str, base_row: dict | None, max_length: int) -> dict:
    """Examples and tokens of a data file: exact with the base's tokenizer, else ~chars/4."""
    from loradex.training.data import load_dataset, read_examples

    if base_row is not None:
        from loradex.hub.loading import load_tokenizer

        tok = load_tokenizer(base_row["path"], base_row["config"].get("max_position_embeddings"))
        ds = load_dataset(data, tok, max_length)
        return {"examples": len(ds), "tokens": ds.tokens, "method": "tokenizer", "truncated": ds.truncated}
    _, examples = read_examples(data)
    tokens = 0
    for ex in examples:
        chars = len(json.dumps([ex.prompt, ex.completion, ex.text]))
        tokens += min(max_length, math.ceil(chars / 4))
    return {"examples": len(examples), "tokens": tokens, "method": "approx chars/4", "truncated": None}


def make_plan(*, base: str | None = None, config_json: str | None = None, r: int = 16,
              targets: str = "q_proj,v_proj", quantize: str = "none", data: str | None = None,
              epochs: float = 1.0, batch_size: int = 4, max_length: int = 512, gpu: str = "a10g",
              catalog_opener=None, settings=None) -> dict:
    """Numbers for a run; ``catalog_opener()`` is called only for a registered base."""
    from loradex.training.cost import price_table

    if r < 1:
        raise InvalidConfig(f"--r must be >= 1, got {r}")
    if quantize not in ("none", "nf4"):
        raise InvalidConfig(f"--quantize must be none or nf4, got {quantize!r}")
    if epochs <= 0:
        raise InvalidConfig(f"--epochs must be > 0, got {epochs}")
    if batch_size < 1 or max_length < 8:
        raise InvalidConfig("--batch-size must be >= 1 and --max-length >= 8")
    gpu = gpu.lower()
    prices = price_table(settings.home if settings else None)
    if gpu not in prices or gpu not in EFFECTIVE_TFLOPS:
        raise InvalidConfig(f"--gpu {gpu!r}: known device types are {', '.join(sorted(set(prices) & set(EFFECTIVE_TFLOPS)))}")

    base_row = None
    shipped = shipped_configs()
    if config_json:
        source, cfg = config_json, _read_json(Path(config_json))
    else:
        name = base or "smollm2-135m-instruct"
        if name in shipped:
            source, cfg = f"shipped config {name}", _read_json(shipped[name])
        else:
            from loradex.hub.bases import get_base

            if catalog_opener is None:
                raise NotFound(f"--base {name}: not a shipped config ({', '.join(shipped)}) and no catalog to look it up")
            try:
                base_row = get_base(catalog_opener(), name)
            except NotFound:
                raise NotFound(f"--base {name}: not a registered base nor a shipped config "
                               f"({', '.join(shipped)})") from None
            source, cfg = f"registered base {name}", dict(base_row["config"])
    params = count_params(cfg, r, targets)
    total, trainable, linear = params["total"], params["trainable"], params["linear_in_layers"]

    weights_bf16 = total * 2
    weights_nf4 = math.ceil(linear * NF4_BITS / 8) + (total - linear) * 2
    weights = weights_nf4 if quantize == "nf4" else weights_bf16
    lora_state = trainable * 16
    tokens_per_batch = batch_size * max_length
    act_full = params["layers"] * 34 * tokens_per_batch * params["hidden"]
    act_ckpt = params["layers"] * 2 * tokens_per_batch * params["hidden"] + 34 * tokens_per_batch * params["hidden"]
    logits = tokens_per_batch * params["vocab"] * 4 * 2
    plan = {
        "source": source, "architecture": params["architecture"], "r": r, "targets": targets,
        "quantize": quantize, "total_params": total, "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / total,
        "adapter_bytes": trainable * 4,
        "weights_bytes": {"bf16": weights_bf16, "nf4": weights_nf4},
        "lora_optimizer_bytes": lora_state,
        "activation_bytes": {"batch_size": batch_size, "max_length": max_length, "no_checkpointing": act_full + logits,
                             "gradient_checkpointing": act_ckpt + logits},
        "peak_estimate_bytes": {"no_checkpointing": weights + lora_state + act_full + logits,
                                "gradient_checkpointing": weights + lora_state + act_ckpt + logits},
        "gpu": gpu, "gpu_memory_gb": DEVICE_MEMORY_GB.get(gpu),
    }
    if data:
        counts = _data_tokens(data, base_row, max_length)
        trained_tokens = counts["tokens"] * epochs
        flops = 4 * total * trained_tokens
        seconds = flops / (EFFECTIVE_TFLOPS[gpu] * 1e12) * (QLORA_SLOWDOWN if quantize == "nf4" else 1.0)
        plan["data"] = {**counts, "epochs": epochs, "trained_tokens": trained_tokens,
                        "steps": math.ceil(counts["examples"] / batch_size * epochs),
                        "train_flops": flops, "estimated_seconds": seconds,
                        "usd_per_hour": prices[gpu], "estimated_usd": seconds / 3600 * prices[gpu]}
    return plan


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_plan(p: dict) -> str:
    from loradex.hub.render import human_bytes

    act, peak = p["activation_bytes"], p["peak_estimate_bytes"]
    lines = [
        f"plan for {p['source']} ({p['architecture']}), LoRA r={p['r']} on {p['targets']}, quantize {p['quantize']}",
        f"  total parameters      {p['total_params']:,}",
        f"  trainable parameters  {p['trainable_params']:,} ({p['trainable_pct']:.4f}%)",
        f"  adapter on disk       {human_bytes(p['adapter_bytes'])} (fp32 safetensors)",
        f"  weights in memory     bf16 {_gb(p['weights_bytes']['bf16'])}, NF4 {_gb(p['weights_bytes']['nf4'])}",
        f"  LoRA weights+grads+Adam {_gb(p['lora_optimizer_bytes'])}",
        f"  activations (rough)   batch {act['batch_size']} x {act['max_length']} tokens: "
        f"{_gb(act['no_checkpointing'])}, {_gb(act['gradient_checkpointing'])} with gradient checkpointing",
        f"  peak estimate         {_gb(peak['no_checkpointing'])} ({_gb(peak['gradient_checkpointing'])} with checkpointing)"
        + (f" vs {p['gpu_memory_gb']} GB on {p['gpu']}" if p.get("gpu_memory_gb") else ""),
    ]
    d = p.get("data")
    if d:
        lines += [
            f"  data                  {d['examples']:,} examples, {d['tokens']:,} tokens ({d['method']}), "
            f"{d['epochs']:g} epoch(s), ~{d['steps']:,} steps at batch {act['batch_size']}",
            f"  time (rough)          {d['estimated_seconds'] / 60:.1f} min on {p['gpu']} "
            f"({d['train_flops'] / 1e12:.1f} TFLOP)",
            f"  cost (rough)          ${d['estimated_usd']:.4f} at ${d['usd_per_hour']:.2f}/h",
        ]
    return "\n".join(lines)
