"""``loradex train`` and ``loradex plan``: thin edges over training.train and training.plan.

    loradex train --data train.jsonl --name my-adapter [--base B] [--eval-data held.jsonl]
                  [--config run.yaml] [--resume] [--r 16 --targets q_proj,v_proj --quantize nf4 ...]
    loradex train --method dpo --data pairs.jsonl --name NAME [--from NAME@V] [--beta 0.1]
    loradex plan  --base B | --config-json FILE [--r 16 --targets q_proj,v_proj --quantize nf4]
                  [--data FILE --epochs N --gpu a10g]

``train`` never holds the catalog during the training loop: it opens it to look
up the base and insert the run row, closes it, trains, and reopens it to
register the adapter and finish the row.
"""
from __future__ import annotations

from loradex.hub.render import human_bytes

# (flag, field, type, help); every one also settable in --config, flags win
TRAIN_FLAGS = [
    ("--epochs", "epochs", float, "passes over the data (default 1)"),
    ("--max-steps", "max_steps", int, "stop after N optimizer steps (default -1: use --epochs)"),
    ("--learning-rate", "learning_rate", float, "peak learning rate (default 2e-4)"),
    ("--lr-scheduler", "lr_scheduler", str, "cosine | linear | constant | constant_with_warmup (default cosine)"),
    ("--warmup-ratio", "warmup_ratio", float, "fraction of steps to warm up (default 0.05)"),
    ("--batch-size", "batch_size", int, "examples per device per step (default 4)"),
    ("--grad-accum", "grad_accum", int, "gradient accumulation steps (default 1)"),
    ("--max-length", "max_length", int, "tokens per example; longer ones are truncated and counted (default 512)"),
    ("--r", "r", int, "LoRA rank (default 16)"),
    ("--alpha", "alpha", float, "LoRA alpha (default 32)"),
    ("--dropout", "dropout", float, "LoRA dropout (default 0.05)"),
    ("--targets", "targets", str, "modules to adapt, comma-separated, or all-linear (default q_proj,v_proj)"),
    ("--quantize", "quantize", str, "nf4 (QLoRA, default: matches the NF4 server) | none (LoRA on full-precision weights)"),
    ("--precision", "precision", str, "auto | fp32 | bf16 (default auto: bf16 on CUDA, fp32 on CPU)"),
    ("--threads", "threads", int, "torch CPU threads (default LORADEX_THREADS, 1)"),
    ("--seed", "seed", int, "random seed (default 42)"),
    ("--save-steps", "save_steps", int, "checkpoint every N steps (default 50)"),
    ("--logging-steps", "logging_steps", int, "log the loss every N steps (default 5)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N (default auto)"),
    ("--gpu-type", "gpu_type", str, "price-table entry used for the cost estimate on GPU (default a10g)"),
    ("--output-dir", "output_dir", str, "run folder (default $LORADEX_HOME/runs/NAME)"),
    ("--eval-batch-size", "eval_batch_size", int, "batch size for the held-out loss (default 8)"),
    ("--eval-max-new-tokens", "eval_max_new_tokens", int, "tokens generated per held-out item when scoring (default 64)"),
    ("--description", "description", str, "description stored with the adapter"),
    ("--method", "method", str, "sft (default) | dpo: preference pairs {prompt, chosen, rejected} from "
                                "`loradex review pairs`"),
    ("--from", "from_ref", str, "with --method dpo: the adapter NAME[@V] to continue (its base, LoRA weights and, "
                                "unless --quantize is given, its quantization); default a fresh LoRA"),
    ("--beta", "beta", float, "with --method dpo: pull towards the starting adapter (default 0.1)"),
]


def add_commands(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="fine-tune a LoRA/QLoRA adapter, record the run, register it",
                       description="Fine-tune a LoRA (or QLoRA with --quantize nf4) adapter on a JSONL file, "
                                   "record the run in the catalog and register the adapter. With --method dpo, "
                                   "preference-tune one (--from) on chosen/rejected pairs.")
    p.add_argument("--data", help="training JSONL (chat messages, prompt/completion, or text rows)")
    p.add_argument("--name", help="adapter name to register the result under")
    p.add_argument("--base", help="registered base model (default smollm2-135m-instruct)")
    p.add_argument("--eval-data", dest="eval_data", help="held-out JSONL; its loss is recorded")
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields; flags override it")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the interrupted/failed run in the output folder from its last checkpoint")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=None,
                   help="train string prompt/completion rows as raw text, without the base's chat template")
    p.add_argument("--no-evals", dest="run_evals", action="store_false", default=None,
                   help="with --eval-data, record the held-out loss only (skip scoring with the evals stage)")
    p.add_argument("--allow-noop", dest="allow_noop", action="store_true", default=None,
                   help="register the adapter even if it is still a no-op (every lora_B zero)")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations to save memory (default: on for QLoRA on CUDA only)")
    for flag, dest, typ, help_text in TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_text)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", parents=[common], help="parameters, memory, time and cost of a run, from the config alone",
                       description="Estimate a LoRA/QLoRA run from the model config alone (meta device, no weights).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", help="registered base, or a shipped config: " + ", ".join(_shipped()))
    src.add_argument("--config-json", dest="config_json", help="a model config.json file")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="q_proj,v_proj", help="modules to adapt or all-linear (default q_proj,v_proj)")
    p.add_argument("--quantize", default="nf4", help="nf4 | none (default nf4, as `loradex train`)")
    p.add_argument("--data", help="training JSONL: adds a time and dollar estimate")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over --data (default 1)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=4, help="examples per step (default 4)")
    p.add_argument("--max-length", dest="max_length", type=int, default=512, help="tokens per example (default 512)")
    p.add_argument("--gpu", default="a10g", help="device type from the price table (default a10g)")
    p.set_defaults(func=cmd_plan)


def _shipped() -> list[str]:
    from loradex.training.plan import shipped_configs

    return sorted(shipped_configs())


def cmd_train(ctx) -> int:
    from loradex.training.config import load_config
    from loradex.training.run import train

    a = ctx.args
    overrides = {dest: getattr(a, dest) for _, dest, _, _ in TRAIN_FLAGS}
    overrides.update(data=a.data, name=a.name, base=a.base, eval_data=a.eval_data, resume=a.resume,
                     chat_template=a.chat_template, gradient_checkpointing=a.gradient_checkpointing,
                     run_evals=a.run_evals, allow_noop=a.allow_noop)
    if a.method == "dpo":
        return _cmd_dpo(ctx, overrides)
    config = load_config(a.config, **overrides)
    ctx.close_catalog()  # train() opens the catalog only for its short writes
    result = train(config, settings=ctx.settings, store=ctx.store)
    if result.version is None:  # a non-main process under `accelerate launch`: rank 0 reports
        return 0
    v = result.version
    data = {"run_id": result.run_id, "adapter": v["adapter"], "version": v["version"], "base": v["base"],
            "output_dir": str(result.output_dir), "steps": result.steps, "final_loss": result.final_loss,
            "eval_loss": result.eval_loss, "duration_s": result.duration_s, "tokens_per_s": result.tokens_per_s,
            "digest": v["digest"], "quantization": v["quantization"], "eval_run_id": result.eval_run_id}

    def human() -> str:
        ev = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        if result.eval_run_id is not None:
            ev += f" (scored: `loradex eval show {result.eval_run_id}`)"
        return (f"trained {v['adapter']}@{v['version']} on {v['base']} (run {result.run_id}): {result.steps} steps in "
                f"{result.duration_s:.0f}s, {result.tokens_per_s:.0f} tok/s, final loss {result.final_loss:.4f}{ev}; "
                f"{human_bytes(v['size_bytes'])}, digest {v['digest'][:12]}; loss curve {result.output_dir}/loss_curve.png")

    ctx.emit(data, human)
    return 0


def _cmd_dpo(ctx, overrides: dict) -> int:
    from loradex.training.config import load_config
    from loradex.training.dpo import train_dpo

    a = ctx.args
    if a.from_ref and (a.base is None or a.quantize is None):  # continue the adapter on what it was trained against
        from loradex.hub.registry import resolve

        parent = resolve(ctx.catalog, a.from_ref)
        overrides["base"] = a.base or parent["base"]
        if a.quantize is None:
            overrides["quantize"] = parent["quantization"] if parent["quantization"] in ("none", "nf4") else "none"
    if a.eval_data:
        from loradex.hub.errors import InvalidConfig

        raise InvalidConfig("--eval-data is for SFT runs; score the DPO adapter with `loradex eval NAME --data FILE`")
    config = load_config(a.config, **overrides)
    ctx.close_catalog()
    r = train_dpo(config, settings=ctx.settings, store=ctx.store)
    v, p = r.version, r.preference
    data = {"run_id": r.run_id, "method": "dpo", "adapter": v["adapter"], "version": v["version"], "base": v["base"],
            "output_dir": str(r.output_dir), "steps": r.steps, "final_loss": r.final_loss, "duration_s": r.duration_s,
            "digest": v["digest"], "quantization": v["quantization"], "preference": p}
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
    ctx.emit(data, f"trained {v['adapter']}@{v['version']} with DPO on {p['n']} pairs (run {r.run_id}, "
                   f"{config.from_ref or 'fresh LoRA on ' + config.base}): {r.steps} steps in {r.duration_s:.0f}s, "
                   f"final loss {loss}; margin log p(chosen) - log p(rejected) {p['margin_before']:+.3f} -> "
                   f"{p['margin_after']:+.3f} nats, pairs preferred {p['accuracy_before']:.0%} -> "
                   f"{p['accuracy_after']:.0%}; digest {v['digest'][:12]}")
    return 0


def cmd_plan(ctx) -> int:
    from loradex.training.plan import format_plan, make_plan

    a = ctx.args
    plan = make_plan(base=a.base, config_json=a.config_json, r=a.r, targets=a.targets, quantize=a.quantize,
                     data=a.data, epochs=a.epochs, batch_size=a.batch_size, max_length=a.max_length, gpu=a.gpu,
                     catalog_opener=lambda: ctx.catalog, settings=ctx.settings)
    ctx.emit(plan, lambda: format_plan(plan))
    return 0

