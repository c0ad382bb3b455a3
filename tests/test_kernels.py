"""serving/kernels.py: the Linear kernel for serving, chosen at load by measurement, on the tiny random base."""
from __future__ import annotations

import pytest
import torch

from loradex.hub.errors import InvalidConfig


def _nf4(tiny_base_dir):
    from loradex.hub.loading import load_model_folder

    model, device, dtype = load_model_folder(tiny_base_dir, quantize="nf4", device="cpu")
    return model, device, dtype


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


IDS = torch.tensor([[1, 200, 300, 400, 500, 600, 700]])


def _exact_logits(tiny_base_dir):
    """The NF4 base's logits with every 4-bit layer dequantized once (the NF4 values, exactly, in fp32): what
    bitsandbytes computes on CPUs without avx512_bf16 (with it, bitsandbytes' CPU product is bf16)."""
    from loradex.serving.kernels import dense_layers

    model, _, dtype = _nf4(tiny_base_dir)
    assert dense_layers(model, dtype) > 0
    return _logits(model, IDS)


def test_bitsandbytes_agrees_with_the_exact_nf4_product_unless_it_computes_in_bf16(tiny_base_dir):
    from loradex.serving.kernels import bnb_cpu_in_bf16, dense_copy, quantized_linears

    exact = _exact_logits(tiny_base_dir)
    model, _, dtype = _nf4(tiny_base_dir)
    got = _logits(model, IDS)
    if bnb_cpu_in_bf16("cpu"):  # about three significant digits, and the layers are now repacked
        torch.testing.assert_close(got, exact, rtol=5e-2, atol=5e-2)
        assert not torch.allclose(got, exact, rtol=1e-5, atol=1e-5)
        with pytest.raises(InvalidConfig, match="already run by bitsandbytes on CPU"):
            dense_copy(next(iter(quantized_linears(model).values())), dtype)
    else:
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


def test_dense_kernel_computes_the_exact_nf4_product(tiny_base_dir):
    from loradex.serving.kernels import choose, quantized_linears

    model, device, dtype = _nf4(tiny_base_dir)
    n = len(quantized_linears(model))
    assert n > 0
    want = _exact_logits(tiny_base_dir)
    info = choose(model, quantize="nf4", dtype=dtype, device=device, mode="dense")
    assert info["linear"] == "dense" and info["reason"] == "LORADEX_KERNELS=dense"
    assert quantized_linears(model) == {}
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())
    got = _logits(model, IDS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_measures_each_kernel_and_applies_what_it_reports(tiny_base_dir):
    from loradex.serving import native
    from loradex.serving.kernels import HalfLinear, bnb_cpu_in_bf16, choose, quantized_linears

    model, device, dtype = _nf4(tiny_base_dir)
    want = _exact_logits(tiny_base_dir)
    info = choose(model, quantize="nf4", dtype=dtype, device=device, mode="auto")
    names = ["dense"] + (["native"] if native.library() is not None else [])
    if bnb_cpu_in_bf16(device):  # it would change the numbers: not a candidate, and the report says why
        assert "bnb_b1_us" not in info["timings"] and "bnb left out" in info["reason"]
    else:
        names.insert(0, "bnb")
    t = info["timings"]
    assert all(t[f"{n}_b1_us"] > 0 for n in names)
    fastest = min(t[f"{n}_b1_us"] for n in names)
    # timed at batch 8 exactly when not over 2x slower than the best at batch 1
    finalists = [n for n in names if t[f"{n}_b1_us"] <= 2 * fastest]
    assert sorted(n for n in names if f"{n}_b8_us" in t) == sorted(finalists)
    assert info["linear"] == min(finalists, key=lambda n: t[f"{n}_b1_us"] + t[f"{n}_b8_us"])
    assert (quantized_linears(model) == {}) == (info["linear"] != "bnb")
    head = info["lm_head"]
    assert head in ("fp32", "fp16", "native") and info["lm_head_timings"]["fp32_b1_us"] > 0
    assert isinstance(model.lm_head, HalfLinear) == (head == "fp16")
    assert isinstance(model.lm_head, native.F32Linear) == (head == "native")
    # whatever was chosen serves the same model: logits agree (to fp16 precision if the head is fp16)
    tol = 2e-2 if head == "fp16" else 1e-4
    torch.testing.assert_close(_logits(model, IDS), want, rtol=tol, atol=tol)


def test_unquantized_and_int8_bases_have_nothing_to_choose(tiny_base_dir):
    from loradex.hub.loading import load_model_folder
    from loradex.serving.kernels import choose

    model, device, dtype = load_model_folder(tiny_base_dir, quantize="none", device="cpu")
    head = model.lm_head
    info = choose(model, quantize="none", dtype=dtype, device=device, mode="auto")
    assert info["linear"] == "dense" and "nothing to choose" in info["reason"]
    assert model.lm_head is head  # an unquantized base is served exactly as loaded


def test_kernels_env_is_checked(monkeypatch, tiny_base_dir):
    from loradex.serving.kernels import requested_mode

    monkeypatch.setenv("LORADEX_KERNELS", "Dense")
    assert requested_mode() == "dense"
    monkeypatch.setenv("LORADEX_KERNELS", "turbo")
    with pytest.raises(InvalidConfig, match="LORADEX_KERNELS must be one of auto, bnb, dense, native"):
        requested_mode()


def test_engine_reports_its_kernel_choice(catalog, store, tiny_base, monkeypatch):
    from loradex.serving.config import EngineConfig
    from loradex.serving.engine import Engine

    monkeypatch.setenv("LORADEX_KERNELS", "dense")
    engine = Engine.load(EngineConfig(base="tiny", quantize="nf4"), catalog=catalog, store=store)
    try:
        kernels = engine.stats()["kernels"]
        assert kernels["linear"] == "dense" and kernels["mode"] == "dense"
        out = engine.generate("Hello there", max_tokens=4, temperature=0, ignore_eos=True)
        assert out.completion_tokens == 4
    finally:
        engine.shutdown()
