"""Silence the two known-harmless messages every model-loading command used to print.

* bitsandbytes (on CPUs with AVX-512 bf16) logs "Failed to load CPU gemm_4bit_forward
  from kernels-community: No module named 'kernels'..." when it is imported, by peft or
  by transformers. Without the optional ``kernels`` package it uses its pure-torch
  path, which loradex relies on; a newcomer reads the message as broken. Only that
  record, and only when the cause is the missing ``kernels`` package or (``kernels``
  installed, as transformers 5 now requires) that the kernel is not in the local cache
  while the hub is offline (loradex downloads nothing at run time), is dropped, with
  the ``kernels`` package's own "Skipping publisher trust check ... offline mode" line
  for that kernel: any other failure to load it still shows.
* peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated
  with a FutureWarning on every ``PeftModel``; only that exact warning is ignored.

:func:`install` is idempotent; ``hub.loading`` calls it when imported, which every
stage does before it imports peft or loads a model.
"""
from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
OFFLINE = "offline mode"
CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


class MissingKernelsFilter(logging.Filter):
    """Drops bitsandbytes' warning about the optional ``kernels`` package being absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(KERNELS_MESSAGE):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if isinstance(cause, ModuleNotFoundError) and cause.name == "kernels":
            return False
        text = str(cause)
        return not (BNB_KERNEL_REPO in text and OFFLINE in text)


class OfflineTrustFilter(logging.Filter):
    """Drops the ``kernels`` package's offline trust-check notice for bitsandbytes' CPU kernel only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Skipping publisher trust check") and BNB_KERNEL_REPO in msg and OFFLINE in msg)


def install() -> None:
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, MissingKernelsFilter) for f in logger.filters):
        logger.addFilter(MissingKernelsFilter())
    hub_logger = logging.getLogger(KERNELS_HUB_LOGGER)
    if not any(isinstance(f, OfflineTrustFilter) for f in hub_logger.filters):
        hub_logger.addFilter(OfflineTrustFilter())
    warnings.filterwarnings("ignore", message=CHECKPOINTING_WARNING, category=FutureWarning)
