"""``loradex merge`` and ``loradex export``: the CLI edge of promote/merge.py and promote/export/.

    loradex merge NAME[@V|@ALIAS] [--dtype bf16|fp16|fp32] [--name MERGED]
    loradex export NAME[@V] --format vllm|vllm-lora|gguf|gguf-lora|ollama --out DIR [--quant f16|q8_0]
    loradex export --check-vllm PATH        # vLLM's LoRA rules on any adapter folder

The catalog is held only while reading and recording; the minutes of merging and
writing run with it closed, so other commands are not blocked.
"""
from __future__ import annotations

from loradex.hub.errors import CheckFailed, InvalidConfig
from loradex.hub.render import human_bytes


def _quiet_progress() -> None:
    """transformers' per-load progress bars would bury the one-line results on a terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cmd_merge(ctx) -> int:
    from loradex.promote.merge import MergeConfig, plan_merge, record_merge, run_merge

    _quiet_progress()
    a = ctx.args
    config = MergeConfig(dtype=a.dtype, name=a.name, probes=a.probes, max_new_tokens=a.check_tokens,
                         min_agreement=a.min_agreement, device=a.device)
    plan = plan_merge(ctx.catalog, ctx.store, a.ref, config)
    if plan.existing is not None:
        row = plan.existing
    else:
        ctx.close_catalog()
        result = run_merge(plan, ctx.store, ctx.settings)
        row = record_merge(ctx.catalog, ctx.store, plan, result)
    ctx.emit({"merge": row, "existing": plan.existing is not None}, lambda: _merge_text(plan, row))
    return 0


def _merge_text(plan, row: dict) -> str:
    c = row["check_result"]
    if "teacher_forced" in c:
        tf = c["teacher_forced"]
        agree = f"teacher-forced top-1 {tf['match']}/{tf['of']} ({tf['rate']:.3f}), {c['exact_probes']}/{c['probes']} probes identical"
    else:
        agree = f"{c['exact_probes']}/{c['probes']} probes identical ({c['tokens']} tokens)"
    return (f"merged {plan.version['adapter']}@{plan.version['version']} into the {row['merged_into']} base "
            f"{row['base']} ({row['dtype']}) -> base {row['base_name']}\n"
            f"  check: {agree}; probes from {c['probe_source']}\n"
            f"  stored {human_bytes(row['size_bytes'])} at {row['path']} (merge id {row['id']})")


def cmd_export(ctx) -> int:
    a = ctx.args
    if a.check_vllm:
        return _check_vllm(ctx)
    if not a.ref or not a.format or not a.out:
        raise InvalidConfig("export needs NAME[@V] --format FORMAT --out DIR (or --check-vllm PATH)")
    _quiet_progress()
    from loradex.promote.export.run import (attach_merge, merge_config, plan_export, record_export, write_export)
    from loradex.promote.export.source import ExportOptions
    from loradex.promote.merge import plan_merge, record_merge, run_merge

    options = ExportOptions(format=a.format, quant=a.quant, dtype=a.dtype, pre=a.gguf_pre, as_adapter=a.as_adapter,
                            run_check=not a.no_run_check, check_tokens=a.check_tokens,
                            min_agreement=a.min_agreement, force=a.force)
    from pathlib import Path

    plan = plan_export(ctx.catalog, ctx.store, a.ref, str(Path(a.out).expanduser().absolute()), options)
    if plan.missing_merge:
        mplan = plan_merge(ctx.catalog, ctx.store, plan.source.version, merge_config(options))
        if mplan.existing is None:
            ctx.close_catalog()
            mres = run_merge(mplan, ctx.store, ctx.settings)
            merge_row = record_merge(ctx.catalog, ctx.store, mplan, mres)
        else:
            merge_row = mplan.existing
        attach_merge(plan, ctx.catalog, ctx.store, merge_row)
    ctx.close_catalog()
    result = write_export(plan)
    row = record_export(ctx.catalog, plan, result)
    ctx.emit({"export": row, "command": result.command}, lambda: _export_text(plan, row, result))
    return 0


def _export_text(plan, row: dict, result) -> str:
    src = plan.source
    lines = [f"exported {src.label} as {row['format']} to {row['path']} ({len(row['files'])} files, "
             f"{human_bytes(row['size_bytes'])}; export id {row['id']})",
             f"  method: {row['method']}"]
    if src.merge:
        lines.append(f"  from merge {src.merge['id']} ({src.merge['dtype']}, base {src.merge['base_name']})")
    rt = result.check.get("runtime")
    if isinstance(rt, dict):
        if "skipped" in rt:
            lines.append(f"  runtime check: skipped ({rt['skipped']})")
        elif "teacher_forced" in rt:
            tf = rt["teacher_forced"]
            lines.append(f"  llama.cpp check: teacher-forced top-1 {tf['match']}/{tf['of']} ({tf['rate']:.3f})")
        else:
            lines.append(f"  llama.cpp check: {rt['exact_probes']}/{rt['probes']} probes token-identical "
                         f"({rt['equal_tokens']}/{rt['tokens']} tokens)")
    for note in result.notes:
        lines.append(f"  note: {note}")
    if result.command:
        lines.append(f"  run: {result.command}")
    return "\n".join(lines)


def _check_vllm(ctx) -> int:
    from loradex.promote.export.vllm import check_lora_folder

    report = check_lora_folder(ctx.args.check_vllm)

    def human() -> str:
        if report["ok"]:
            return (f"{report['folder']}: vLLM-compatible (rank {report['rank']}, --max-lora-rank "
                    f"{report['max_lora_rank']}, targets {', '.join(report['target_modules'])})")
        return f"{report['folder']}: NOT vLLM-compatible:\n" + "\n".join(f"  - {r}" for r in report["reasons"])

    if ctx.as_json or report["ok"]:
        ctx.emit(report, human)
    if not report["ok"]:
        raise CheckFailed(f"{report['folder']} breaks vLLM's LoRA rules: " + "; ".join(report["reasons"]))
    return 0


def add_commands(sub, common) -> None:
    p = sub.add_parser("merge", parents=[common], help="merge an adapter version into its base (checked, registered as a base)")
    p.add_argument("ref", help="NAME, NAME@VERSION or NAME@ALIAS")
    p.add_argument("--dtype", default="fp32", help="merged weights dtype: fp32 (default), bf16, fp16")
    p.add_argument("--name", help="name of the merged model among bases (default NAME-vN-merged[-DTYPE])")
    p.add_argument("--probes", type=int, default=4, help="probe prompts for the agreement check (default 4)")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens per probe in the check (default 16)")
    p.add_argument("--min-agreement", type=float, default=0.90,
                   help="bf16/fp16: teacher-forced top-1 agreement required (default 0.90; fp32 must be exact)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", parents=[common], help="export an adapter for vLLM, llama.cpp or Ollama (checked, registered)")
    p.add_argument("ref", nargs="?", help="NAME, NAME@VERSION or NAME@ALIAS")
    p.add_argument("--format", choices=("vllm", "vllm-lora", "gguf", "gguf-lora", "ollama"),
                   help="vllm: merged HF folder; vllm-lora: base folder + PEFT adapter; gguf: merged GGUF for "
                        "llama.cpp; gguf-lora: GGUF LoRA over the base's GGUF; ollama: Modelfile + GGUF")
    p.add_argument("--out", help="output folder (must be empty unless --force)")
    p.add_argument("--quant", help="GGUF type: gguf/ollama f16 (default), q8_0, f32; gguf-lora f32 (default), f16")
    p.add_argument("--dtype", help="export the merge of this dtype (fp32, bf16, fp16); merges in fp32 if none exists")
    p.add_argument("--gguf-pre", help="llama.cpp pre-tokenizer name when loradex cannot tell (e.g. smollm, llama-bpe)")
    p.add_argument("--as-adapter", action="store_true", help="ollama: base GGUF + ADAPTER line instead of a merged GGUF")
    p.add_argument("--no-run-check", action="store_true", help="skip running the GGUF in llama.cpp (static checks still run)")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens per probe in runtime checks (default 16)")
    p.add_argument("--min-agreement", type=float, default=0.90, help="q8_0: teacher-forced top-1 agreement required")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--check-vllm", metavar="PATH", help="only check an adapter folder (registered or not) against vLLM's LoRA rules")
    p.set_defaults(func=cmd_export)
