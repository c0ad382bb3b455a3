"""``train()``: a JSONL file in, a registered, reproducible adapter out.

Top to bottom::

    config -> base row (short catalog open) -> tokenizer + every data row checked
      -> run row 'running' (short catalog open)
      -> load base (fp32 / bf16 / NF4) -> LoRA -> TRL SFTTrainer (checkpoints, progress bar)
      -> adapter + resolved config + loss PNG in OUTPUT_DIR/adapter
      -> register through hub.registry (same checks as `loradex register`),
         run row 'completed' with its numbers (short catalog open)

The DuckDB catalog is never held during the training loop, so other short
commands keep working. Ctrl-C saves a checkpoint and records ``interrupted``; an
exception records ``failed``; ``resume=True`` continues from the last checkpoint
of the same output folder and re-opens the same run row.

Runs unchanged under ``accelerate launch`` (DDP): only the main process touches
the catalog and writes the adapter.
"""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from loradex.hub import quiet
from loradex.hub.catalog import borrowed
from loradex.hub.errors import Conflict, InvalidConfig
from loradex.training.config import CONFIG_FILE, TrainConfig
from loradex.training.data import Dataset, collate, load_dataset

LOSS_PNG = "loss_curve.png"
ADAPTER_SUBDIR = "adapter"


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_id: int | None
    """training_runs.id (None on non-main processes under DDP)."""
    version: dict | None
    """The registered adapter_versions row (None on non-main processes)."""
    output_dir: Path
    """Run folder; the adapter is in ``output_dir / "adapter"``."""
    final_loss: float | None
    """Last logged training loss."""
    eval_loss: float | None
    """Held-out loss after training (None without eval data)."""
    steps: int
    """Optimizer steps taken in total (across resumes)."""
    duration_s: float
    """Wall time of the run (across resumes), loading and saving included."""
    tokens_per_s: float
    """Non-padding tokens per second through the training loop (this attempt)."""
    eval_run_id: int | None = None
    """eval_runs.id of the evals-stage scoring on --eval-data (None when not run)."""

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / ADAPTER_SUBDIR


def _rank() -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the launcher's environment."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "-1")),
            int(os.environ.get("WORLD_SIZE", "1")))


def resolve_device(config: TrainConfig) -> str:
    from loradex.hub.loading import pick_device

    device = pick_device(config.device)
    _, local_rank, world = _rank()
    if device == "cuda" and world > 1 and local_rank >= 0:
        device = f"cuda:{local_rank}"
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def check_targets(config: TrainConfig, layers: dict) -> None:
    targets = config.target_list()
    if targets == "all-linear":
        return
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in layers)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise InvalidConfig(f"--targets {','.join(missing)} match no module of the base (its modules: {', '.join(suffixes)})")


def planned_steps(n_examples: int, config: TrainConfig, world: int) -> int:
    """Optimizer steps the Trainer will take (its own formula)."""
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(n_examples / (config.batch_size * world))
    per_epoch = max(batches // config.grad_accum + int(batches % config.grad_accum > 0), 1)
    return math.ceil(config.epochs * per_epoch)


def warmup_steps_for(config: TrainConfig, steps: int) -> int:
    """ceil(warmup_ratio x steps), but always short of the last step.

    transformers' warmup gives the first step a learning rate of 0, so a run made only
    of warmup steps (``--max-steps 1``) would train nothing and leave a no-op adapter.
    """
    return min(math.ceil(config.warmup_ratio * steps), max(steps - 1, 0))


def checkpoint_finished(checkpoint: Path) -> bool:
    """Whether the Trainer saved ``checkpoint`` at its last step (the loop was done; only registering failed)."""
    try:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return int(saved.get("max_steps") or 0) > 0 and int(saved.get("global_step") or 0) >= int(saved["max_steps"])


def last_checkpoint(output_dir: Path) -> Path | None:
    ckpts = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    ckpts = [p for p in ckpts if (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def _loss_curve(log_history: list[dict]) -> tuple[list[list[float]], list[list[float]]]:
    train = [[int(h["step"]), float(h["loss"])] for h in log_history if "loss" in h and "step" in h]
    evals = [[int(h["step"]), float(h["eval_loss"])] for h in log_history if "eval_loss" in h and "step" in h]
    return train, evals


def _versions() -> dict:
    quiet.install()
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def load_model(config: TrainConfig, base_path: str, device: str, precision: str, parent_folder: Path | None = None):
    """The base in the run's precision (NF4 for QLoRA), wrapped with fresh LoRA layers, or with the (trainable)
    LoRA of the adapter in ``parent_folder`` (DPO on top of an SFT adapter)."""
    import torch

    quiet.install()
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    from loradex.hub.loading import load_model_folder

    model, _, _ = load_model_folder(base_path, quantize=config.quantize, device=device, dtype=precision)
    model.config.use_cache = False
    if config.quantize == "nf4":
        # casts norms/embeddings to fp32 and enables input grads; checkpointing is the Trainer's job
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(config.seed)
    if parent_folder is not None:
        return PeftModel.from_pretrained(model, str(parent_folder), is_trainable=True)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_list(), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def shared_trainer_args(config: TrainConfig, output_dir: Path, device: str, precision: str, warmup_steps: int,
                        grad_ckpt: bool) -> dict:
    """The TrainingArguments values SFT and DPO runs both rely on, set explicitly (defaults move between releases)."""
    return dict(
        output_dir=str(output_dir),
        max_length=config.max_length,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        bf16=precision == "bf16",
        fp16=False,
        activation_checkpointing=grad_ckpt,
        gradient_checkpointing=grad_ckpt,
        activation_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        log_level="warning",
    )


def training_args(config: TrainConfig, output_dir: Path, device: str, precision: str, warmup_steps: int,
                  grad_ckpt: bool):
    """Every SFTConfig value loradex relies on, set explicitly (defaults move between releases).

    TRL's own defaults differ from transformers' (learning rate 2e-5, gradient checkpointing
    on, bf16 on, max_length 1024): each is set here. The rows arrive tokenized and masked by
    ``training.data`` (completion-only labels), so TRL's dataset preparation is skipped.
    """
    from trl import SFTConfig

    return SFTConfig(
        **shared_trainer_args(config, output_dir, device, precision, warmup_steps, grad_ckpt),
        packing=False,
        padding_free=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        loss_type="nll",
        per_device_eval_batch_size=config.eval_batch_size,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        save_only_model=False,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
    )


def train(config: TrainConfig, *, catalog=None, store=None, settings=None, callbacks=None) -> TrainResult:
    """Fine-tune ``config.base`` on ``config.data``, record the run, register the adapter.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (tests use one to
    deliver a real SIGINT mid-run).
    """
    from loradex.hub.bases import get_base
    from loradex.hub.loading import load_tokenizer
    from loradex.hub.settings import Settings, apply_threads
    from loradex.hub.store import Store
    from loradex.training import records

    t0 = time.monotonic()
    settings = settings or Settings()
    store = store or Store(settings.store)
    rank, _, world = _rank()
    main = rank == 0
    threads = config.threads or settings.threads
    apply_threads(threads)

    # -- 1. base and data: every check before anything is recorded or loaded -----------
    with borrowed(catalog, settings) as cat:
        base_row = get_base(cat, config.base, store=store)
    check_targets(config, base_row["layers"])
    tokenizer = load_tokenizer(base_row["path"], base_row["config"].get("max_position_embeddings"))
    train_ds = load_dataset(config.data, tokenizer, config.max_length, chat_template=config.chat_template)
    eval_ds = (load_dataset(config.eval_data, tokenizer, config.max_length, chat_template=config.chat_template)
               if config.eval_data else None)

    output_dir = Path(config.output_dir or settings.home / "runs" / config.name).absolute()
    checkpoint = last_checkpoint(output_dir) if output_dir.exists() else None
    if config.resume and checkpoint is None:
        raise InvalidConfig(f"--resume: no checkpoint in {output_dir} to continue from")
    if not config.resume and checkpoint is not None and checkpoint_finished(checkpoint):
        # a run that trained to its last step but was not registered: nothing to continue, start afresh
        if main:
            print(f"loradex: {output_dir} holds the checkpoints of a run that finished training but was not "
                  f"registered; starting a new run (they are replaced)", file=sys.stderr)
            for ckpt in output_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
        checkpoint = None
    if not config.resume and checkpoint is not None:
        raise Conflict(f"{output_dir} holds checkpoints of an unfinished run; pass --resume to continue it, "
                       f"or delete the folder / choose another --output-dir")
    device = resolve_device(config)
    precision = resolve_precision(config.precision, device)
    if precision == "bf16" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise InvalidConfig("--precision bf16: this GPU does not support bfloat16; use fp32")
    grad_ckpt = (config.gradient_checkpointing if config.gradient_checkpointing is not None
                 else config.quantize == "nf4" and device.startswith("cuda"))
    steps_planned = planned_steps(len(train_ds), config, world)
    warmup_steps = warmup_steps_for(config, steps_planned)
    resolved = replace(
        config,
        data=str(train_ds.path),
        eval_data=str(eval_ds.path) if eval_ds else None,
        output_dir=str(output_dir),
        threads=threads,
        resume=False,
        gradient_checkpointing=grad_ckpt,
    ).to_dict()
    resolved["resolved"] = {
        "device": device, "precision": precision, "quantization": config.quantize,
        "warmup_steps": warmup_steps, "planned_steps": steps_planned, "world_size": world,
        "effective_batch_size": config.batch_size * config.grad_accum * world,
        "base_path": str(base_row["path"]), "base_files": base_row["files"], "versions": _versions(),
    }
    counts = {
        "train": len(train_ds), "eval": len(eval_ds) if eval_ds else 0, "format": train_ds.format,
        "truncated": train_ds.truncated + (eval_ds.truncated if eval_ds else 0),
        "train_file": train_ds.counts(), "eval_file": eval_ds.counts() if eval_ds else None,
    }
    if train_ds.truncated and main:
        print(f"loradex: {train_ds.truncated} of {len(train_ds)} training examples are longer than "
              f"--max-length {config.max_length} and were truncated (lines {train_ds.truncated_lines[:10]})",
              file=sys.stderr)

    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / CONFIG_FILE
    run_id = None
    previous_duration = 0.0
    if main:
        config_path.write_text(json.dumps(resolved, indent=2, sort_keys=True))
        with borrowed(catalog, settings) as cat:
            records.reap_dead_runs(cat)
            busy = records.running_in(cat, str(output_dir))
            if busy:
                raise Conflict(f"run {busy['id']} (pid {busy['pid']}) is training in {output_dir} right now; "
                               f"wait for it or choose another --output-dir")
            prior = records.resumable_run(cat, str(output_dir)) if config.resume else None
            previous_duration = float(prior["duration_s"] or 0.0) if prior else 0.0
            run_id = records.start_run(
                cat, config=resolved, base=config.base, output_dir=str(output_dir), config_path=str(config_path),
                data_path=str(train_ds.path), data_sha256=train_ds.sha256, data_counts=counts, device=device,
                precision=precision, quantization=config.quantize, resume_id=prior["id"] if prior else None,
                pid=os.getpid(),
            )

    # -- 2. train -------------------------------------------------------------------
    state: dict = {"trainer": None}

    def record_outcome(status: str, error: str | None) -> None:
        if not main:
            return
        trainer = state["trainer"]
        history = trainer.state.log_history if trainer is not None else []
        curve, evals = _loss_curve(history)
        png = None
        if curve:
            png = str(_plot(curve, evals, output_dir / LOSS_PNG, config, precision, status))
        ckpt = last_checkpoint(output_dir)
        duration = previous_duration + time.monotonic() - t0
        from loradex.hub.catalog import utcnow
        from loradex.training.cost import estimate_cost

        cost, basis = estimate_cost(duration, device, config.gpu_type, settings.home)
        with borrowed(catalog, settings) as cat:
            records.update_run(
                cat, run_id, status=status, error=error, ended_at=utcnow(), duration_s=duration,
                steps=trainer.state.global_step if trainer is not None else 0,
                tokens_seen=int(trainer.state.num_input_tokens_seen) if trainer is not None else 0,
                loss_curve=curve, final_loss=curve[-1][1] if curve else None, loss_png=png,
                checkpoint=str(ckpt) if ckpt else None, cost_usd=cost, cost_basis=basis,
            )

    from loradex.training.callbacks import GracefulStop, ProgressBar

    stop = GracefulStop()
    try:
        trainer = _build_trainer(config, base_row, output_dir, device, precision, warmup_steps, grad_ckpt,
                                 train_ds, eval_ds, tokenizer,
                                 # caller callbacks run before the stop check, so a stop they trigger
                                 # takes effect at the step they saw
                                 [ProgressBar(f"train {config.name}"), *(callbacks or []), stop])
        state["trainer"] = trainer
        eval_before = None
        if eval_ds is not None and checkpoint is None:
            eval_before = float(trainer.evaluate()["eval_loss"])
            if main:
                with borrowed(catalog, settings) as cat:
                    records.update_run(cat, run_id, eval_loss_before=eval_before)
        tokens_before = 0
        if checkpoint is not None:
            saved = json.loads((checkpoint / "trainer_state.json").read_text())
            tokens_before = int(saved.get("num_input_tokens_seen") or 0)
        stop.install()
        loop_t0 = time.monotonic()
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            stop.uninstall()
        loop_s = time.monotonic() - loop_t0
        if stop.requested:
            record_outcome("interrupted", "stopped by Ctrl-C; continue with --resume")
            raise KeyboardInterrupt
        eval_loss = float(trainer.evaluate()["eval_loss"]) if eval_ds is not None else None
    except KeyboardInterrupt:
        if not stop.requested:
            record_outcome("interrupted", "interrupted (KeyboardInterrupt); continue with --resume")
        raise
    except BaseException as exc:
        record_outcome("failed", f"{type(exc).__name__}: {exc}")
        raise

    tokens_seen = int(trainer.state.num_input_tokens_seen)
    steps_done = trainer.state.global_step
    tokens_per_s = (tokens_seen - tokens_before) / loop_s if loop_s > 0 else 0.0
    curve, evals = _loss_curve(trainer.state.log_history)  # evaluate() logs before/after points too
    final_loss = curve[-1][1] if curve else None
    if not main:
        return TrainResult(None, None, output_dir, final_loss, eval_loss, trainer.state.global_step,
                           time.monotonic() - t0, tokens_per_s)

    # -- 3. save the adapter with its config and loss curve, register, record ------------
    try:
        adapter_dir = output_dir / ADAPTER_SUBDIR
        shutil.rmtree(adapter_dir, ignore_errors=True)
        # record the base by its catalog name, not this machine's folder (registry resolves it)
        trainer.model.peft_config["default"].base_model_name_or_path = config.base
        trainer.model.save_pretrained(adapter_dir, save_embedding_layers=False)
        (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate model card
        shutil.copy(config_path, adapter_dir / CONFIG_FILE)
        png = _plot(curve, evals, adapter_dir / LOSS_PNG, config, precision, "completed")
        shutil.copy(png, output_dir / LOSS_PNG)
        duration = previous_duration + time.monotonic() - t0
        from loradex.hub.catalog import utcnow
        from loradex.hub.registry import register_adapter
        from loradex.training.cost import estimate_cost

        cost, basis = estimate_cost(duration, device, config.gpu_type, settings.home)
        with borrowed(catalog, settings) as cat:
            version = register_adapter(
                cat, store, adapter_dir, config.name, base=config.base, training_run_id=run_id,
                quantization=config.quantize, description=config.description,
                source=f"loradex train (run {run_id})", allow_noop=config.allow_noop,
            )
            records.update_run(
                cat, run_id, status="completed", error=None, ended_at=utcnow(), duration_s=duration,
                steps=trainer.state.global_step, tokens_seen=tokens_seen, tokens_per_s=tokens_per_s,
                loss_curve=curve, final_loss=final_loss, eval_loss=eval_loss, cost_usd=cost,
                cost_basis=basis, loss_png=str(output_dir / LOSS_PNG), adapter_version_id=version["id"],
                checkpoint=None,
            )
    except BaseException as exc:
        record_outcome("failed", f"{type(exc).__name__}: {exc}")
        raise
    for ckpt in output_dir.glob("checkpoint-*"):  # the adapter is registered: checkpoints are spent
        shutil.rmtree(ckpt, ignore_errors=True)
    state["trainer"] = None  # free the model before the evals stage loads its own
    del trainer
    gc.collect()
    eval_run_id = _run_evals(config, version, catalog, store, settings, run_id) if eval_ds is not None else None
    return TrainResult(run_id, version, output_dir, final_loss, eval_loss, steps_done, duration, tokens_per_s,
                       eval_run_id)


def _run_evals(config: TrainConfig, version: dict, catalog, store, settings, run_id: int) -> int | None:
    """Score the new version on the held-out file with the evals stage (its scores land in eval_runs).

    Training has succeeded and the adapter is registered whatever happens here, so
    a failure is reported and noted on the run row, not raised.
    """
    if not config.run_evals:
        return None
    from loradex.evals import evaluate
    from loradex.hub.errors import LoradexError
    from loradex.training import records

    try:
        run = evaluate(catalog, store, version, config.eval_data, max_new_tokens=config.eval_max_new_tokens,
                       batch_size=config.eval_batch_size, seed=config.seed, settings=settings, device=config.device)
    except LoradexError as exc:
        print(f"loradex: the adapter is registered, but scoring it on --eval-data failed: {exc}", file=sys.stderr)
        with borrowed(catalog, settings) as cat:
            records.update_run(cat, run_id, error=f"evals failed: {exc}")
        return None
    return int(run["id"])


def _plot(curve, evals, path: Path, config: TrainConfig, precision: str, status: str) -> Path:
    from loradex.training.plot import loss_png, method_label

    # the held-out loss before the first step (logged at step 0) is the base's: LoRA starts as a no-op
    base_loss = next((loss for step, loss in evals if step == 0), None)
    after = [[step, loss] for step, loss in evals if step > 0]
    title = f"{config.name} on {config.base} ({method_label(config.quantize, precision)}, r={config.r}, {status})"
    return loss_png(curve, path, title=title, eval_points=after, base_loss=base_loss)


def _build_trainer(config, base_row, output_dir, device, precision, warmup_steps, grad_ckpt,
                   train_ds: Dataset, eval_ds: Dataset | None, tokenizer, callbacks):
    from datasets import Dataset as HFDataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    model = load_model(config, base_row["path"], device, precision)
    args = training_args(config, output_dir, device, precision, warmup_steps, grad_ckpt)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=HFDataset.from_list(train_ds.rows),
        eval_dataset=HFDataset.from_list(eval_ds.rows) if eval_ds is not None else None,
        processing_class=tokenizer,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id),  # keeps training.data's loss mask
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our ProgressBar reports instead of printing log dicts
    return trainer
