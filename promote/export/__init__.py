"""Export formats: ``loradex export NAME[@V] --format F --out DIR``.

``FORMATS`` maps each format to a plain function
``fn(src: ExportSource, out: Path, opts: ExportOptions) -> ExportResult``;
``promote/export/run.py`` resolves the source (merging first where a format ships
a merged model), calls the function and registers the export.
"""
from __future__ import annotations

from typing import Callable

from loradex.promote.export import gguf, ollama, vllm
from loradex.promote.export.source import ExportOptions, ExportResult, ExportSource

FORMATS: dict[str, Callable[[ExportSource, "object", ExportOptions], ExportResult]] = {
    "vllm": vllm.export_merged,
    "vllm-lora": vllm.export_lora,
    "gguf": gguf.export_gguf,
    "gguf-lora": gguf.export_gguf_lora,
    "ollama": ollama.export_ollama,
}

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "ExportSource"]
