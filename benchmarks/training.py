"""Training step rate: ``loradex train`` against a plain TRL ``SFTTrainer`` script, same data, same settings.

Both train LoRA r=16 (alpha 32, dropout 0.05) on q_proj,v_proj of the same base,
fp32 on CPU, on the same synthetic conversational prompt/completion file
(completion-only loss on both sides), with the same batch size, learning rate,
cosine schedule, warmup steps, optimizer, seed and step count, and no
gradient checkpointing (loradex's CPU default; TRL's default is set off to
match). Runs alternate (loradex, TRL, TRL, loradex, ...); no warm-up run is
needed because each run's first optimizer step is its warm-up::

    step rate = (steps - 1) / (end of last step - end of first step)

timed by the same ``TrainerCallback`` on both sides. The end-to-end wall time
of a run (load, tokenize, train, save; loradex also records and registers) is
reported beside it. Target: loradex >= 1.0 x TRL.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import Metric, Report, interleave, log, ratios, summarize
from benchmarks.workspace import Workspace

NAME = "training"
R, ALPHA, DROPOUT, TARGETS = 16, 32.0, 0.05, ["q_proj", "v_proj"]
LEARNING_RATE, WARMUP_RATIO, SEED = 2e-4, 0.05, 42

SUBJECTS = ["the moon", "tea", "rivers", "owls", "bridges", "maps", "snow", "violins", "bees", "ferries",
            "lanterns", "glaciers", "clocks", "kites", "deserts", "harbours"]
ASPECTS = ["Why does {s} matter to people?", "Describe {s} in two sentences.", "What is one surprising fact about {s}?",
           "How would you explain {s} to a child?"]


def write_data(path: Path, n: int) -> Path:
    """``n`` conversational prompt/completion rows (varied lengths, deterministic)."""
    lines = []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        q = ASPECTS[(i // len(SUBJECTS)) % len(ASPECTS)].format(s=s)
        a = (f"{s.capitalize()} shapes daily life in quiet ways. " * (1 + i % 3)
             + f"Many people notice {s} only when it is gone, and then they miss it.")
        lines.append(json.dumps({"prompt": [{"role": "user", "content": q}],
                                 "completion": [{"role": "assistant", "content": a}]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def step_timer():
    """A TrainerCallback recording when each optimizer step ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimer()


def step_rate(ends: list[float]) -> float:
    if len(ends) < 2 or ends[-1] <= ends[0]:
        raise RuntimeError(f"a training run recorded {len(ends)} steps; need 2 or more to time")
    return (len(ends) - 1) / (ends[-1] - ends[0])


def run_loradex(ws: Workspace, data: Path, steps: int, i: int) -> dict:
    from loradex.training import TrainConfig, train

    timer = step_timer()
    cfg = TrainConfig(data=str(data), name=f"bench-train-{i}", base=ws.base_name, max_steps=steps,
                      batch_size=ws.sizes.train_batch, grad_accum=1, max_length=512, r=R, alpha=ALPHA,
                      dropout=DROPOUT, targets=",".join(TARGETS), quantize="none", precision="fp32",
                      learning_rate=LEARNING_RATE, lr_scheduler="cosine", warmup_ratio=WARMUP_RATIO, seed=SEED,
                      logging_steps=5, save_steps=10_000, device=ws.device,
                      output_dir=str(ws.root / "runs" / f"loradex-{i}"))
    t = time.perf_counter()
    train(cfg, settings=ws.settings, store=ws.store, callbacks=[timer])
    return {"steps_per_s": step_rate(timer.ends), "wall_s": time.perf_counter() - t, "steps": len(timer.ends)}


def run_trl(ws: Workspace, data: Path, steps: int, i: int) -> dict:
    """What a user would write with TRL alone (no loradex code on the training path but the base loader)."""
    import math

    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from loradex.hub.loading import load_model_folder, load_tokenizer

    disable_progress_bar()
    timer = step_timer()
    t = time.perf_counter()
    tokenizer = load_tokenizer(ws.base_folder)
    model, device, _ = load_model_folder(ws.base_folder, quantize="none", device=ws.device, dtype="fp32")
    model.config.use_cache = False
    dataset = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(
        output_dir=str(ws.root / "runs" / f"trl-{i}"), max_steps=steps,
        per_device_train_batch_size=ws.sizes.train_batch, gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=math.ceil(WARMUP_RATIO * steps),
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, max_length=512, packing=False,
        gradient_checkpointing=False, bf16=False, fp16=False, seed=SEED, data_seed=SEED,
        logging_steps=5, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=device == "cpu", dataloader_num_workers=0, dataloader_pin_memory=False, log_level="warning",
    )
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # keep stdout for the result table
    trainer.train()
    trainer.model.save_pretrained(ws.root / "runs" / f"trl-{i}" / "adapter")
    return {"steps_per_s": step_rate(timer.ends), "wall_s": time.perf_counter() - t, "steps": len(timer.ends)}


def run(ws: Workspace, report: Report) -> dict:
    sizes = ws.sizes
    data = write_data(ws.root / "train-data.jsonl", sizes.train_examples)
    steps = sizes.train_steps
    counter = {"loradex": 0, "trl": 0}

    def side(name: str, fn):
        def go() -> dict:
            counter[name] += 1
            log(f"training: {name} run {counter[name]} ({steps} steps)")
            return fn(ws, data, steps, counter[name])
        return go

    got = interleave({"loradex": side("loradex", run_loradex), "trl": side("trl", run_trl)},
                     reps=sizes.reps, warmup=0)
    rates = {k: [r["steps_per_s"] for r in v] for k, v in got.items()}
    walls = {k: [r["wall_s"] for r in v] for k, v in got.items()}
    settings = f"batch {sizes.train_batch}, r={R} q,v, fp32, {steps} steps"
    report.add(Metric("training.loradex_steps_per_s", rates["loradex"], "steps/s", note=f"loradex train, {settings}"))
    report.add(Metric("training.trl_steps_per_s", rates["trl"], "steps/s", note=f"plain TRL SFTTrainer, {settings}"))
    report.add(Metric("training.loradex_over_trl", ratios(rates["loradex"], rates["trl"]), "x", 1.0, ">=",
                      "step rate, same data and settings, interleaved"))
    report.add(Metric("training.loradex_wall_s", walls["loradex"], "s", note="whole run incl. load, record, register"))
    report.add(Metric("training.trl_wall_s", walls["trl"], "s", note="whole run incl. load, tokenize, save"))
    report.add(Metric("training.wall_trl_over_loradex", ratios(walls["trl"], walls["loradex"]), "x",
                      note="end to end; > 1 means loradex finished sooner"))
    return {"steps": steps, "examples": sizes.train_examples, "steps_per_s": {k: summarize(v) for k, v in rates.items()},
            "wall_s": {k: summarize(v) for k, v in walls.items()}}
