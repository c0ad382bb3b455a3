"""``train_dpo()``: preference pairs in, a registered preference-tuned adapter out.

    loradex review pairs 3 -o pairs.jsonl
    loradex train --method dpo --data pairs.jsonl --from support-bot@2 --name support-bot [--beta 0.1]

Top to bottom::

    config -> base row (or --from's adapter: its base and folder) (short catalog open)
      -> pairs read and checked ({prompt, chosen, rejected}; chat messages or strings)
      -> run row 'running', method dpo, parent version (short catalog open)
      -> load base (fp32 / bf16 / NF4) -> the --from adapter's LoRA, trainable (or fresh LoRA)
      -> margin before: log p(chosen) - log p(rejected) per pair, completion tokens only
      -> TRL DPOTrainer (sigmoid loss; the reference is a frozen copy of the starting
         adapter, which TRL keeps as a second adapter "ref" beside "default")
      -> margin after -> adapter ("default" only) + resolved config + loss PNG in OUTPUT_DIR/adapter
      -> register through hub.registry (same checks as SFT runs), run row 'completed'
         with its numbers and the margins (training_runs.preference)

DPO scores only the answers: TRL tokenizes ``prompt`` with the generation prompt
and ``prompt + chosen`` / ``prompt + rejected`` without, and takes log-probs of
the tokens after the shared prefix (the completion, end-of-turn included).
:func:`pair_logprobs` measures the margin the same way.

The catalog is never held during the loop. A DPO run keeps no checkpoints: an
interrupted run is recorded ``interrupted`` and started again from the top.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from loradex.hub import quiet
from loradex.hub.catalog import borrowed
from loradex.hub.errors import InvalidConfig, InvalidData
from loradex.training.config import CONFIG_FILE, TrainConfig

ADAPTER_SUBDIR = "adapter"
LOSS_PNG = "loss_curve.png"


@dataclass
class DPOResult:
    """What a finished preference run produced."""

    run_id: int
    version: dict
    output_dir: Path
    steps: int
    final_loss: float | None
    duration_s: float
    preference: dict
    """{n, margin_before, margin_after, accuracy_before, accuracy_after}: mean log-prob margin
    (chosen - rejected, nats) and share of pairs with a positive margin, on the training pairs."""


# -- data ---------------------------------------------------------------------------------

def _messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip() and role == "user":
            raise InvalidData(f"{where}: {field!r} is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidData(f"{where}: {field!r} must be a string or a non-empty list of chat messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidData(f"{where}: {field!r} has a message without string role and content: {str(m)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_pairs(path: str | Path) -> tuple[list[dict], str]:
    """Rows ``{prompt: [messages], chosen: [assistant msg], rejected: [assistant msg]}`` and the file's sha256."""
    from loradex.hub.store import file_sha256

    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"--data {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InvalidData(f"{where}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or not all(k in obj for k in ("prompt", "chosen", "rejected")):
                keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                raise InvalidData(f"{where}: a preference row needs prompt, chosen and rejected (got {keys}); "
                                  f"write one with `loradex review pairs REVIEW_ID -o FILE`")
            prompt = _messages(obj["prompt"], "user", where, "prompt")
            if prompt[-1]["role"] == "assistant":
                raise InvalidData(f"{where}: 'prompt' must end before the answer (its last message is the assistant's)")
            chosen = _messages(obj["chosen"], "assistant", where, "chosen")
            rejected = _messages(obj["rejected"], "assistant", where, "rejected")
            for name, turn in (("chosen", chosen), ("rejected", rejected)):
                if len(turn) != 1 or turn[0]["role"] != "assistant":
                    raise InvalidData(f"{where}: {name!r} must be one assistant message")
            if chosen[0]["content"] == rejected[0]["content"]:
                raise InvalidData(f"{where}: chosen and rejected are the same answer")
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not rows:
        raise InvalidData(f"--data {path}: no preference pairs in the file")
    return rows, file_sha256(path)


# -- measuring ------------------------------------------------------------------------------

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pair_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 8) -> list[tuple[float, float]]:
    """(sum log p(chosen), sum log p(rejected)) per row, over completion tokens only (as TRL's DPO scores them)."""
    from loradex.hub.chat import completion_logprobs, encode_chat, pad_id

    seqs: list[tuple[list[int], int]] = []
    for r in rows:
        prompt = encode_chat(tokenizer, r["prompt"], add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            full = encode_chat(tokenizer, r["prompt"] + r[side], add_generation_prompt=False)
            seqs.append((full, _common_prefix(prompt, full)))
    pad = pad_id(tokenizer)
    sums: list[float] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(seqs), batch_size):
        sums.extend(completion_logprobs(model, seqs[start:start + batch_size], pad)[0].tolist())
    if was_training:
        model.train()
    return [(sums[2 * i], sums[2 * i + 1]) for i in range(len(rows))]


def margins(model, tokenizer, rows: list[dict], batch_size: int = 8) -> tuple[float, float]:
    """(mean margin chosen - rejected, share of pairs with a positive margin)."""
    pairs = pair_logprobs(model, tokenizer, rows, batch_size)
    diffs = [c - r for c, r in pairs]
    return sum(diffs) / len(diffs), sum(d > 0 for d in diffs) / len(diffs)


# -- the workflow ---------------------------------------------------------------------------

def _model(config: TrainConfig, base_path: str, parent_folder: Path | None, device: str, precision: str):
    """The base in the run's precision with the starting LoRA: the --from adapter's (trainable) or a fresh one."""
    from loradex.training.run import load_model

    return load_model(config, base_path, device, precision, parent_folder)


def dpo_args(config: TrainConfig, output_dir: Path, device: str, precision: str, warmup_steps: int, grad_ckpt: bool):
    """Every DPOConfig value loradex relies on, set explicitly (TRL's defaults: lr 1e-6, bf16 on, checkpointing on)."""
    from trl import DPOConfig

    from loradex.training.run import shared_trainer_args

    return DPOConfig(
        **shared_trainer_args(config, output_dir, device, precision, warmup_steps, grad_ckpt),
        truncation_mode="keep_start",
        beta=config.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        disable_dropout=True,
        save_strategy="no",
    )


def train_dpo(config: TrainConfig, *, catalog=None, store=None, settings=None) -> DPOResult:
    """Preference-train ``config.from_ref`` (or a fresh LoRA on ``config.base``) on the pairs in ``config.data``."""
    from loradex.hub.bases import get_base
    from loradex.hub.catalog import utcnow
    from loradex.hub.loading import load_tokenizer
    from loradex.hub.registry import adapter_folder, register_adapter, resolve
    from loradex.hub.settings import Settings, apply_threads
    from loradex.hub.store import Store
    from loradex.training import records
    from loradex.training.cost import estimate_cost
    from loradex.training.run import (_loss_curve, _versions, check_targets, planned_steps, resolve_device,
                                      resolve_precision, warmup_steps_for)

    if config.method != "dpo":
        raise InvalidConfig(f"train_dpo runs --method dpo, got {config.method!r}")
    t0 = time.monotonic()
    settings = settings or Settings()
    store = store or Store(settings.store)
    threads = config.threads or settings.threads
    apply_threads(threads)

    # -- 1. starting adapter, base and pairs: every check before anything is recorded ----------
    parent, parent_folder = None, None
    with borrowed(catalog, settings) as cat:
        if config.from_ref:
            parent, parent_folder = adapter_folder(cat, store, resolve(cat, config.from_ref))
            if parent["base"] != config.base:
                raise InvalidConfig(f"--from {config.from_ref} is an adapter of base {parent['base']!r}, "
                                    f"not --base {config.base!r}; drop --base")
        base_row = get_base(cat, config.base, store=store)
    if parent is None:
        check_targets(config, base_row["layers"])
    if config.resume:
        raise InvalidConfig("--resume: DPO runs keep no checkpoints; start the run again")
    rows, data_sha = read_pairs(config.data)
    tokenizer = load_tokenizer(base_row["path"], base_row["config"].get("max_position_embeddings"))
    output_dir = Path(config.output_dir or settings.home / "runs" / config.name).absolute()
    device = resolve_device(config)
    precision = resolve_precision(config.precision, device)
    grad_ckpt = bool(config.gradient_checkpointing)
    steps_planned = planned_steps(len(rows), config, 1)
    warmup_steps = warmup_steps_for(config, steps_planned)
    resolved = replace(config, data=str(Path(config.data).absolute()), output_dir=str(output_dir), threads=threads,
                       gradient_checkpointing=grad_ckpt).to_dict()
    resolved["resolved"] = {
        "method": "dpo", "device": device, "precision": precision, "quantization": config.quantize,
        "warmup_steps": warmup_steps, "planned_steps": steps_planned, "loss": "sigmoid (DPO), completion tokens only",
        "reference": f"frozen copy of {parent['adapter']}@{parent['version']}" if parent else "the base (fresh LoRA)",
        "lora": ({"from": f"{parent['adapter']}@{parent['version']}", "r": parent["rank"], "alpha": parent["alpha"],
                  "targets": parent["target_modules"]} if parent else
                 {"r": config.r, "alpha": config.alpha, "targets": config.target_list()}),
        "base_path": str(base_row["path"]), "base_files": base_row["files"], "versions": _versions(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / CONFIG_FILE
    config_path.write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    with borrowed(catalog, settings) as cat:
        records.reap_dead_runs(cat)
        busy = records.running_in(cat, str(output_dir))
        if busy:
            from loradex.hub.errors import Conflict

            raise Conflict(f"run {busy['id']} (pid {busy['pid']}) is training in {output_dir} right now; "
                           f"wait for it or choose another --output-dir")
        run_id = records.start_run(
            cat, config=resolved, base=config.base, output_dir=str(output_dir), config_path=str(config_path),
            data_path=str(Path(config.data).absolute()), data_sha256=data_sha,
            data_counts={"train": len(rows), "eval": 0, "format": "preference", "truncated": 0},
            device=device, precision=precision, quantization=config.quantize, pid=os.getpid())
        records.update_run(cat, run_id, method="dpo", parent_version_id=parent["id"] if parent else None)

    # -- 2. margin before, train, margin after ---------------------------------------------------
    trainer = None
    try:
        from datasets import Dataset as HFDataset
        from transformers import PrinterCallback
        from trl import DPOTrainer

        from loradex.training.callbacks import ProgressBar

        model = _model(config, base_row["path"], parent_folder, device, precision)
        before, acc_before = margins(model, tokenizer, rows, config.eval_batch_size)
        trainer = DPOTrainer(model=model, ref_model=None,
                             args=dpo_args(config, output_dir, device, precision, warmup_steps, grad_ckpt),
                             train_dataset=HFDataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[ProgressBar(f"dpo {config.name}")])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        trainer.model.set_adapter("default")
        after, acc_after = margins(trainer.model, tokenizer, rows, config.eval_batch_size)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        with borrowed(catalog, settings) as cat:
            records.update_run(cat, run_id, status=status, error=f"{type(exc).__name__}: {exc}", ended_at=utcnow(),
                               duration_s=time.monotonic() - t0,
                               steps=trainer.state.global_step if trainer is not None else 0)
        raise
    preference = {"n": len(rows), "margin_before": before, "margin_after": after,
                  "accuracy_before": acc_before, "accuracy_after": acc_after, "beta": config.beta}
    curve, _ = _loss_curve(trainer.state.log_history)
    final_loss = curve[-1][1] if curve else None

    # -- 3. save the "default" adapter (not TRL's "ref" copy), register, record -------------------
    try:
        adapter_dir = output_dir / ADAPTER_SUBDIR
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model = trainer.model
        peft_model.peft_config["default"].base_model_name_or_path = config.base
        peft_model.save_pretrained(adapter_dir, selected_adapters=["default"], save_embedding_layers=False)
        (adapter_dir / "README.md").unlink(missing_ok=True)
        resolved["resolved"]["preference"] = preference
        (adapter_dir / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
        png = None
        if curve:
            from loradex.training.plot import loss_png, method_label

            title = (f"{config.name} on {config.base} (DPO, {method_label(config.quantize, precision)}, "
                     f"beta={config.beta:g}, from {resolved['resolved']['lora'].get('from', 'fresh LoRA')})")
            png = loss_png(curve, adapter_dir / LOSS_PNG, title=title)
            shutil.copy(png, output_dir / LOSS_PNG)
        duration = time.monotonic() - t0
        cost, basis = estimate_cost(duration, device, config.gpu_type, settings.home)
        source = f"loradex train --method dpo (run {run_id}" + (f", from {parent['adapter']}@{parent['version']})"
                                                               if parent else ")")
        with borrowed(catalog, settings) as cat:
            version = register_adapter(cat, store, adapter_dir, config.name, base=config.base, training_run_id=run_id,
                                       quantization=config.quantize, description=config.description, source=source,
                                       allow_noop=config.allow_noop)
            records.update_run(cat, run_id, status="completed", error=None, ended_at=utcnow(), duration_s=duration,
                               steps=trainer.state.global_step, loss_curve=curve, final_loss=final_loss,
                               cost_usd=cost, cost_basis=basis, loss_png=str(output_dir / LOSS_PNG) if png else None,
                               adapter_version_id=version["id"], preference=preference)
    except BaseException as exc:
        with borrowed(catalog, settings) as cat:
            records.update_run(cat, run_id, status="failed", error=f"{type(exc).__name__}: {exc}", ended_at=utcnow(),
                               duration_s=time.monotonic() - t0)
        raise
    if after <= before:
        print(f"loradex: warning: the mean margin chosen - rejected did not grow ({before:+.3f} -> {after:+.3f} nats); "
              f"try more steps or a higher --learning-rate", file=sys.stderr)
    return DPOResult(run_id, version, output_dir, trainer.state.global_step, final_loss, duration, preference)
