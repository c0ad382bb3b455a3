"""Fetch one adapter version from a loradex registry into a local cache, ready for vLLM.

    cfg = FetchConfig.from_env()                       # LORADEX_REGISTRY, LORADEX_API_KEY, ...
    got = fetch_adapter(cfg, "pirate@production", served_base="smollm2-135m-instruct")
    got.path    # a verified PEFT folder under cfg.cache_dir; got.label == "pirate@3"

    registry                                   this machine
    POST /v1/ops/adapters.resolve {ref}  --->  version row: base, files {name: sha256}, path
    (base == the replica's base?)              refuse otherwise
    GET /v1/store/objects/{sha256}       --->  cache/objects/..  (hashed while written)
                                               cache/snapshots/<digest>/  (re-hashed before use)
    promote.export.vllm.check_lora_folder      refuse what vLLM cannot serve
    rank <= max_lora_rank                      refuse otherwise

The cache is a loradex ``Store`` (content-addressed, immutable, written through tmp +
rename), so a version fetched once is served from disk afterwards, even while the
registry is down. Imports stay light on purpose: this runs inside vLLM's own venv
(loradex installed there with ``--no-deps``); only the LoRA rule check reads the
safetensors header through the ``safetensors`` package vLLM already has.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loradex.hub.errors import InvalidConfig
from loradex.promote.export.vllm import MAX_LORA_RANKS, check_lora_folder  # vLLM's LoRA rules, shared with `loradex export`
from loradex.serving.fleet.errors import Refused

DEFAULT_CACHE = "~/.cache/loradex/vllm-loras"
VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's own --max-lora-rank default


@dataclass(frozen=True)
class FetchConfig:
    """Where a replica gets adapters from, and what it can serve (all from env for the vLLM plugin)."""

    registry: str
    """LORADEX_REGISTRY: the loradex registry's URL (``loradex serve`` that owns the catalog)."""
    api_key: str | None = None
    """LORADEX_API_KEY: the registry's API key, if it has one."""
    cache_dir: Path = Path(DEFAULT_CACHE).expanduser()
    """LORADEX_LORA_CACHE: local adapter cache (a loradex store: objects/ + snapshots/)."""
    base: str | None = None
    """LORADEX_BASE: the registry's name of the base this replica serves (default: match the model vLLM
    loaded against the registry base's name, path or source)."""
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK
    """LORADEX_MAX_LORA_RANK: the replica's --max-lora-rank; adapters of higher rank are refused."""
    timeout_s: float = 60.0
    """LORADEX_REGISTRY_TIMEOUT: seconds for one registry call or file download."""

    def __post_init__(self):
        if not self.registry or not self.registry.startswith(("http://", "https://")):
            raise InvalidConfig(f"LORADEX_REGISTRY must be the registry's http(s) URL, got {self.registry!r}")
        if self.max_lora_rank < 1:
            raise InvalidConfig(f"LORADEX_MAX_LORA_RANK must be >= 1, got {self.max_lora_rank}")
        if self.timeout_s <= 0:
            raise InvalidConfig(f"LORADEX_REGISTRY_TIMEOUT must be > 0, got {self.timeout_s}")

    @classmethod
    def from_env(cls, env=None) -> "FetchConfig":
        env = os.environ if env is None else env

        def number(key: str, default, kind):
            raw = env.get(key)
            if raw in (None, ""):
                return default
            try:
                return kind(raw)
            except ValueError:
                raise InvalidConfig(f"{key} must be a number, got {raw!r}") from None

        return cls(registry=env.get("LORADEX_REGISTRY", ""), api_key=env.get("LORADEX_API_KEY") or None,
                   cache_dir=Path(env.get("LORADEX_LORA_CACHE") or DEFAULT_CACHE).expanduser(),
                   base=env.get("LORADEX_BASE") or None,
                   max_lora_rank=number("LORADEX_MAX_LORA_RANK", VLLM_DEFAULT_MAX_LORA_RANK, int),
                   timeout_s=number("LORADEX_REGISTRY_TIMEOUT", 60.0, float))


@dataclass(frozen=True)
class Fetched:
    """A verified adapter folder in the local cache."""

    label: str          # NAME@V: the immutable version the reference resolved to
    path: Path          # the PEFT folder (adapter_config.json + adapter_model.safetensors)
    digest: str         # the snapshot digest (sha256 of the file manifest)
    rank: int
    cached: bool        # True when every file was already in the cache (nothing downloaded)


def fetch_adapter(cfg: FetchConfig, ref: str, served_base: str | None = None) -> Fetched:
    """Resolve ``ref`` (NAME, NAME@V, NAME@ALIAS) at the registry and return its verified local folder.

    Raises ``Refused`` (base mismatch, vLLM's rules, rank), ``NotFound`` (no such adapter, version
    or alias), ``IntegrityError`` (a downloaded file does not match its sha256) and
    ``CatalogLocked`` (the registry did not answer).
    """
    from loradex.hub.remote import RemoteCatalog, materialize
    from loradex.hub.store import Store

    registry = RemoteCatalog(cfg.registry, cfg.api_key or "", timeout=cfg.timeout_s,
                             owner=f"the loradex registry at {cfg.registry}")
    row = registry.call_op("adapters.resolve", {"ref": ref})
    label = f"{row['adapter']}@{row['version']}"
    if cfg.base is not None:
        if row["base"] != cfg.base:
            raise Refused(f"{label} is an adapter for base {row['base']!r}; this replica serves {cfg.base!r}")
    elif served_base is not None and served_base != row["base"]:
        # vLLM passes the model it loaded (often a folder path), not the served name: accept the
        # registry's name, path or source of the adapter's base, nothing else
        base = registry.call_op("bases.get", {"name": row["base"], "provision": False})
        if served_base not in (base.get("path"), base.get("source")):
            raise Refused(f"{label} is an adapter for base {row['base']!r} ({base.get('path')}); this replica serves "
                          f"{served_base!r} (set LORADEX_BASE to the registry's name of the base it serves)")
    if isinstance(row.get("rank"), int) and row["rank"] > cfg.max_lora_rank:  # refuse before downloading
        raise _over_rank(label, row["rank"], cfg.max_lora_rank)
    store = Store(cfg.cache_dir)
    cached = not store.verify(row["path"], row["files"])
    folder = materialize(registry, store, row["path"], row["files"], label)
    rules = check_lora_folder(folder)
    if not rules["ok"]:
        raise Refused(f"{label} breaks vLLM's LoRA rules: " + "; ".join(rules["reasons"]))
    if rules["rank"] > cfg.max_lora_rank:  # rank_pattern may raise it above the recorded r
        raise _over_rank(label, rules["rank"], cfg.max_lora_rank)
    return Fetched(label=label, path=folder, digest=row["digest"], rank=rules["rank"], cached=cached)


def _over_rank(label: str, rank: int, limit: int) -> Refused:
    need = next((m for m in MAX_LORA_RANKS if m >= rank), None)
    hint = f"start vLLM with --max-lora-rank {need} to serve it" if need else "vLLM serves no rank this high"
    return Refused(f"{label} has rank {rank}, over this replica's --max-lora-rank {limit} ({hint})")
