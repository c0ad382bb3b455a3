"""vLLM plugin: serve any adapter of a loradex registry by name (``pip install loradex[vllm]``).

vLLM calls ``register()`` in each of its processes (entry point group
``vllm.general_plugins``, name ``loradex``). It adds a ``LoRAResolver`` that vLLM asks
the first time a request names a model it does not know::

    LORADEX_REGISTRY=http://registry:8000 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
    vllm serve BASE_FOLDER --served-model-name smollm2-135m-instruct --enable-lora --max-lora-rank 16

    request model="pirate@3" -> resolve_lora("smollm2-135m-instruct", "pirate@3")
        -> serving.fleet.fetch.fetch_adapter (registry ops + objects by sha256, verified, vLLM's rules)
        -> LoRARequest(lora_name="pirate@3", lora_path=<cache>/snapshots/<digest>)

Anything refused (base mismatch, DoRA, rank over LORADEX_MAX_LORA_RANK, a hash that does
not match, an unknown name, a registry that does not answer) returns None, and the
reason is logged; vLLM then answers the request with 404 as for any unknown model.

vLLM keeps a resolved adapter under the name it was asked for, so ``pirate@production``
stays on the version it first resolved to: send traffic through ``loradex gateway``,
which turns aliases into immutable ``NAME@V`` before forwarding (docs/fleet.md).
Configuration is the environment (``serving.fleet.fetch.FetchConfig.from_env``); no torch,
transformers or FastAPI import happens here.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging

from loradex.hub.errors import LoradexError
from loradex.serving.fleet.fetch import FetchConfig, fetch_adapter

RESOLVER_NAME = "loradex"


def lora_int_id(name: str) -> int:
    """A stable positive id per adapter name (vLLM keys its loaded adapters by this integer)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % (2**31 - 1) + 1


def make_resolver(cfg: FetchConfig, log: logging.Logger):
    """The LoRAResolver instance (the class is built here so importing this module needs no vLLM)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class LoradexResolver(LoRAResolver):
        """Resolves NAME / NAME@V / NAME@ALIAS against a loradex registry."""

        async def resolve_lora(self, base_model_name: str, lora_name: str):
            try:
                got = await asyncio.to_thread(fetch_adapter, cfg, lora_name, base_model_name)
            except LoradexError as exc:
                log.warning("loradex: not serving %r: %s (%s)", lora_name, exc, type(exc).__name__)
                return None
            except Exception as exc:  # the plugin must never take a request path down with it
                log.warning("loradex: not serving %r: unexpected %s: %s", lora_name, type(exc).__name__, exc)
                return None
            log.info("loradex: %r -> %s (%s, rank %d, %s)", lora_name, got.label, got.path, got.rank,
                     "from cache" if got.cached else "downloaded")
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(lora_name), lora_path=str(got.path))

    return LoradexResolver()


def register() -> None:
    """Entry point: register the resolver when LORADEX_REGISTRY is set (a no-op otherwise)."""
    import os

    from vllm.logger import init_logger
    from vllm.lora.resolver import LoRAResolverRegistry

    log = init_logger("vllm.plugins.loradex")  # under "vllm": vLLM's handler and format apply
    if not os.environ.get("LORADEX_REGISTRY"):
        log.debug("loradex: LORADEX_REGISTRY not set; resolver not registered")
        return
    cfg = FetchConfig.from_env()
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_resolver(cfg, log))
    log.info("loradex: LoRA resolver for %s (cache %s, max rank %d, base %s)", cfg.registry, cfg.cache_dir,
             cfg.max_lora_rank, cfg.base or "the served model name")
