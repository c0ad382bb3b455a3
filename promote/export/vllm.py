"""``--format vllm`` (merged folder) and ``--format vllm-lora`` (base + adapter for --enable-lora).

Both write model folders vLLM loads with the transformers it pins (<5.20):
transformers 5 saves ``tokenizer_class: TokenizersBackend``, which older
versions do not know, so the exported ``tokenizer_config.json`` names
``PreTrainedTokenizerFast`` and carries the chat template inline; ``config.json``
gets ``torch_dtype`` beside ``dtype``.

Static checks only (running vLLM takes a minute to start; the ``vllm`` tests do it):

* vllm: a compatibility report (architecture, config fields, dtype, tokenizer files,
  generation config, safetensors weights);
* vllm-lora: vLLM's LoRA rules (rank within an allowed ``--max-lora-rank``, target
  modules it supports, no DoRA / bias / modules_to_save / weight-changing inits).
  ``check_lora_folder`` works on any folder, registered or not
  (``loradex export --check-vllm PATH``), since the registry already refuses
  some of what vLLM refuses.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from loradex.hub.errors import CheckFailed
from loradex.promote.export.source import ExportOptions, ExportResult, ExportSource, link_or_copy

METHOD_MERGED = "loradex vllm: merged safetensors folder + tokenizer_config for transformers<5.20"
METHOD_LORA = "loradex vllm-lora: PEFT adapter folder + vLLM-loadable base folder"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")
ALLOWED_MODULES_TO_SAVE = ("classifier", "score")
WEIGHT_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "eva")
# Decoder architectures vLLM 0.32 implements (the ones loradex bases come in).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM",
                 "GPT2LMHeadModel", "OPTForCausalLM", "FalconForCausalLM", "StableLmForCausalLM")
REQUIRED_CONFIG = ("architectures", "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                   "intermediate_size", "max_position_embeddings")
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
MODEL_FILES = (".safetensors", ".json", ".jinja", ".txt", ".model")


# -- model folders ----------------------------------------------------------------------

def write_model_folder(src: Path, dest: Path) -> list[str]:
    """Copy a model folder for vLLM, rewriting tokenizer_config.json and config.json; returns files."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or not p.name.endswith(MODEL_FILES):
            continue
        if p.name in ("tokenizer_config.json", "config.json"):
            continue
        link_or_copy(p, dest / p.name)
        written.append(p.name)
    cfg = json.loads((src / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    cfg["dtype"] = cfg["torch_dtype"] = dtype
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    written.append("config.json")
    tok_cfg_path = src / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    tok_cfg["tokenizer_class"] = TOKENIZER_CLASS
    tok_cfg.pop("backend", None)
    tok_cfg.pop("is_local", None)
    tok_cfg.pop("local_files_only", None)
    max_pos = cfg.get("max_position_embeddings") or 2048
    max_len = tok_cfg.get("model_max_length")
    if not isinstance(max_len, int) or max_len > max_pos:
        tok_cfg["model_max_length"] = max_pos
    jinja = src / "chat_template.jinja"
    if jinja.is_file() and "chat_template" not in tok_cfg:
        tok_cfg["chat_template"] = jinja.read_text()
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True))
    written.append("tokenizer_config.json")
    return sorted(written)


def compat_report(folder: Path) -> dict:
    """Static vLLM compatibility of a model folder: each check with its finding."""
    checks: dict[str, dict] = {}
    reasons: list[str] = []

    def record(name: str, ok: bool, detail) -> None:
        checks[name] = {"ok": ok, "detail": detail}
        if not ok:
            reasons.append(f"{name}: {detail}")

    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    record("architecture", any(a in ARCHITECTURES for a in archs),
           f"{archs} ({'supported by vLLM' if any(a in ARCHITECTURES for a in archs) else 'not a vLLM architecture loradex knows'})")
    missing = [k for k in REQUIRED_CONFIG if cfg.get(k) in (None, [], "")]
    record("config_fields", not missing, f"missing {missing}" if missing else "all present")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    record("attention_heads", bool(heads and kv and heads % kv == 0), f"{heads} heads, {kv} kv heads")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    record("dtype", dtype in DTYPES, f"{dtype} (vLLM CPU runs float32 and bfloat16; float16 is cast)")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    record("weights", bool(weights) and not pickles, {"safetensors": weights, "pickle": pickles})
    tok_files = [n for n in ("tokenizer.json", "tokenizer.model") if (folder / n).is_file()]
    record("tokenizer_files", bool(tok_files), tok_files or "no tokenizer.json / tokenizer.model")
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    cls = tok_cfg.get("tokenizer_class")
    record("tokenizer_class", cls not in (None, "TokenizersBackend"),
           f"{cls} ({'loads in transformers<5.20' if cls not in (None, 'TokenizersBackend') else 'unknown to transformers<5.20'})")
    record("chat_template", bool(tok_cfg.get("chat_template")) or (folder / "chat_template.jinja").is_file(),
           "present" if tok_cfg.get("chat_template") or (folder / "chat_template.jinja").is_file() else "missing")
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    record("generation_config", gen is not None and gen.get("eos_token_id") is not None,
           {"eos_token_id": gen.get("eos_token_id")} if gen else "missing generation_config.json")
    return {"ok": not reasons, "reasons": reasons, "checks": checks, "max_model_len": cfg.get("max_position_embeddings")}


def export_merged(src: ExportSource, out: Path, opts: ExportOptions) -> ExportResult:
    folder = out / "model"
    write_model_folder(src.merged_dir, folder)
    report = compat_report(folder)
    if not report["ok"]:
        raise CheckFailed("the merged model is not vLLM-compatible: " + "; ".join(report["reasons"]))
    cmd = serve_command(folder, max_model_len=min(report["max_model_len"] or 2048, 2048))
    (out / "vllm_compat.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return ExportResult(method=METHOD_MERGED, check={"static": report}, primary="model", command=cmd)


# -- LoRA rules ---------------------------------------------------------------------------

def check_lora_folder(folder: str | Path) -> dict:
    """vLLM's LoRA rules applied to an adapter folder (registered or not); ``ok`` and reasons."""
    folder = Path(folder)
    reasons: list[str] = []
    warnings: list[str] = []
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        return {"ok": False, "reasons": [f"{folder}: no adapter_config.json"], "warnings": [], "folder": str(folder)}
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        return {"ok": False, "reasons": [f"adapter_config.json is not JSON ({exc})"], "warnings": [], "folder": str(folder)}
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        reasons.append(f"peft_type {cfg.get('peft_type')!r}: vLLM serves LoRA adapters only")
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    ranks = [r for r in ranks if isinstance(r, int)]
    top = max(ranks) if ranks else None
    max_lora_rank = next((m for m in MAX_LORA_RANKS if top is not None and m >= top), None)
    if top is None:
        reasons.append("rank r missing from adapter_config.json")
    elif max_lora_rank is None:
        reasons.append(f"rank {top} exceeds vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]}); "
                       f"allowed values: {', '.join(map(str, MAX_LORA_RANKS))}")
    if cfg.get("use_dora"):
        reasons.append("use_dora=true: vLLM does not serve DoRA adapters")
    if (cfg.get("bias") or "none") != "none":
        reasons.append(f"bias={cfg.get('bias')!r}: vLLM only serves bias='none' adapters")
    mts = [m for m in (cfg.get("modules_to_save") or []) if m not in ALLOWED_MODULES_TO_SAVE]
    if mts:
        reasons.append(f"modules_to_save={mts}: vLLM cannot load full copies of base layers "
                       f"(only {', '.join(ALLOWED_MODULES_TO_SAVE)})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().split("_")[0] in WEIGHT_CHANGING_INITS:
        reasons.append(f"init_lora_weights={init!r} changes the base weights; vLLM serves the original base")
    if cfg.get("layer_replication"):
        reasons.append("layer_replication is not supported by vLLM")

    modules = tensor_modules(folder, reasons)
    targets = cfg.get("target_modules")
    names = sorted(set(modules) | (set(targets) if isinstance(targets, list) else set()))
    bad = [m for m in names if m not in LORA_TARGETS]
    if bad:
        reasons.append(f"target modules {bad} are not LoRA targets vLLM supports for these decoders "
                       f"({', '.join(LORA_TARGETS)})")
    if cfg.get("use_rslora"):
        warnings.append("use_rslora=true: vLLM applies alpha/sqrt(r) (supported)")
    return {"ok": not reasons, "reasons": reasons, "warnings": warnings, "rank": top,
            "max_lora_rank": max_lora_rank, "target_modules": names, "folder": str(folder)}


def tensor_modules(folder: Path, reasons: list[str]) -> list[str]:
    """Module suffixes carrying LoRA tensors; extra tensors (magnitudes, saved modules) go to ``reasons``."""
    import re

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            reasons.append("adapter_model.bin: pickle weights; export safetensors (vLLM and loradex refuse pickles)")
        else:
            reasons.append("no adapter_model.safetensors")
        return []
    from safetensors import safe_open

    key_re = re.compile(r"^(?:base_model\.model\.)?(?P<m>.+?)\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
    found, extra = set(), []
    with safe_open(str(weights), framework="pt") as st:
        for key in st.keys():
            m = key_re.match(key)
            if m:
                found.add(m.group("m").rsplit(".", 1)[-1])
            elif any(f"{name}.modules_to_save." in key for name in ALLOWED_MODULES_TO_SAVE):
                continue
            else:
                extra.append(key)
    if extra:
        reasons.append(f"tensors vLLM cannot load as LoRA weights: {extra[:3]}" + (" ..." if len(extra) > 3 else ""))
    return sorted(found)


def serve_command(model: Path, *, lora: tuple[str, Path] | None = None, max_lora_rank: int | None = None,
                  max_model_len: int = 2048) -> str:
    """The exact ``vllm serve`` command line for an exported folder."""
    parts = ["vllm", "serve", str(model), "--max-model-len", str(max_model_len)]
    if lora is not None:
        parts += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--lora-modules", f"{lora[0]}={lora[1]}"]
    return shlex.join(parts)


def export_lora(src: ExportSource, out: Path, opts: ExportOptions) -> ExportResult:
    adapter = out / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        link_or_copy(src.adapter_dir / name, adapter / name)
    rules = check_lora_folder(adapter)
    if not rules["ok"]:
        raise CheckFailed(f"{src.label} breaks vLLM's LoRA rules: " + "; ".join(rules["reasons"]))
    base = out / "base"
    write_model_folder(src.base_dir, base)
    report = compat_report(base)
    if not report["ok"]:
        raise CheckFailed(f"base {src.base['name']} is not vLLM-compatible: " + "; ".join(report["reasons"]))
    lora_name = src.version["adapter"]
    cmd = serve_command(base, lora=(lora_name, adapter), max_lora_rank=rules["max_lora_rank"],
                        max_model_len=min(report["max_model_len"] or 2048, 2048))
    (out / "vllm_compat.json").write_text(json.dumps({"lora": rules, "base": report, "command": cmd},
                                                     indent=2, sort_keys=True))
    (out / "serve.sh").write_text("#!/bin/sh\n# CPU builds of vLLM: `python -m vllm.entrypoints.openai.api_server` "
                                  "takes the same arguments as `vllm serve` after the model.\nexec " + cmd + "\n")
    return ExportResult(method=METHOD_LORA, check={"static": {"lora_rules": rules, "base": report}},
                        primary="adapter", command=cmd,
                        notes=[f"requests select the adapter with the OpenAI `model` field: {lora_name!r}"])
