"""Promote an adapter version to a merged model: ``loradex merge NAME[@V|@ALIAS] [--dtype ...]``.

    plan   (catalog)  resolve the version, its base, what it was trained against, probe prompts
    run    (no catalog held) load the weights the adapter was trained against:
             LoRA  (quantization none)  -> the full-precision base
             QLoRA (quantization nf4)   -> a fresh NF4 load, dequantized before any forward
           base + adapter (unmerged)  -> reference greedy tokens on the probes
           merge_and_unload, cast, save safetensors + tokenizer + chat template + generation config
           reload the saved folder   -> greedy tokens again; compare (the automatic check)
    record (catalog)  store the folder (sha256 per file), register it as a base of kind
           ``merged`` and write a ``merges`` row with lineage and the check's numbers

Never merges into packed 4-bit weights: bitsandbytes repacks them on CPU after the
first forward and re-quantization swallows the LoRA update.

Check tolerance: fp32 must reproduce every reference token exactly. bf16/fp16
merges round the weights, so free-running greedy may drift after a near-tie; they
pass when teacher-forced top-1 agreement along the reference continuation is at
least ``min_agreement`` (default 0.90). A failed check raises ``CheckFailed``
with the numbers and registers nothing.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loradex.hub import quiet
from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.chat import encode_chat, has_chat_template
from loradex.hub.errors import CheckFailed, Conflict, InvalidConfig
from loradex.hub.ops import op
from loradex.hub.store import Store

DTYPES = ("fp32", "bf16", "fp16")
MERGED_INTO = {"none": "full-precision", "nf4": "dequantized-nf4", "int8": "dequantized-int8"}
FIXED_PROBES = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three prime numbers.",
    "Explain what a LoRA adapter is in one sentence.",
)
LINEAGE_FILE = "loradex_merge.json"


@dataclass
class MergeConfig:
    """How to merge and how strictly to check the result."""

    dtype: str = "fp32"
    """--dtype: dtype of the saved merged weights (fp32, bf16, fp16)."""
    name: str | None = None
    """--name: the merged model's base name (default ``<adapter>-v<N>-merged[-<dtype>]``)."""
    probes: int = 4
    """--probes: how many probe prompts the check generates from."""
    max_new_tokens: int = 16
    """--check-tokens: greedy tokens generated per probe for the check."""
    min_agreement: float = 0.90
    """--min-agreement: teacher-forced top-1 agreement required for bf16/fp16 (fp32 must be exact)."""
    device: str = "auto"
    """--device: where to load weights for merging and checking."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidConfig(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.probes <= 64:
            raise InvalidConfig(f"--probes must be between 1 and 64, got {self.probes}")
        if not 1 <= self.max_new_tokens <= 512:
            raise InvalidConfig(f"--check-tokens must be between 1 and 512, got {self.max_new_tokens}")
        if not 0.0 < self.min_agreement <= 1.0:
            raise InvalidConfig(f"--min-agreement must be in (0, 1], got {self.min_agreement}")


@dataclass
class MergePlan:
    """Everything ``run_merge`` needs, read from the catalog up front."""

    version: dict
    adapter_dir: Path
    base: dict
    quantization: str
    merged_into: str
    name: str
    probes: list[str]
    probe_source: str
    config: MergeConfig
    existing: dict | None = None


@dataclass
class MergeResult:
    folder: Path            # the saved merged model (inside a store temp dir)
    tmp: Path               # the temp dir to remove after recording
    check: dict = field(default_factory=dict)


# -- plan ---------------------------------------------------------------------------------

def default_name(version: dict, dtype: str) -> str:
    return f"{version['adapter']}-v{version['version']}-merged" + ("" if dtype == "fp32" else f"-{dtype}")


@op("merges.probes")
def probe_prompts(catalog: Catalog, version_id: int, n: int) -> tuple[list[str], str]:
    """The adapter's eval prompts when it has eval samples, else fixed probes."""
    rows = catalog.query(
        "SELECT s.prompt FROM eval_samples s JOIN eval_runs r ON s.run_id = r.id "
        "WHERE r.adapter_version_id = ? AND s.prompt IS NOT NULL AND length(s.prompt) > 0 "
        "ORDER BY r.id DESC, s.idx LIMIT ?", [version_id, n])
    if rows:
        return [r["prompt"] for r in rows], "eval_samples"
    return list(FIXED_PROBES[:n]), "fixed"


@op("merges.find")
def find_merge(catalog: Catalog, version_id: int, dtype: str | None = None) -> dict | None:
    """The newest merge of a version (of ``dtype`` if given) whose base is still registered."""
    sql = ("SELECT m.* FROM merges m JOIN bases b ON b.name = m.base_name WHERE m.adapter_version_id = ?"
           + (" AND m.dtype = ?" if dtype else "") + " ORDER BY m.id DESC LIMIT 1")
    return catalog.one(sql, [version_id, dtype] if dtype else [version_id])


@op("merges.plan")
def plan_merge(catalog: Catalog, store: Store, ref: str | dict, config: MergeConfig) -> MergePlan:
    from loradex.hub.bases import get_base
    from loradex.hub.names import check_name
    from loradex.hub.registry import adapter_folder
    from loradex.promote.families import check_architecture

    version, adapter_dir = adapter_folder(catalog, store, ref)
    base = get_base(catalog, version["base"], store=store)
    check_architecture(base.get("architecture"), "loradex merge", base.get("model_type"))
    quant = (version.get("quantization") or "none").lower()
    if quant not in MERGED_INTO:
        raise InvalidConfig(f"{version['adapter']}@{version['version']} was trained against quantization {quant!r}; "
                            f"merge supports {', '.join(MERGED_INTO)}")
    name = check_name(config.name or default_name(version, config.dtype), "merged model name")
    existing = None
    taken = catalog.one("SELECT name, merged_from_version_id FROM bases WHERE name = ?", [name])
    if taken is not None:
        existing = catalog.one("SELECT * FROM merges WHERE base_name = ? AND adapter_version_id = ? AND dtype = ?",
                               [name, version["id"], config.dtype])
        if existing is None:
            raise Conflict(f"a base named {name!r} already exists and is not this merge; pass --name")
    probes, source = probe_prompts(catalog, version["id"], config.probes)
    return MergePlan(version=version, adapter_dir=adapter_dir, base=base, quantization=quant,
                     merged_into=MERGED_INTO[quant], name=name, probes=probes, probe_source=source,
                     config=config, existing=existing)


# -- run ------------------------------------------------------------------------------------

def load_trained_against(base_path: str, quantization: str, device: str):
    """The weights the adapter was trained against, as plain float32 modules (never packed 4-bit)."""
    from loradex.hub.loading import load_model_folder

    model, dev, _ = load_model_folder(base_path, quantize=quantization, device=device, dtype="fp32")
    if quantization != "none":
        # fresh load, no forward yet: bitsandbytes has not repacked, dequantize() gives the
        # exact values the 4-bit kernels computed with during training
        model = model.dequantize()
        model.to(dev)
    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise CheckFailed(f"dequantized base still has packed weights: {bad[:3]}")
    return model, dev


def merge_weights(peft_model):
    """Fold every LoRA delta into its base weight; returns the plain model."""
    return peft_model.merge_and_unload()


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each probe as one user turn through the chat template (raw text for a base without one)."""
    if not has_chat_template(tokenizer):
        return [tokenizer(text)["input_ids"] for text in prompts]
    return [encode_chat(tokenizer, [{"role": "user", "content": text}]) for text in prompts]


def greedy(model, prompts: list[list[int]], max_new_tokens: int, eos: list[int]) -> list[list[int]]:
    """Greedy continuation of each prompt, cut after the first EOS."""
    import torch

    outs = []
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=eos[0] if eos else None)
        new = y[0, len(ids):].tolist()
        outs.append(cut_at_eos(new, eos))
    return outs


def cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def teacher_forced_agreement(model, prompts: list[list[int]], continuations: list[list[int]]) -> tuple[int, int]:
    """(matching, total): positions where the model's top-1 equals the given continuation token."""
    import torch

    match = total = 0
    for ids, cont in zip(prompts, continuations):
        if not cont:
            continue
        x = torch.tensor([ids + cont], device=model.device)
        with torch.no_grad():
            logits = model(x).logits[0]
        pred = logits[len(ids) - 1: len(ids) - 1 + len(cont)].argmax(-1).tolist()
        match += sum(int(p == c) for p, c in zip(pred, cont))
        total += len(cont)
    return match, total


def compare(reference: list[list[int]], merged: list[list[int]], dtype: str, tf: tuple[int, int] | None,
            min_agreement: float) -> dict:
    """The check's numbers and verdict."""
    total = sum(len(r) for r in reference)
    same_prefix = 0
    per_probe = []
    for ref, got in zip(reference, merged):
        k = 0
        while k < min(len(ref), len(got)) and ref[k] == got[k]:
            k += 1
        same_prefix += k
        per_probe.append({"equal": ref == got, "first_diff": None if ref == got else k,
                          "reference_tokens": len(ref)})
    exact = sum(p["equal"] for p in per_probe)
    result: dict[str, Any] = {
        "dtype": dtype, "probes": len(reference), "exact_probes": exact, "tokens": total,
        "tokens_before_first_diff": same_prefix, "per_probe": per_probe,
    }
    if dtype == "fp32":
        result["rule"] = "fp32: every probe's greedy tokens equal the unmerged adapter's"
        result["ok"] = exact == len(reference)
    else:
        m, n = tf or (0, 0)
        result["teacher_forced"] = {"match": m, "of": n, "rate": (m / n) if n else 1.0}
        result["rule"] = f"{dtype}: teacher-forced top-1 agreement >= {min_agreement:.2f}"
        result["ok"] = (m / n if n else 1.0) >= min_agreement
    return result


def run_merge(plan: MergePlan, store: Store, settings=None) -> MergeResult:
    """Merge, save into a store temp dir and check; raises CheckFailed (nothing kept) on disagreement."""
    import torch

    quiet.install()
    from peft import PeftModel

    from loradex.hub.loading import load_model_folder, load_tokenizer, pick_dtype
    from loradex.hub.settings import Settings, apply_threads

    settings = settings or Settings()
    apply_threads(settings.threads)
    cfg = plan.config
    base_cfg = plan.base["config"]
    targets = set(plan.version["target_modules"])
    if base_cfg.get("tie_word_embeddings") and targets & {"lm_head", "embed_tokens"}:
        raise InvalidConfig("this adapter changes lm_head/embed_tokens of a base with tied embeddings; "
                            "merging would change both; not supported")
    tokenizer = load_tokenizer(plan.base["path"], base_cfg.get("max_position_embeddings"))
    eos = eos_ids(tokenizer, plan.base["path"])
    prompts = encode_prompts(tokenizer, plan.probes)

    model, device = load_trained_against(plan.base["path"], plan.quantization, cfg.device)
    peft_model = PeftModel.from_pretrained(model, str(plan.adapter_dir), is_trainable=False)
    peft_model.eval()
    reference = greedy(peft_model, prompts, cfg.max_new_tokens, eos)
    merged = merge_weights(peft_model)
    torch_dtype = pick_dtype("cpu", cfg.dtype)
    merged = merged.to(torch_dtype)
    merged.config.dtype = torch_dtype
    if merged.generation_config is not None:
        merged.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
        merged.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp = store.new_tmp()
    try:
        out = tmp / "model"
        merged.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        lineage = {
            "adapter": plan.version["adapter"], "version": plan.version["version"],
            "adapter_version_id": plan.version["id"], "adapter_digest": plan.version["digest"],
            "base": plan.base["name"], "base_files": plan.base["files"], "merged_into": plan.merged_into,
            "quantization": plan.quantization, "config": asdict(cfg), "probe_source": plan.probe_source,
        }
        (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True))
        del merged, peft_model, model

        reloaded, _, _ = load_model_folder(out, device=cfg.device, dtype=cfg.dtype)
        got = greedy(reloaded, prompts, cfg.max_new_tokens, eos)
        tf = teacher_forced_agreement(reloaded, prompts, reference) if cfg.dtype != "fp32" else None
        del reloaded
        check = compare(reference, got, cfg.dtype, tf, cfg.min_agreement)
        check.update({"merged_into": plan.merged_into, "probe_source": plan.probe_source,
                      "max_new_tokens": cfg.max_new_tokens, "device": device})
        if plan.quantization != "none":
            check["vs_4bit_serving"] = agreement_with_quantized(plan, prompts, got, cfg, eos)
        if not check["ok"]:
            raise CheckFailed(failure_message(plan, check))
        return MergeResult(folder=out, tmp=tmp, check=check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def agreement_with_quantized(plan: MergePlan, prompts, merged_tokens, cfg: MergeConfig, eos) -> dict:
    """Informational: merged greedy tokens vs the adapter on its packed quantized base (how it serves)."""
    from peft import PeftModel

    from loradex.hub.loading import load_model_folder

    model, _, _ = load_model_folder(plan.base["path"], quantize=plan.quantization, device=cfg.device, dtype="fp32")
    peft_model = PeftModel.from_pretrained(model, str(plan.adapter_dir), is_trainable=False)
    served = greedy(peft_model, prompts, cfg.max_new_tokens, eos)
    equal = sum(int(a == b) for a, b in zip(served, merged_tokens))
    return {"exact_probes": equal, "of": len(prompts),
            "note": "bitsandbytes CPU kernels differ slightly from the dequantized path; informational"}


def eos_ids(tokenizer, base_path: str) -> list[int]:
    ids = []
    gen = Path(base_path) / "generation_config.json"
    if gen.is_file():
        val = json.loads(gen.read_text()).get("eos_token_id")
        ids += val if isinstance(val, list) else ([val] if val is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def failure_message(plan: MergePlan, check: dict) -> str:
    head = f"merge check failed for {plan.version['adapter']}@{plan.version['version']} ({check['rule']}): "
    if "teacher_forced" in check:
        tf = check["teacher_forced"]
        nums = f"teacher-forced top-1 {tf['match']}/{tf['of']} ({tf['rate']:.3f})"
    else:
        nums = (f"{check['exact_probes']}/{check['probes']} probes identical, "
                f"{check['tokens_before_first_diff']}/{check['tokens']} tokens before the first difference")
    diffs = ", ".join(f"probe {i}: first diff at token {p['first_diff']}"
                      for i, p in enumerate(check["per_probe"]) if not p["equal"])
    return head + nums + (f" ({diffs})" if diffs else "") + "; nothing was registered"


# -- record ---------------------------------------------------------------------------------

@op("merges.record", write=True)
def record_merge(catalog: Catalog, store: Store, plan: MergePlan, result: MergeResult) -> dict:
    """Store the merged folder, register it as a base and write the merges row; returns the row."""
    from loradex.hub.bases import add_base

    # both come from the merge step (a store temp dir); over the ops API they are a client's words
    tmp = store.owned_tmp(result.tmp, "the merge's temp folder")
    if not Path(os.path.realpath(result.folder)).is_relative_to(tmp):
        raise InvalidConfig(f"the merged folder must be inside its temp folder {tmp}, got {str(result.folder)!r}")
    try:
        files = sorted(str(p.relative_to(result.folder)) for p in result.folder.rglob("*") if p.is_file())
        snap = store.put_folder(result.folder, files, move=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    folder = store.resolve(snap.relpath)
    add_base(catalog, store, plan.name, str(folder), kind="merged", merged_from_version_id=plan.version["id"])
    try:
        with catalog.transaction() as cur:
            cur.execute(
                "INSERT INTO merges (adapter_version_id, base, merged_into, dtype, path, files, size_bytes, "
                "check_result, base_name, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [plan.version["id"], plan.base["name"], plan.merged_into, plan.config.dtype, snap.relpath,
                 to_json(snap.files), snap.size_bytes, to_json(result.check), plan.name, utcnow()],
            )
    except BaseException:
        with catalog.transaction() as cur:
            cur.execute("DELETE FROM bases WHERE name = ?", [plan.name])
        raise
    return catalog.one("SELECT * FROM merges WHERE base_name = ? ORDER BY id DESC LIMIT 1", [plan.name])


def merge_adapter(catalog: Catalog, store: Store, ref: str | dict, config: MergeConfig | None = None,
                  settings=None) -> dict:
    """Plan, run and record a merge in one call (the catalog stays open); returns the merges row.

    An identical earlier merge (same version, dtype and name) is returned as it is.
    """
    config = config or MergeConfig()
    plan = plan_merge(catalog, store, ref, config)
    if plan.existing is not None:
        return plan.existing
    result = run_merge(plan, store, settings)
    return record_merge(catalog, store, plan, result)


@op("merges.folder")
def merged_folder(catalog: Catalog, store: Store, merge_row: dict) -> Path:
    """The merged model's folder, sha256-checked."""
    return store.verified_path(merge_row["path"], merge_row["files"], f"merged model {merge_row['base_name']}")
