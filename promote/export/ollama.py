"""``--format ollama``: a folder ``ollama create NAME -f OUT/Modelfile`` accepts.

    merged (default)   FROM ./<merged>.<quant>.gguf
    --as-adapter       FROM ./<base>.f16.gguf
                       ADAPTER ./<adapter>.lora.f32.gguf

plus TEMPLATE (the chat template as a Go template), SYSTEM (the template's default
system prompt) and PARAMETER lines (stop tokens, generation defaults, context size).
The GGUF files are the same ones ``--format gguf`` / ``gguf-lora`` write and check.
Only ChatML-style templates (``<|im_start|>role ... <|im_end|>``, as SmolLM2 uses) are
translated; for others TEMPLATE is left out and the report says so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from loradex.promote.export import gguf as gguf_export
from loradex.promote.export.gguf_arch import context_length, family_of, hparams
from loradex.promote.export.source import ExportOptions, ExportResult, ExportSource

METHOD = "loradex ollama: Modelfile (FROM/TEMPLATE/SYSTEM/PARAMETER) over loradex GGUF files"
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", re.S)
GEN_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(*, model_file: str, adapter_file: str | None, folder: Path, label: str) -> tuple[str, list[str]]:
    """Modelfile text for the model folder ``folder`` (tokenizer + generation config); and warnings."""
    warnings = []
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else tok_cfg.get("chat_template")
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    cfg = json.loads((folder / "config.json").read_text())

    lines = [f"# Written by loradex for {label}", f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    stops = []
    if template and "<|im_start|>" in template:
        lines.append(f"TEMPLATE {_quote(CHATML_TEMPLATE)}")
        m = DEFAULT_SYSTEM.search(template)
        if m:
            lines.append(f"SYSTEM {_quote(m.group(1))}")
        stops += ["<|im_end|>", "<|im_start|>"]
    elif template:
        warnings.append("chat template is not ChatML; TEMPLATE left out (write it by hand for Ollama)")
    else:
        warnings.append("no chat template; TEMPLATE left out")
    eos = tok_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos and eos not in stops:
        stops.append(eos)
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    for key, name in GEN_PARAMS.items():
        if gen.get(key) is not None and gen.get("do_sample", True):
            lines.append(f"PARAMETER {name} {gen[key]}")
    # the GGUF's declared context (Mistral with a sliding window: the window, see gguf_arch.context_length)
    lines.append(f"PARAMETER num_ctx {min(context_length(family_of(cfg), cfg, hparams(cfg)), 8192)}")
    return "\n".join(lines) + "\n", warnings


def export_ollama(src: ExportSource, out: Path, opts: ExportOptions) -> ExportResult:
    if opts.as_adapter:
        lora_path, base_path, check = gguf_export.write_lora_gguf(src, out, "f32", run_check=opts.run_check, opts=opts)
        text, warnings = modelfile(model_file=base_path.name, adapter_file=lora_path.name, folder=src.base_dir,
                                   label=src.label)
        method = METHOD + " + " + check["writer"]["method"]
    else:
        path, info, check = gguf_export.write_merged_gguf(src, out, opts)
        check["writer"] = info
        text, warnings = modelfile(model_file=path.name, adapter_file=None, folder=src.merged_dir, label=src.label)
        method = METHOD + " + " + info["method"]
    (out / "Modelfile").write_text(text)
    check["modelfile"] = {"warnings": warnings, "adapter_form": opts.as_adapter}
    tag = f"{src.version['adapter']}:v{src.version['version']}"
    return ExportResult(method=method, check=check, primary="Modelfile",
                        command=f"cd {out} && ollama create {tag} -f Modelfile && ollama run {tag}", notes=warnings)
