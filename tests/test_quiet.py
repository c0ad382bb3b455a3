"""Model-loading commands do not print bitsandbytes' missing-`kernels` warning or peft's FutureWarning,
and every other warning still shows (hub/quiet.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from loradex.hub import quiet

ROOT = Path(__file__).resolve().parents[1]

# bitsandbytes logs the message at import, only on CPUs with AVX-512 bf16; re-running its module
# with that check forced on reproduces it on any machine (no kernel is run afterwards)
REPLAY_BNB_IMPORT = """
import importlib, bitsandbytes, bitsandbytes.functional as F
F.has_avx512bf16 = lambda: True
import bitsandbytes.backends.cpu.ops as ops
importlib.reload(ops)
"""


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_the_replay_shows_the_message_without_loradex():
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in _run(REPLAY_BNB_IMPORT)


def test_loading_an_nf4_base_prints_neither_message(tiny_base_dir):
    out = _run(f"""
from loradex.hub.loading import load_model_folder
model, _, _ = load_model_folder({str(tiny_base_dir)!r}, quantize="nf4", device="cpu")
from peft import LoraConfig, get_peft_model
get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
{REPLAY_BNB_IMPORT}
print("loaded", type(model.model.layers[0].self_attn.q_proj).__name__)
""")
    assert "loaded" in out
    assert "kernels-community" not in out and "No module named 'kernels'" not in out
    assert "is_gradient_checkpointing" not in out and "FutureWarning" not in out


def test_other_bitsandbytes_warnings_still_show(caplog):
    quiet.install()
    quiet.install()  # idempotent
    logger = logging.getLogger(quiet.BNB_CPU_LOGGER)
    assert sum(isinstance(f, quiet.MissingKernelsFilter) for f in logger.filters) == 1
    msg = quiet.KERNELS_MESSAGE + ": %s. Please make sure you already `pip install kernels`"
    with caplog.at_level(logging.WARNING, logger=quiet.BNB_CPU_LOGGER):
        logger.warning(msg, ModuleNotFoundError("No module named 'kernels'", name="kernels"))
        logger.warning(msg, RuntimeError("kernel build mismatch"))
        logger.warning("something else went wrong")
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2 and "kernel build mismatch" in shown[0] and shown[1] == "something else went wrong"


def test_the_offline_cache_miss_for_the_bnb_kernel_is_dropped_and_other_kernel_notices_show(caplog):
    quiet.install()
    bnb, hub = logging.getLogger(quiet.BNB_CPU_LOGGER), logging.getLogger(quiet.KERNELS_HUB_LOGGER)
    msg = quiet.KERNELS_MESSAGE + ": %s. Please make sure you already `pip install kernels`"
    with caplog.at_level(logging.WARNING):
        bnb.warning(msg, RuntimeError(f"Version 1 of '{quiet.BNB_KERNEL_REPO}' is not available in the local cache "
                                      "and Hugging Face Hub is in offline mode."))
        bnb.warning(msg, RuntimeError("Version 1 of 'someone/else' is not available and the hub is in offline mode."))
        hub.warning(f"Skipping publisher trust check for '{quiet.BNB_KERNEL_REPO}' because Hugging Face Hub is in "
                    "offline mode.")
        hub.warning("Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.")
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2 and "someone/else" in shown[0] and "someone/else" in shown[1]
