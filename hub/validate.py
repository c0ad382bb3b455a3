"""Adapter validation: everything is checked before a single byte is stored.

Each rule raises :class:`InvalidAdapter` with a message naming what is wrong.
The rules, in order:

1. the folder exists and has ``adapter_config.json`` and
   ``adapter_model.safetensors``; pickle weights (``.bin`` etc.) are refused;
2. no file is a link leading outside the folder (a Hugging Face cache snapshot
   may link into its own repo's ``blobs/``);
3. the config is a PEFT LoRA config with a sane rank and alpha; DoRA,
   ``modules_to_save``, trained biases and non-standard initialisations are
   refused (the serving path batches plain LoRA only);
4. every LoRA tensor names a module of the base with matching shapes, and the
   configured target modules match something;
5. all weights are finite;
6. the adapter is not a no-op (all ``lora_B`` zero) unless explicitly allowed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from loradex.hub.bases import PICKLE_SUFFIXES
from loradex.hub.errors import InvalidAdapter
from loradex.hub.peft_format import (
    CONFIG,
    DEFAULT_ALPHA,
    WEIGHTS,
    check_pattern,
    group_tensors,
    module_rank,
    read_config,
)
from loradex.hub.store import file_sha256

KEEP_SUFFIXES = (".json", ".safetensors", ".md", ".png", ".txt", ".jinja", ".yaml", ".yml", ".csv")
MAX_RANK = 4096
MAX_PATTERN_KEYS = 1024  # rank_pattern / alpha_pattern entries (PEFT writes one per distinct module at most)
MAX_WEIGHT = 1e4  # trained LoRA A/B values are O(1); far beyond this a forward only produces inf/NaN


@dataclass
class ValidatedAdapter:
    folder: Path
    files: dict[str, str]          # file -> sha256 (what will be stored)
    size_bytes: int
    config: dict
    rank: int
    alpha: float
    target_modules: list[str]      # module-name suffixes, e.g. ["q_proj", "v_proj"]
    modules: list[str]             # full module names carrying LoRA weights
    param_count: int
    features: dict
    base_model_name_or_path: str | None


def resolve_adapter_path(path: str) -> tuple[Path, Path]:
    """(folder, allowed_root) for a folder, a HF cache repo folder or ``hf:org/name``."""
    if path.startswith("hf:"):
        from huggingface_hub import snapshot_download

        repo = path[3:]
        try:
            folder = Path(snapshot_download(repo_id=repo, local_files_only=True))
        except Exception as exc:
            raise InvalidAdapter(
                f"{repo} is not in the local Hugging Face cache (loradex never downloads): {type(exc).__name__}"
            ) from None
        return folder, folder.parent.parent
    folder = Path(path).expanduser().absolute()
    if not folder.exists():
        raise InvalidAdapter(f"{path}: no such folder")
    if not folder.is_dir():
        raise InvalidAdapter(f"{path} is a file; pass the adapter folder (with {CONFIG} and {WEIGHTS})")
    if folder.name.startswith("models--") and (folder / "snapshots").is_dir():
        ref = folder / "refs" / "main"
        rev = ref.read_text().strip() if ref.is_file() else None
        snaps = sorted((folder / "snapshots").iterdir())
        chosen = folder / "snapshots" / rev if rev else (snaps[-1] if snaps else None)
        if chosen is None or not chosen.is_dir():
            raise InvalidAdapter(f"{path}: Hugging Face cache folder without a snapshot")
        return chosen, folder
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder, folder.parent.parent
    return folder, folder


def _check_links(folder: Path, allowed_root: Path) -> None:
    root = allowed_root.resolve()
    for entry in folder.rglob("*"):
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(root):
                raise InvalidAdapter(
                    f"{entry.relative_to(folder)} is a link to {target}, outside the adapter folder; refused"
                )


def _file_list(folder: Path) -> list[str]:
    names = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix in PICKLE_SUFFIXES:
            raise InvalidAdapter(
                f"{entry.name}: pickle-format weights are refused (loading a pickle can run arbitrary code); "
                f"save the adapter with safetensors (PEFT's default, safe_serialization=True)"
            )
        if entry.is_file() and entry.suffix in KEEP_SUFFIXES:
            names.append(entry.name)
    return names


def _check_config(cfg: dict, allow_unsupported: bool) -> dict:
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(f"{CONFIG}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise InvalidAdapter(f"{CONFIG}: rank r={r!r} must be an integer between 1 and {MAX_RANK}")
    alpha = cfg.get("lora_alpha", DEFAULT_ALPHA)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0 or alpha > 16 * MAX_RANK:
        raise InvalidAdapter(f"{CONFIG}: lora_alpha={alpha!r} must be a positive finite number up to {16 * MAX_RANK}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern_val = cfg.get(key) or {}
        if not isinstance(pattern_val, dict):
            raise InvalidAdapter(f"{CONFIG}: {key} must be an object of module pattern -> number, "
                                 f"got {type(pattern_val).__name__}")
        if len(pattern_val) > MAX_PATTERN_KEYS:
            raise InvalidAdapter(f"{CONFIG}: {key} has {len(pattern_val)} keys; at most {MAX_PATTERN_KEYS}")
        for k, v in pattern_val.items():
            check_pattern(k, field=f"{CONFIG}: {key}")
            if key == "rank_pattern":
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_RANK:
                    raise InvalidAdapter(f"{CONFIG}: rank_pattern[{k!r}]={v!r} must be an integer between 1 and {MAX_RANK}")
            elif (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                  or not 0 < v <= 16 * MAX_RANK):
                raise InvalidAdapter(f"{CONFIG}: alpha_pattern[{k!r}]={v!r} must be a positive finite number "
                                     f"up to {16 * MAX_RANK}")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        raise InvalidAdapter(f"{CONFIG}: target_modules must be a string or a list of module names, got {targets!r}")
    if "use_rslora" in cfg and not isinstance(cfg["use_rslora"], bool):
        raise InvalidAdapter(f"{CONFIG}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    init = cfg.get("init_lora_weights", True)
    features = {
        "dora": bool(cfg.get("use_dora")),
        "rslora": bool(cfg.get("use_rslora")),
        "bias": cfg.get("bias", "none") or "none",
        "modules_to_save": list(cfg.get("modules_to_save") or []),
        "init_lora_weights": init if isinstance(init, (bool, str)) else str(init),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
    }
    if allow_unsupported:
        return features
    if features["dora"]:
        raise InvalidAdapter(f"{CONFIG}: use_dora=true; DoRA adapters cannot be batched with others and are not supported")
    if features["bias"] != "none":
        raise InvalidAdapter(f"{CONFIG}: bias={features['bias']!r} trains base biases; only bias='none' adapters are supported")
    if cfg.get("lora_bias"):
        raise InvalidAdapter(f"{CONFIG}: lora_bias=true adds a bias to lora_B; only plain A/B adapters are supported")
    if features["modules_to_save"]:
        raise InvalidAdapter(
            f"{CONFIG}: modules_to_save={features['modules_to_save']} stores full copies of base layers; not supported"
        )
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "loftq", "corda", "eva"):
        raise InvalidAdapter(f"{CONFIG}: init_lora_weights={init!r} changes the base weights; not supported")
    return features


def _target_suffixes(cfg: dict, modules: list[str], base_layers: dict) -> list[str]:
    targets = cfg.get("target_modules")
    present = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if targets is None or targets == "all-linear" or isinstance(targets, str):
        return present
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in base_layers)]
    if missing:
        raise InvalidAdapter(f"{CONFIG}: target_modules {missing} match no module of the base model")
    return present


def validate_adapter(path: str | Path, base: dict, *, allow_noop: bool = False,
                     allow_unsupported: bool = False) -> ValidatedAdapter:
    """Check an adapter folder against ``base`` (a row from the bases table)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, allowed_root = resolve_adapter_path(str(path))
    _check_links(folder, allowed_root)
    files = _file_list(folder)
    if CONFIG not in files:
        raise InvalidAdapter(f"{folder}: missing {CONFIG} (is this a PEFT adapter folder?)")
    if WEIGHTS not in files:
        raise InvalidAdapter(f"{folder}: missing {WEIGHTS}")
    cfg = read_config(folder)
    features = _check_config(cfg, allow_unsupported)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(f"{WEIGHTS}: cannot be read as safetensors ({exc})") from None
    if not tensors:
        raise InvalidAdapter(f"{WEIGHTS}: holds no tensors")

    layers = base["layers"]
    r_default = cfg["r"]
    parts, other = group_tensors(tensors)
    if other and not allow_unsupported:
        raise InvalidAdapter(f"{WEIGHTS}: tensor {other[0]!r} is not a LoRA A/B weight (magnitude vectors, biases and saved modules are not supported)")
    modules = sorted(parts)
    for module in modules:
        if module not in layers:
            raise InvalidAdapter(
                f"{WEIGHTS}: LoRA weights for {module!r}, which base {base['name']!r} does not have "
                f"(was this adapter trained on another base?)"
            )
        got = parts[module]
        out_f, in_f = layers[module]
        if "lora_A" in got or "lora_B" in got:
            a, b = got.get("lora_A"), got.get("lora_B")
            if a is None or b is None:
                raise InvalidAdapter(f"{WEIGHTS}: {module} has only one of lora_A/lora_B")
            r = a.shape[0]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != r:
                raise InvalidAdapter(
                    f"{WEIGHTS}: {module} shapes A{list(a.shape)} B{list(b.shape)} do not fit the base layer "
                    f"[out={out_f}, in={in_f}] (was this adapter trained on another base?)"
                )
        else:
            a, b = got.get("lora_embedding_A"), got.get("lora_embedding_B")
            if a is None or b is None:
                raise InvalidAdapter(f"{WEIGHTS}: {module} has only one of lora_embedding_A/B")
            r = a.shape[0]
            if a.shape[1] != out_f or b.shape[0] != in_f or b.shape[1] != r:
                raise InvalidAdapter(f"{WEIGHTS}: {module} embedding LoRA shapes do not fit the base layer")
        expected_r = module_rank(cfg, module)
        if r != expected_r:
            raise InvalidAdapter(f"{WEIGHTS}: {module} has rank {r} but the config says r={expected_r}")
        if r > min(out_f, in_f):
            raise InvalidAdapter(f"{CONFIG}: rank {r} exceeds the layer size of {module} ({out_f}x{in_f})")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidAdapter(f"{WEIGHTS}: tensor {key!r} has NaN or infinite values")
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > MAX_WEIGHT:
            raise InvalidAdapter(f"{WEIGHTS}: tensor {key!r} has values up to {float(t.abs().max()):.3g}; LoRA "
                                 f"weights beyond {MAX_WEIGHT:g} only overflow the model's activations")
    targets = _target_suffixes(cfg, modules, layers)
    b_tensors = [p[k] for p in parts.values() for k in ("lora_B", "lora_embedding_B") if k in p]
    if not allow_noop and all(float(t.abs().max()) == 0.0 for t in b_tensors):
        raise InvalidAdapter(
            "adapter is a no-op: every lora_B is zero, so its output equals the base model's "
            "(untrained?); pass --allow-noop to register it anyway"
        )
    shas = {name: file_sha256(folder / name) for name in files}
    size = sum(os.path.getsize(folder / name) for name in files)
    return ValidatedAdapter(
        folder=folder,
        files=shas,
        size_bytes=size,
        config=cfg,
        rank=r_default,
        alpha=float(cfg.get("lora_alpha", DEFAULT_ALPHA)),
        target_modules=targets,
        modules=modules,
        param_count=sum(t.numel() for p in parts.values() for t in p.values()),
        features=features,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )
