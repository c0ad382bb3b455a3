"""CUDA code paths of serving (marker ``gpu``: deselected by default, skipped without CUDA, not counted in CI).

Run on a machine with a GPU: ``pytest -m gpu tests/test_gpu.py``. Tiny random base, so seconds of work:
the kernel choice at load on CUDA (bitsandbytes NF4 vs dequantized bf16), the engine's mixed batch on
CUDA with fixed lengths, and the ``bench-gpu`` harness's smoke run of the suite on CUDA.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_kernel_choice_on_cuda_measures_and_keeps_the_math(tiny_base_dir):
    from loradex.hub.loading import load_model_folder
    from loradex.serving.kernels import choose, quantized_linears

    model, device, dtype = load_model_folder(tiny_base_dir, quantize="nf4", device="cuda")
    assert device == "cuda" and dtype in (torch.bfloat16, torch.float16)
    ids = torch.tensor([[1, 200, 300, 400, 500]], device="cuda")
    with torch.inference_mode():
        want = model(ids).logits.float()
    info = choose(model, quantize="nf4", dtype=dtype, device=device, mode="auto")
    assert info["device"] == "cuda" and info["timings"]["bnb_b1_us"] > 0 and info["timings"]["dense_b1_us"] > 0
    assert "native_b1_us" not in info["timings"] and not info["native"]["available"]  # a CPU kernel only
    assert (quantized_linears(model) == {}) == (info["linear"] == "dense")
    assert info["lm_head"] == "as loaded"  # the fp16 head copy is a CPU choice only
    with torch.inference_mode():
        got = model(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def test_engine_on_cuda_mixed_batch_fixed_length(catalog, store, tiny_base, tiny_base_dir, tmp_path):
    from loradex.hub.registry import register_adapter
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine
    from tests.helpers import make_adapter

    for i in range(3):
        register_adapter(catalog, store, make_adapter(tiny_base_dir, tmp_path / f"a{i}", seed=i, scale=0.3),
                         f"a{i}", base="tiny")
    engine = Engine.load(EngineConfig(base="tiny", quantize="nf4", device="cuda"), catalog=catalog, store=store)
    try:
        assert engine.device.startswith("cuda") and engine.stats()["kernels"]["device"] == "cuda"
        reqs = [{"prompt": "Hello there", "adapter": f"a{i}", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
                for i in range(3)] + [{"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}]
        outs = engine.generate_batch(reqs)
        assert [o.completion_tokens for o in outs] == [6, 6, 6, 6]
        solo = engine.generate("Hello there", adapter="a1", max_tokens=6, temperature=0, ignore_eos=True)
        assert solo.token_ids == outs[1].token_ids
    finally:
        engine.shutdown()


def test_suite_smoke_run_on_cuda(tiny_base_dir, tmp_path):
    from benchmarks.common import Report
    from benchmarks.run import RunConfig, run_benchmarks

    payload = run_benchmarks(RunConfig(preset="smoke", base_dir=tiny_base_dir, device="cuda", out=tmp_path / "g.json",
                                       only=["decode_bound", "serving_mixed", "cold_load"],
                                       cache_dir=tmp_path / "c"), Report())
    assert payload["settings"]["device"] == "cuda"
    for name in ("decode_bound", "serving_mixed", "cold_load"):
        assert payload["benchmarks"][name]["status"] == "ok", payload["benchmarks"][name].get("traceback")
