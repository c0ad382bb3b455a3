"""PEFT LoRA adapter -> GGUF LoRA that llama.cpp applies over the base model's GGUF.

Layout llama.cpp expects (``general.type = adapter``, ``adapter.type = lora``)::

    blk.N.attn_q.weight.lora_a   torch shape [r, in]   (GGUF ne = [in, r])
    blk.N.attn_q.weight.lora_b   torch shape [out, r]  (GGUF ne = [r, out])
    adapter.lora.alpha           llama.cpp scales each pair by alpha / r

Three details that silently break outputs if missed:

* q/k rows are permuted in a llama-arch base GGUF (see ``gguf_writer``), so ``lora_B`` of
  q_proj/k_proj gets the same permutation there (its rows add to those rows); other
  families keep transformers' row order (``gguf_arch.py``);
* rsLoRA scales by alpha / sqrt(r), llama.cpp by alpha / r: write alpha * sqrt(r);
* one alpha serves the whole file, so a module whose own scale differs
  (``rank_pattern`` / ``alpha_pattern``) has the ratio folded into its ``lora_B``.

A local ``base_model_name_or_path`` is never turned into a hub URL in metadata.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from loradex.hub.errors import InvalidConfig
from loradex.hub.peft_format import (DEFAULT_ALPHA, LINEAR_PARTS, WEIGHTS, group_tensors, module_scale, read_config,
                              unbatchable)
from loradex.promote.export.gguf_arch import family_of, hparams
from loradex.promote.export.gguf_writer import permute_qk

METHOD = "loradex gguf_lora (gguf package; lora_B of q/k permuted, per-module scale folded into lora_B)"
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DTYPES = ("f32", "f16")


def gguf_alpha(cfg: dict) -> float:
    """The single ``adapter.lora.alpha`` written to the file (rsLoRA: alpha * sqrt(r))."""
    r, alpha = cfg["r"], float(cfg.get("lora_alpha", DEFAULT_ALPHA))
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def base_model_metadata(cfg: dict, base_name: str | None) -> dict:
    """What may be said about the base: a hub URL only for a real org/name id, never for a path."""
    src = cfg.get("base_model_name_or_path") or ""
    meta = {"name": base_name or Path(src).name or None}
    if src and HF_ID.match(src) and not Path(src).exists() and not src.startswith((".", "/", "~")):
        meta["repo_url"] = f"https://huggingface.co/{src}"
    return meta


def write_lora_gguf(adapter_folder: str | Path, base_config: dict, out_path: str | Path, *,
                    dtype: str = "f32", base_name: str | None = None, name: str | None = None) -> dict:
    """Write the adapter in ``adapter_folder`` (for a base with ``base_config``) as a GGUF LoRA."""
    import gguf
    import torch
    from safetensors.torch import load_file

    if dtype not in DTYPES:
        raise InvalidConfig(f"--quant for --format gguf-lora must be one of {', '.join(DTYPES)}, got {dtype!r}")
    adapter_folder, out_path = Path(adapter_folder), Path(out_path)
    cfg = read_config(adapter_folder)
    if unbatchable(cfg):
        raise InvalidConfig(f"--format gguf-lora: {', '.join(unbatchable(cfg))}: no GGUF LoRA form")
    fam = family_of(base_config)
    hp = hparams(base_config)
    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    name_map = gguf.get_tensor_name_map(arch, hp["n_layer"])
    grouped, other = group_tensors(load_file(str(adapter_folder / WEIGHTS)))
    other += [f"{module}.{part}" for module, got in grouped.items() for part in got if part not in LINEAR_PARTS]
    if other:
        raise InvalidConfig(
            f"--format gguf-lora: tensor {other[0]!r} is not a Linear LoRA A/B weight "
            f"(embedding and lm_head LoRA have no GGUF LoRA form here)"
        )
    pairs = {module: {part: t.to(torch.float32).numpy() for part, t in got.items()} for module, got in grouped.items()}

    alpha_out = gguf_alpha(cfg)
    ftype = gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.F16
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha_out)
    writer.add_name(name or adapter_folder.name)
    meta = base_model_metadata(cfg, base_name)
    writer.add_base_model_count(1)
    if meta.get("name"):
        writer.add_base_model_name(0, meta["name"])
    if meta.get("repo_url"):
        writer.add_base_model_repo_url(0, meta["repo_url"])

    written = {}
    folded = []
    for module in sorted(pairs):
        part = pairs[module]
        if set(part) != {"lora_A", "lora_B"}:
            raise InvalidConfig(f"--format gguf-lora: {module} lacks lora_A or lora_B")
        target = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or module.endswith(("lm_head", "embed_tokens")):
            raise InvalidConfig(f"--format gguf-lora: no GGUF LoRA target for module {module!r}")
        a, b = part["lora_A"], part["lora_B"]
        r, _, scale = module_scale(cfg, module)
        # llama.cpp applies alpha_out / r; fold any difference into lora_B
        ratio = scale / (alpha_out / a.shape[0])
        if not math.isclose(ratio, 1.0, rel_tol=1e-6):
            b = b * ratio
            folded.append(module)
        if fam.permute_qk and module.endswith("self_attn.q_proj"):
            b = permute_qk(b, hp["n_head"])
        elif fam.permute_qk and module.endswith("self_attn.k_proj"):
            b = permute_qk(b, hp["n_head_kv"])
        np_dtype = np.float32 if dtype == "f32" else np.float16
        writer.add_tensor(target + ".lora_a", a.astype(np_dtype), raw_dtype=ftype)
        writer.add_tensor(target + ".lora_b", b.astype(np_dtype), raw_dtype=ftype)
        written[target] = {"module": module, "r": int(a.shape[0]), "a": list(a.shape), "b": list(b.shape)}

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"method": METHOD, "dtype": dtype, "alpha": alpha_out, "rslora": bool(cfg.get("use_rslora")),
            "architecture": gguf.MODEL_ARCH_NAMES[arch], "pairs": len(written), "folded_scale": folded, "base_model": meta,
            "size_bytes": out_path.stat().st_size}
