"""Silence the two known-harmless messages every model-loading command used to print.

* bitsandbytes (on CPUs with AVX-512 bf16) logs "Failed to load CPU gemm_4bit_forward
  from kernels-community: No module named 'kernels'..." when it is imported, by peft or
  by transformers. Without the optional ``kernels`` package it uses its pure-torch
  path, which loradex relies on; a newcomer reads the message as broken. Only that
  record, and only when the cause is the missing ``kernels`` package, is dropped:
  any other failure to load the kernel still shows.
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
CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


class MissingKernelsFilter(logging.Filter):
    """Drops bitsandbytes' warning about the optional ``kernels`` package being absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(KERNELS_MESSAGE):
            return True
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (isinstance(cause, ModuleNotFoundError) and cause.name == "kernels")


def install() -> None:
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, MissingKernelsFilter) for f in logger.filters):
        logger.addFilter(MissingKernelsFilter())
    warnings.filterwarnings("ignore", message=CHECKPOINTING_WARNING, category=FutureWarning)
