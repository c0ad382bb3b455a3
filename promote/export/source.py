"""What every export format receives and returns.

An exporter is a plain function ``fn(src: ExportSource, out: Path, opts: ExportOptions) -> ExportResult``
(see ``FORMATS`` in ``promote/export/__init__.py``). ``src`` holds sha256-verified
folders: the adapter version, its base and, for formats that ship a merged model,
the merge the export is built from.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loradex.hub.errors import InvalidConfig

FORMAT_NAMES = ("vllm", "vllm-lora", "gguf", "gguf-lora", "ollama")
NEEDS_MERGE = {"vllm": True, "vllm-lora": False, "gguf": True, "gguf-lora": False, "ollama": True}
QUANT_CHOICES = {"gguf": ("f16", "q8_0", "f32"), "ollama": ("f16", "q8_0", "f32"), "gguf-lora": ("f32", "f16")}
DEFAULT_QUANT = {"gguf": "f16", "ollama": "f16", "gguf-lora": "f32"}


@dataclass
class ExportOptions:
    """Resolved options of one ``loradex export`` run (saved beside the export)."""

    format: str
    """--format: vllm, vllm-lora, gguf, gguf-lora or ollama."""
    quant: str | None = None
    """--quant: GGUF tensor type (gguf/ollama: f16, q8_0, f32; gguf-lora: f32, f16)."""
    dtype: str | None = None
    """--dtype: which merge to export (fp32/bf16/fp16); merges in fp32 if none exists yet."""
    pre: str | None = None
    """--gguf-pre: llama.cpp pre-tokenizer name, when the automatic choice is unknown."""
    as_adapter: bool = False
    """--as-adapter (ollama): base GGUF + ADAPTER GGUF instead of a merged GGUF."""
    run_check: bool = True
    """--no-run-check turns off running the GGUF in llama.cpp (static checks always run)."""
    check_tokens: int = 16
    """--check-tokens: greedy tokens per probe in the runtime check."""
    min_agreement: float = 0.90
    """--min-agreement: teacher-forced top-1 agreement required of a q8_0 GGUF."""
    force: bool = False
    """--force: write into a non-empty --out folder."""

    def __post_init__(self) -> None:
        if self.format not in FORMAT_NAMES:
            raise InvalidConfig(f"--format must be one of {', '.join(FORMAT_NAMES)}, got {self.format!r}")
        choices = QUANT_CHOICES.get("ollama" if self.format == "ollama" else self.format)
        if self.quant is not None and choices is None:
            raise InvalidConfig(f"--quant applies to gguf, gguf-lora and ollama, not --format {self.format}")
        if choices is not None:
            self.quant = self.quant or DEFAULT_QUANT[self.format]
            if self.quant not in choices:
                raise InvalidConfig(f"--quant for --format {self.format} must be one of {', '.join(choices)}, "
                                    f"got {self.quant!r}")
        if self.as_adapter and self.format != "ollama":
            raise InvalidConfig("--as-adapter applies to --format ollama only")
        if self.dtype is not None and self.dtype not in ("fp32", "bf16", "fp16"):
            raise InvalidConfig(f"--dtype must be one of fp32, bf16, fp16, got {self.dtype!r}")
        if not 1 <= self.check_tokens <= 512:
            raise InvalidConfig(f"--check-tokens must be between 1 and 512, got {self.check_tokens}")
        if not 0.0 < self.min_agreement <= 1.0:
            raise InvalidConfig(f"--min-agreement must be in (0, 1], got {self.min_agreement}")

    @property
    def needs_merge(self) -> bool:
        return NEEDS_MERGE[self.format] and not self.as_adapter


@dataclass
class ExportSource:
    version: dict                  # adapter_versions row
    adapter_dir: Path              # verified adapter snapshot
    base: dict                     # bases row of the adapter's base
    base_dir: Path
    merge: dict | None = None      # merges row, for formats that ship a merged model
    merged_dir: Path | None = None
    probes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.version['adapter']}@{self.version['version']}"


@dataclass
class ExportResult:
    method: str                    # how it was produced (recorded)
    check: dict                    # static and runtime checks, with their numbers
    primary: str | None = None     # the main file or folder inside --out
    command: str | None = None     # how to run it (vllm-lora: the exact `vllm serve` command)
    notes: list[str] = field(default_factory=list)


def prepare_out(out: Path, force: bool) -> Path:
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InvalidConfig(f"--out {out} is a file; pass a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise InvalidConfig(f"--out {out} is not empty; pass an empty folder or --force")
    out.mkdir(parents=True, exist_ok=True)
    return out


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link a (read-only, immutable) store file into an export, or copy it across filesystems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
