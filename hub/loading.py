"""``load_base``: the one loader every stage uses (training, evals, serving, merge).

Picks the device (CUDA when present), the dtype (bf16 on CUDA, fp32 on CPU) and
the quantization:

* ``none``: plain weights in the chosen dtype;
* ``nf4``: bitsandbytes 4-bit NF4 with double quantization; compute in bf16 on
  CUDA, fp32 on CPU (bitsandbytes 0.50 runs NF4 on CPU with a pure-torch path);
* ``int8``: bitsandbytes LLM.int8().

Importing this module silences two known-harmless library messages (``hub/quiet.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loradex.hub import quiet
from loradex.hub.errors import InvalidConfig

# before anything imports bitsandbytes (peft does on import): see hub/quiet.py
quiet.install()

QUANTIZE_CHOICES = ("none", "nf4", "int8")


@dataclass
class LoadedBase:
    """A loaded base model and what is needed to use it."""

    name: str
    record: dict
    model: Any
    tokenizer: Any
    quantize: str
    device: str
    dtype: Any
    info: dict = field(default_factory=dict)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidConfig(f"--device {device}: CUDA is not available on this machine")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InvalidConfig(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def pick_dtype(device: str, dtype: str | None = None):
    import torch

    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype is not None:
        if dtype not in names:
            raise InvalidConfig(f"--dtype must be one of fp32, bf16, fp16, got {dtype!r}")
        return names[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quantize: str, device: str, compute_dtype):
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidConfig(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(folder: str | Path, max_length: int | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.model_max_length is None or tok.model_max_length > 10**8:
        tok.model_max_length = max_length or 2048
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_folder(folder: str | Path, *, quantize: str = "none", device: str = "auto", dtype: str | None = None):
    """Load a model folder the way ``load_base`` does; returns (model, device, dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    qconf = quantization_config(quantize, device, torch_dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if qconf is None:
        model.to(device)
    model.eval()
    return model, device, torch_dtype


def load_base(
    name: str,
    quantize: str = "none",
    device: str = "auto",
    *,
    catalog=None,
    store=None,
    settings=None,
    dtype: str | None = None,
    serving: bool = False,
) -> LoadedBase:
    """Load base ``name`` from the catalog (provisioning the default base if needed).

    With no ``catalog`` a short-lived one is opened from ``settings`` (or the
    environment) just for the lookup, so the file is not held while loading.
    ``serving``: also pick the Linear kernel for serving on this machine, by
    measurement (``serving/kernels.py``); the choice is in ``info["kernels"]``.
    """
    from loradex.hub.bases import get_base
    from loradex.hub.settings import Settings, apply_threads
    from loradex.hub.store import Store

    if quantize not in QUANTIZE_CHOICES:
        raise InvalidConfig(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    settings = settings or Settings()
    apply_threads(settings.threads)
    from loradex.hub.catalog import borrowed

    with borrowed(catalog, settings) as cat:
        record = get_base(cat, name, store=store or Store(settings.store))
    folder = Path(record["path"])
    if serving:  # refuse an architecture the engine does not run before reading its weights
        from types import SimpleNamespace

        from loradex.serving.families import family_of

        family_of(SimpleNamespace(**record["config"]))
    model, dev, torch_dtype = load_model_folder(folder, quantize=quantize, device=device, dtype=dtype)
    max_pos = record["config"].get("max_position_embeddings")
    tokenizer = load_tokenizer(folder, max_pos)
    info: dict = {}
    if serving:
        from loradex.serving.kernels import choose

        info["kernels"] = choose(model, quantize=quantize, dtype=torch_dtype, device=dev)
    return LoadedBase(name=name, record=record, model=model, tokenizer=tokenizer, quantize=quantize,
                      device=dev, dtype=torch_dtype, info=info)
