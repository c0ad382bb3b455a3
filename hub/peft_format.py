"""The PEFT LoRA adapter format, read one way by everything that reads adapters.

Validation (``hub/validate.py``), the batched server (``serving/lora.py``) and the
GGUF LoRA export (``promote/export/gguf_lora.py``) all take from here:

* file names (``adapter_config.json``, ``adapter_model.safetensors``) and
  :func:`read_config`;
* the tensor key rule (:data:`LORA_KEY`, :func:`group_tensors`)::

      base_model.model.<module>.lora_A[.<adapter name>].weight    A [r, in]
      base_model.model.<module>.lora_B[.<adapter name>].weight    B [out, r]
      base_model.model.<module>.lora_embedding_A[.<adapter name>]  (embeddings)

  ``<module>`` is the module's name in the base model (``model.layers.0.self_attn.q_proj``);
  a ``lora_B.bias`` (PEFT's ``lora_bias=True``) is not an A/B weight;
* per-module rank, alpha and scale (:func:`module_scale`), where ``rank_pattern`` /
  ``alpha_pattern`` keys match the way PEFT's ``get_pattern_key`` does: the first
  key, in the config's order, for which ``re.match(rf"(.*\\.)?({key})$", module)``
  succeeds. So a key matches the module's whole name or any dotted suffix of it,
  and may be a regex (``layers\\.0\\..*`` matches ``model.layers.0.self_attn.q_proj``). Keys are
  matched by ``hub/patterns.py`` (PEFT's meaning, linear time), never run with ``re``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from loradex.hub.errors import InvalidAdapter
from loradex.hub.patterns import check_pattern, matches

__all__ = ["CONFIG", "WEIGHTS", "DEFAULT_ALPHA", "LORA_KEY", "check_pattern", "group_tensors", "module_alpha",
           "module_rank", "module_scale", "parse_key", "pattern_key", "pattern_value", "read_config", "unbatchable"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
DEFAULT_ALPHA = 8  # PEFT's LoraConfig default, used when a config omits lora_alpha
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?!bias$)[A-Za-z0-9_]+)?(?:\.weight)?$"
)
LINEAR_PARTS = ("lora_A", "lora_B")


def read_config(folder: str | Path) -> dict:
    """``adapter_config.json`` of ``folder`` as a dict; InvalidAdapter if missing or not a JSON object."""
    path = Path(folder) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidAdapter(f"{Path(folder)}: missing {CONFIG} (is this a PEFT adapter folder?)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{CONFIG}: expected a JSON object")
    return cfg


def parse_key(key: str) -> tuple[str, str] | None:
    """(module, part) of a LoRA tensor key, or None for anything else (biases, magnitudes, saved modules)."""
    m = LORA_KEY.match(key)
    return (m.group("module"), m.group("part")) if m else None


def group_tensors(tensors: dict) -> tuple[dict[str, dict[str, object]], list[str]]:
    """({module: {part: tensor}}, keys that are not LoRA A/B weights)."""
    parts: dict[str, dict[str, object]] = {}
    other = []
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            other.append(key)
            continue
        module, part = parsed
        parts.setdefault(module, {})[part] = t
    return parts, other


def pattern_key(pattern: dict | None, module: str) -> str | None:
    """The key of ``pattern`` that applies to ``module`` (PEFT's rule, see the module docstring), or None."""
    for key in (pattern or {}):
        if matches(key, module):  # PEFT's rule, without running the key as a backtracking regex
            return key
    return None


def pattern_value(pattern: dict | None, module: str, default):
    key = pattern_key(pattern, module)
    return default if key is None else pattern[key]


def module_rank(cfg: dict, module: str) -> int:
    return pattern_value(cfg.get("rank_pattern"), module, cfg["r"])


def module_alpha(cfg: dict, module: str) -> float:
    return float(pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", DEFAULT_ALPHA)))


def module_scale(cfg: dict, module: str) -> tuple[int, float, float]:
    """(r, alpha, scale) for one module: PEFT scales B @ A by alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = module_rank(cfg, module), module_alpha(cfg, module)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scale


def unbatchable(cfg: dict) -> list[str]:
    """Config settings a plain ``W + scale * B @ A`` cannot reproduce (empty when there are none)."""
    found = []
    if cfg.get("use_dora"):
        found.append("use_dora=true")
    if (cfg.get("bias") or "none") != "none":
        found.append(f"bias={cfg.get('bias')!r}")
    if cfg.get("lora_bias"):
        found.append("lora_bias=true")
    if cfg.get("modules_to_save"):
        found.append(f"modules_to_save={list(cfg['modules_to_save'])}")
    return found
