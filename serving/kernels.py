"""Which kernel computes the base's Linear layers when serving, chosen on this machine at load, by measurement.

A quantized base (``--quantize nf4``) can be served two ways on the same
weights:

* ``bnb``: the bitsandbytes layers as loaded (on CPU bitsandbytes dequantizes
  the 4-bit blocks on every call, then multiplies);
* ``dense``: every 4-bit layer dequantized once, at load, into a plain
  ``nn.Linear`` in the compute dtype (the same values bitsandbytes computes
  with, so the same math), at the memory cost of full-precision weights.

Which is faster depends on the machine (core, caches, memory bandwidth, what
bitsandbytes has native code for), so it is never decided from a CPU model
name: :func:`choose` times one batch-1 pass over every projection both ways
(interleaved, best of a few repetitions; every layer, so weights stream from
memory as in a decode step) and keeps the faster, provided the dense copy fits
in half the available memory. On CPU in fp32 it also times the (tied, fp32) LM
head, the largest single read of a decode step, against an fp16 copy of it at
batch 1 and 8 and keeps the copy only on a clear win (>10%) at both. The choice and its timings go into
``LoadedBase.info["kernels"]``, the log, ``GET /v1/server`` and ``/ready``.

``LORADEX_KERNELS``: ``auto`` (default: measure), or force ``bnb`` / ``dense``.
Unquantized bases have nothing to choose (``dense`` already); int8 stays
``bnb`` (LLM.int8's outlier split has no exact dense form here).
"""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from loradex.hub.errors import InvalidConfig

log = logging.getLogger("loradex.kernels")

MODES = ("auto", "bnb", "dense")
REPS = 5           # timed repetitions per candidate and batch size (best kept)
MEMORY_SHARE = 0.5  # a dense copy may take at most this share of the memory available now


def requested_mode() -> str:
    mode = os.environ.get("LORADEX_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise InvalidConfig(f"LORADEX_KERNELS must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _is_4bit(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Linear4bit" and hasattr(getattr(mod, "weight", None), "quant_state")


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes 4-bit Linear of ``model``, by qualified name."""
    return {name: mod for name, mod in model.named_modules() if _is_4bit(mod)}


def dense_copy(mod: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """The 4-bit layer's weights dequantized once into a plain Linear (same device)."""
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(dtype)
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w.reshape(mod.out_features, mod.in_features))
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.to(dtype))
    lin.requires_grad_(False)
    return lin


def _available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _time(mods: list[nn.Module], xs: list[torch.Tensor], device: str) -> float:
    """Seconds for one pass of ``mods`` over their inputs (best of REPS)."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(REPS):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for m, x in zip(mods, xs):
                m(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return best


def measure(quant: list[nn.Module], dense: list[nn.Module], dtype: torch.dtype, device: str) -> dict:
    """One decode-like pass (batch 1) over every projection, as loaded and dense, interleaved; best of REPS.

    Every layer is visited, as a decode step does, so the weights come from memory and not from a cache
    that a single small layer would fit in.
    """
    xs = [torch.randn(1, 1, m.in_features, dtype=dtype, device=device) for m in quant]
    _time(quant, xs, device), _time(dense, xs, device)  # warm-up (bitsandbytes repacks on its first CPU forward)
    b, d = [], []
    for i in range(2):
        if i % 2 == 0:
            b.append(_time(quant, xs, device)), d.append(_time(dense, xs, device))
        else:
            d.append(_time(dense, xs, device)), b.append(_time(quant, xs, device))
    return {"bnb_us": round(min(b) * 1e6, 1), "dense_us": round(min(d) * 1e6, 1)}


class HalfLinear(nn.Module):
    """A Linear whose weight is stored in fp16 and read as such (half the bytes per token); fp32 in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.float16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.float16), self.weight, self.bias).to(x.dtype)


def choose_lm_head(model: nn.Module, dtype: torch.dtype, device: str) -> dict:
    """On CPU in fp32: keep the (tied) fp32 LM head, or read an fp16 copy of it, whichever is faster here."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or dtype != torch.float32 or device != "cpu":
        return {"lm_head": "as loaded", "reason": "only an fp32 head on CPU has a choice"}
    half = HalfLinear(head.weight, head.bias)
    # batch 1 (a lone stream's decode) and batch 8 (a mixed batch's decode, a prefill's last tokens): fp16
    # weights halve the bytes, but a CPU without fp16 arithmetic converts them, which costs more as rows grow
    xs = [torch.randn(b, 1, head.in_features, dtype=dtype) for b in (1, 8)]
    t32, t16 = [0.0, 0.0], [0.0, 0.0]
    for j, x in enumerate(xs):
        _time([head], [x], device), _time([half], [x], device)
        a, b = [], []
        for i in range(2):
            pair = [(a, head), (b, half)] if i % 2 == 0 else [(b, half), (a, head)]
            for out, mod in pair:
                out.append(_time([mod], [x], device))
        t32[j], t16[j] = min(a), min(b)
    info = {"lm_head_timings": {"fp32_b1_us": round(t32[0] * 1e6, 1), "fp16_b1_us": round(t16[0] * 1e6, 1),
                                "fp32_b8_us": round(t32[1] * 1e6, 1), "fp16_b8_us": round(t16[1] * 1e6, 1)}}
    if all(h < 0.9 * f for h, f in zip(t16, t32)):  # a clear win at both sizes: fp16 logits differ in the last bits
        model.lm_head = half
        info["lm_head"] = "fp16"
    else:
        info["lm_head"] = "fp32"
    return info


def choose(model: nn.Module, *, quantize: str, dtype: torch.dtype, device: str, mode: str | None = None) -> dict:
    """Pick the kernel for ``model``'s 4-bit layers and apply it; returns what was chosen and why."""
    mode = mode or requested_mode()
    layers = quantized_linears(model)
    if quantize != "nf4" or not layers:
        return {"linear": "dense" if quantize == "none" else "bnb", "mode": mode,
                "reason": "nothing to choose for --quantize " + quantize}
    n_params = sum(m.in_features * m.out_features for m in layers.values())
    dense_bytes = n_params * torch.empty(0, dtype=dtype).element_size()
    avail = _available_bytes(device)
    fits = avail is None or dense_bytes <= MEMORY_SHARE * avail
    dense: dict[str, nn.Linear] | None = None
    info: dict = {"mode": mode, "dense_bytes": dense_bytes, "available_bytes": avail, "device": device}
    if mode == "auto":
        if not fits:
            info.update(linear="bnb", reason=f"a dense copy ({dense_bytes / 1e6:.0f} MB) does not fit in "
                                             f"{MEMORY_SHARE:.0%} of available memory")
        else:
            dense = {n: dense_copy(m, dtype) for n, m in layers.items()}
            timings = measure(list(layers.values()), list(dense.values()), dtype, device)
            info["timings"] = timings
            info["linear"] = "dense" if timings["dense_us"] < timings["bnb_us"] else "bnb"
            info["reason"] = (f"one batch-1 pass over the {len(layers)} projections: bitsandbytes "
                              f"{timings['bnb_us'] / 1000:.1f} ms, dense {timings['dense_us'] / 1000:.1f} ms")
    else:
        if mode == "dense" and not fits:
            raise InvalidConfig(f"LORADEX_KERNELS=dense: the dense copy ({dense_bytes / 1e6:.0f} MB) does not fit "
                                f"in {MEMORY_SHARE:.0%} of available memory")
        info.update(linear=mode, reason="LORADEX_KERNELS=" + mode)
    if info["linear"] == "dense":
        dense = dense or {n: dense_copy(m, dtype) for n, m in layers.items()}
        for name, lin in dense.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, lin)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if mode == "auto":
        info.update(choose_lm_head(model, dtype, device))
    log.info("kernels: %s, lm_head %s (%s)", info["linear"], info.get("lm_head", "as loaded"), info["reason"])
    return info
