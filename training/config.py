"""``TrainConfig``: every knob of a training run, typed, documented and validated.

Loaded from flags, or from a YAML/JSON file (``--config run.yaml``) with flags
overriding it. The fully resolved config is recorded in the run row and saved as
``loradex_train_config.json`` beside the adapter it produced.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loradex.hub.errors import InvalidConfig

CONFIG_FILE = "loradex_train_config.json"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
QUANTIZE = ("none", "nf4")
PRECISIONS = ("auto", "fp32", "bf16")
METHODS = ("sft", "dpo")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """A LoRA / QLoRA fine-tuning run: base + data in, registered adapter out."""

    data: str = ""
    """Training JSONL file (chat ``messages``, ``prompt``/``completion`` or ``text`` rows); flag --data."""
    name: str = ""
    """Adapter name to register the result under; flag --name."""
    base: str = "smollm2-135m-instruct"
    """Registered base model name (`loradex base list`); flag --base."""
    eval_data: str | None = None
    """Held-out JSONL file, same formats; its loss is recorded; flag --eval-data."""
    output_dir: str | None = None
    """Run folder for checkpoints and the adapter (default $LORADEX_HOME/runs/NAME); flag --output-dir."""
    epochs: float = 1.0
    """Passes over the training data (ignored when --max-steps > 0); flag --epochs."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 means use --epochs; flag --max-steps."""
    learning_rate: float = 2e-4
    """Peak learning rate; flag --learning-rate."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule: cosine, linear, constant or constant_with_warmup; flag --lr-scheduler."""
    warmup_ratio: float = 0.05
    """Fraction of the total steps spent warming up (converted to warmup steps); flag --warmup-ratio."""
    batch_size: int = 4
    """Examples per device per forward pass; flag --batch-size."""
    grad_accum: int = 1
    """Forward passes accumulated per optimizer step (effective batch = batch_size x grad_accum); flag --grad-accum."""
    max_length: int = 512
    """Tokens per example; longer examples are truncated (counted and reported); flag --max-length."""
    r: int = 16
    """LoRA rank; flag --r."""
    alpha: float = 32.0
    """LoRA alpha (scale = alpha / r); flag --alpha."""
    dropout: float = 0.05
    """LoRA dropout; flag --dropout."""
    targets: str = "q_proj,v_proj"
    """Comma-separated module names to adapt, or all-linear; flag --targets."""
    quantize: str = "nf4"
    """Base weights: nf4 (QLoRA: 4-bit NF4, double quant; the default) or none (LoRA on full-precision
    weights); flag --quantize. The default matches what ``loradex serve`` serves (NF4): measured on the
    demo data, an adapter trained on the fp32 base lost 0.04-0.10 similarity behind NF4, while the same
    data trained as QLoRA scored as well served on NF4 as evaluated (docs/evals.md)."""
    precision: str = "auto"
    """Compute precision: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16; flag --precision."""
    threads: int = 0
    """torch CPU threads; 0 means LORADEX_THREADS (default 1); flag --threads."""
    seed: int = 42
    """Random seed for LoRA init, shuffling and dropout; flag --seed."""
    save_steps: int = 50
    """Save a checkpoint every N optimizer steps (used by --resume); flag --save-steps."""
    logging_steps: int = 5
    """Record the training loss every N optimizer steps; flag --logging-steps."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N; flag --device."""
    gpu_type: str = "a10g"
    """Device type whose hourly price estimates the cost when training on a GPU; flag --gpu-type."""
    resume: bool = False
    """Continue the interrupted or failed run in --output-dir from its last checkpoint; flag --resume."""
    chat_template: bool = True
    """Wrap string prompt/completion rows in the base's chat template (user/assistant); flag --no-chat-template."""
    gradient_checkpointing: bool | None = None
    """Recompute activations to save memory; None means on for QLoRA on CUDA only; flag --gradient-checkpointing."""
    eval_batch_size: int = 8
    """Examples per forward pass when computing the held-out loss; flag --eval-batch-size."""
    run_evals: bool = True
    """With --eval-data: score the registered adapter against its base with the evals stage; flag --no-evals."""
    eval_max_new_tokens: int = 64
    """Greedy tokens generated per held-out item by that evaluation; flag --eval-max-new-tokens."""
    description: str | None = None
    """Free-text description stored with the adapter; flag --description."""
    allow_noop: bool = False
    """Register the adapter even if every lora_B is still zero (e.g. a 1-step smoke test); flag --allow-noop."""
    method: str = "sft"
    """sft (supervised, training.run) or dpo (preference pairs, training.dpo: --data holds
    {prompt, chosen, rejected} rows as written by `loradex review pairs`); flag --method."""
    from_ref: str | None = None
    """dpo: the adapter to continue (NAME[@V|@ALIAS]); its LoRA weights are trained further and its base is
    used; default: fresh LoRA on --base; flag --from."""
    beta: float = 0.1
    """dpo: strength of the pull towards the reference (the starting adapter); higher stays closer; flag --beta."""
    extra: dict = field(default_factory=dict)
    """Free-form notes kept with the run (not used by training)."""

    def __post_init__(self) -> None:
        if not self.data:
            raise InvalidConfig("--data is required: a JSONL file of training examples")
        if not self.name:
            raise InvalidConfig("--name is required: the adapter name to register the result under")
        from loradex.hub.names import check_name

        check_name(self.name, "--name")
        if not self.base:
            raise InvalidConfig("--base must name a registered base model")
        self.epochs = float(self.epochs)
        self.alpha = float(self.alpha)
        self.learning_rate = float(self.learning_rate)
        if self.epochs <= 0 and self.max_steps <= 0:
            raise InvalidConfig(f"--epochs must be > 0 (got {self.epochs}) unless --max-steps is set")
        if self.max_steps == 0 or self.max_steps < -1:
            raise InvalidConfig(f"--max-steps must be a positive number or -1, got {self.max_steps}")
        if not 0 < self.learning_rate < 1:
            raise InvalidConfig(f"--learning-rate must be in (0, 1), got {self.learning_rate}")
        if self.lr_scheduler not in SCHEDULERS:
            raise InvalidConfig(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidConfig(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("batch_size", "grad_accum", "r", "save_steps", "logging_steps", "eval_batch_size",
                     "eval_max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidConfig(f"{_flag(name)} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise InvalidConfig(f"--max-length must be an integer >= 8, got {self.max_length!r}")
        if self.alpha <= 0:
            raise InvalidConfig(f"--alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InvalidConfig(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.target_list():
            raise InvalidConfig("--targets must name at least one module (e.g. q_proj,v_proj) or be all-linear")
        if self.quantize not in QUANTIZE:
            raise InvalidConfig(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.method not in METHODS:
            raise InvalidConfig(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.from_ref is not None and self.method != "dpo":
            raise InvalidConfig("--from continues an adapter with preference training: use it with --method dpo")
        self.beta = float(self.beta)
        if not self.beta > 0:
            raise InvalidConfig(f"--beta must be > 0, got {self.beta}")
        if self.precision not in PRECISIONS:
            raise InvalidConfig(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise InvalidConfig(f"--threads must be an integer >= 0, got {self.threads!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise InvalidConfig(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        from loradex.training.cost import known_device_types

        if self.gpu_type.lower() not in known_device_types():
            raise InvalidConfig(
                f"--gpu-type {self.gpu_type!r} is not in the price table ({', '.join(sorted(known_device_types()))})"
            )
        self.gpu_type = self.gpu_type.lower()

    def target_list(self) -> list[str] | str:
        """``"all-linear"`` or the list of module names."""
        if self.targets.strip() == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        # a saved loradex_train_config.json carries what the run resolved (device,
        # versions, ...) under "resolved"; it is a record, not an input
        data = {k: v for k, v in data.items() if k != "resolved"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidConfig(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def read_config_file(path: str | Path) -> dict:
    """The fields of a YAML or JSON config file (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidConfig(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise unrelated classes
        raise InvalidConfig(f"--config {path}: cannot parse ({type(exc).__name__}: {exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidConfig(f"--config {path}: expected a mapping of field: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """File values, then ``overrides`` (flags the user actually gave) on top."""
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data, source=f"--config {path}" if path else "config")
