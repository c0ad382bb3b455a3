"""Which kernel computes the base's Linear layers when serving, chosen on this machine at load, by measurement.

A quantized base (``--quantize nf4``) can be served three ways on the same
weights:

* ``bnb``: the bitsandbytes layers as loaded (on CPU bitsandbytes dequantizes
  the 4-bit blocks on every call, then multiplies);
* ``dense``: every 4-bit layer dequantized once, at load, into a plain
  ``nn.Linear`` in the compute dtype (the same values bitsandbytes computes
  with, so the same math), at the memory cost of full-precision weights;
* ``native``: loradex's own CPU kernel (``serving/native.py``) reading the 4-bit
  indices and rebuilding each weight with the same fp32 product bitsandbytes
  dequantizes to (checked bit for bit per layer), half a byte per weight read
  per token; x86-64 with AVX2/FMA/F16C and a C compiler only.

The three compute the same math except where bitsandbytes does not: on CPUs
with avx512_bf16 its CPU 4-bit product casts the input and the scales to bf16
(``gemv_4bit``, bitsandbytes 0.50), about three significant digits, so greedy
tokens drift from the fp32 result. There ``auto`` leaves ``bnb`` out (when a
dense copy fits) and says so; ``LORADEX_KERNELS=bnb`` still forces it.

Which is faster depends on the machine (core, caches, memory bandwidth, what
bitsandbytes has native code for), so it is never decided from a CPU model
name: :func:`choose` times one batch-1 and one batch-8 pass over every
projection each way (interleaved, best of 3 passes, a way over 2x slower at batch 1
not timed at batch 8; every layer, so
weights stream from memory as in a decode step) and keeps the fastest (sum of
both sizes), provided a dense copy fits in half the available memory. On CPU in
fp32 it also times the (tied, fp32) LM head: torch's product against the native
fp32 kernel on the same weights (no copy), or, without native kernels, against an
fp16 copy (kept only on a clear win, >10%, at both sizes). The choice and its
timings go into ``LoadedBase.info["kernels"]``, the log, ``GET /v1/server`` and
``/ready``.

``LORADEX_KERNELS``: ``auto`` (default: measure), or force ``bnb`` / ``dense`` /
``native``. Unquantized bases have nothing to choose (``dense`` already); int8
stays ``bnb`` (LLM.int8's outlier split has no exact dense form here).
"""
from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from loradex.hub.errors import InvalidConfig

log = logging.getLogger("loradex.kernels")

MODES = ("auto", "bnb", "dense", "native")
ROUNDS = 3         # timed passes per candidate and batch size, interleaved (best kept)
DROP = 2.0         # a candidate this many times slower than the best at batch 1 is not timed at batch 8
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
    """The 4-bit layer's weights dequantized once into a plain Linear (same device).

    Only before the layer's first CPU forward on an avx512_bf16 CPU: that forward repacks the weights into
    bitsandbytes' own layout with bf16 scales (``packing_format_for_cpu``), which no longer dequantize to the
    NF4 values loaded; such a layer is refused with a clear error rather than copied wrong."""
    import bitsandbytes.functional as bnbf

    if getattr(mod.weight.quant_state, "packing_format_for_cpu", False):
        raise InvalidConfig("this 4-bit layer was already run by bitsandbytes on CPU, which repacked it with bf16 "
                            "scales; take its dense copy before the first forward")

    w = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(dtype)
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w.reshape(mod.out_features, mod.in_features))
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.to(dtype))
    lin.requires_grad_(False)
    return lin


def bnb_cpu_in_bf16(device: str) -> bool:
    """Whether bitsandbytes computes its 4-bit layers in bf16 here (CPU with avx512_bf16), not in the compute dtype."""
    if not device.startswith("cpu"):
        return False
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def dense_layers(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every 4-bit layer of ``model`` with its dense copy (the NF4 values, exactly, in ``dtype``); returns
    how many. Call it before any forward pass: bitsandbytes repacks its CPU weights on the first one."""
    layers = quantized_linears(model)
    _apply(model, {n: dense_copy(m, dtype) for n, m in layers.items()})
    return len(layers)


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
    """Seconds for one pass of ``mods`` over their inputs."""
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for m, x in zip(mods, xs):
            m(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t


def measure(candidates: dict[str, list[nn.Module]], dtype: torch.dtype, device: str,
            sizes: tuple[int, ...] = (1, 8)) -> dict:
    """Microseconds for one pass over every projection per candidate and batch size: ``{name_b1_us: ...}``.

    Every layer is visited, as a decode step does, so the weights come from memory and not from a cache
    that a single small layer would fit in. Per size: one untimed pass each (bitsandbytes repacks on its
    first CPU forward), then ROUNDS timed passes interleaved in rotating order, best kept. A candidate
    more than DROP times slower than the best at the first size is not timed at the next ones (it cannot
    win; this keeps a load from spending seconds timing bitsandbytes at batch 8).
    """
    first = next(iter(candidates.values()))
    out: dict = {}
    names = list(candidates)
    for size in sizes:
        xs = [torch.randn(size, 1, m.in_features, dtype=dtype, device=device) for m in first]
        for name in names:
            _time(candidates[name], xs, device)
        best = {name: float("inf") for name in names}
        for i in range(ROUNDS):
            for name in names[i % len(names):] + names[:i % len(names)]:
                best[name] = min(best[name], _time(candidates[name], xs, device))
        for name, t in best.items():
            out[f"{name}_b{size}_us"] = round(t * 1e6, 1)
        fastest = min(best.values())
        names = [n for n in names if best[n] <= DROP * fastest]
    return out


def native_copies(layers: dict[str, nn.Module], dense: dict[str, nn.Linear]) -> dict[str, nn.Module]:
    """The native NF4 layer for each 4-bit layer that rebuilds exactly (the rest keep their dense copy)."""
    from loradex.serving.native import NF4Linear

    out: dict[str, nn.Module] = {}
    for name, mod in layers.items():
        state = mod.weight.quant_state
        lin = None
        if getattr(state, "quant_type", "nf4") == "nf4":
            lin = NF4Linear.from_weight(dense[name].weight, state.code, dense[name].bias)
        out[name] = lin if lin is not None else dense[name]
    return out


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
    """On CPU in fp32: the (tied) fp32 LM head through torch, or natively on the same weights (read from an exact
    Q8 or bf16 copy when the weights have one), or (without native kernels) an fp16 copy; whichever is faster here."""
    from loradex.serving import native

    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or dtype != torch.float32 or device != "cpu":
        return {"lm_head": "as loaded", "reason": "only an fp32 head on CPU has a choice"}
    if native.library() is not None:
        # the same fp32 weights (no copy, still tied): only the speed differs
        alt, alt_name, margin = native.F32Linear(head.weight, head.bias), "native", 1.0
    else:
        # fp16 weights halve the bytes, but a CPU without fp16 arithmetic converts them, which costs more as
        # rows grow; and fp16 logits differ in the last bits, so it must win clearly
        alt, alt_name, margin = HalfLinear(head.weight, head.bias), "fp16", 0.9
    # batch 1 (a lone stream's decode) and batch 8 (a mixed batch's decode, a prefill's last tokens)
    timings = measure({"fp32": [head], alt_name: [alt]}, dtype, device)
    info = {"lm_head_timings": timings}
    if all(timings.get(f"{alt_name}_b{b}_us", float("inf")) < margin * timings.get(f"fp32_b{b}_us", float("inf"))
           for b in (1, 8)):
        model.lm_head = alt
        info["lm_head"] = alt_name
        if alt_name == "native":  # what the native head reads: fp32, or an exact compact copy (q8 / bf16)
            info["lm_head_weights"] = alt.form
    else:
        info["lm_head"] = "fp32"
    return info


def _apply(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, lin in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)


def choose(model: nn.Module, *, quantize: str, dtype: torch.dtype, device: str, mode: str | None = None) -> dict:
    """Pick the kernel for ``model``'s 4-bit layers and apply it; returns what was chosen and why."""
    from loradex.serving import native

    mode = mode or requested_mode()
    layers = quantized_linears(model)
    if quantize != "nf4" or not layers:
        return {"linear": "dense" if quantize == "none" else "bnb", "mode": mode,
                "reason": "nothing to choose for --quantize " + quantize}
    n_params = sum(m.in_features * m.out_features for m in layers.values())
    dense_bytes = n_params * torch.empty(0, dtype=dtype).element_size()
    avail = _available_bytes(device)
    fits = avail is None or dense_bytes <= MEMORY_SHARE * avail
    native_ok = device == "cpu" and dtype == torch.float32 and native.library() is not None
    info: dict = {"mode": mode, "dense_bytes": dense_bytes, "available_bytes": avail, "device": device,
                  "native": native.status() if device == "cpu" else {"available": False, "reason": "not on CPU"}}
    if mode in ("dense", "native") and not fits:
        raise InvalidConfig(f"LORADEX_KERNELS={mode}: the dense copy ({dense_bytes / 1e6:.0f} MB) it is built "
                            f"from does not fit in {MEMORY_SHARE:.0%} of available memory")
    if mode == "native" and not native_ok:
        why = info["native"]["reason"] if device == "cpu" and dtype == torch.float32 else "it runs on CPU in fp32 only"
        raise InvalidConfig(f"LORADEX_KERNELS=native: the native kernels are not available here ({why})")
    chosen: dict[str, nn.Module] | None = None
    if mode == "auto" and not fits:
        info.update(linear="bnb", reason=f"a dense copy ({dense_bytes / 1e6:.0f} MB) does not fit in "
                                         f"{MEMORY_SHARE:.0%} of available memory")
    elif mode == "auto":
        dense = {n: dense_copy(m, dtype) for n, m in layers.items()}
        candidates: dict[str, dict[str, nn.Module]] = {"bnb": layers, "dense": dense}
        if bnb_cpu_in_bf16(device) and dtype == torch.float32:
            del candidates["bnb"]  # faster or not, it would change the numbers the engine computes
            info["bnb_excluded"] = "bitsandbytes computes 4-bit layers in bf16 on this CPU (avx512_bf16)"
        if native_ok:
            candidates["native"] = native_copies(layers, dense)
        timings = measure({k: list(v.values()) for k, v in candidates.items()}, dtype, device)
        total = {k: timings[f"{k}_b1_us"] + timings[f"{k}_b8_us"] for k in candidates if f"{k}_b8_us" in timings}
        best = min(total, key=total.get)
        info.update(timings=timings, linear=best, reason="a pass over the {} projections at batch 1 / 8: {}".format(
            len(layers), ", ".join(f"{k} {timings[f'{k}_b1_us'] / 1000:.1f} / "
                                   + (f"{timings[f'{k}_b8_us'] / 1000:.1f}" if f"{k}_b8_us" in timings else "-")
                                   + " ms" for k in candidates)))
        if "bnb_excluded" in info:
            info["reason"] += "; bnb left out: " + info["bnb_excluded"]
        chosen = None if best == "bnb" else candidates[best]
    else:
        info.update(linear=mode, reason="LORADEX_KERNELS=" + mode)
        if mode != "bnb":
            dense = {n: dense_copy(m, dtype) for n, m in layers.items()}
            chosen = native_copies(layers, dense) if mode == "native" else dense
    if chosen is not None:
        if info["linear"] == "native":
            info["native_layers"] = sum(type(m).__name__ == "NF4Linear" for m in chosen.values())
        _apply(model, chosen)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if mode in ("auto", "native"):
        info.update(choose_lm_head(model, dtype, device))
    head = info.get("lm_head", "as loaded")
    if info.get("lm_head_weights"):
        head = f"{head} over {info['lm_head_weights']} weights"
    log.info("kernels: %s, lm_head %s (%s)", info["linear"], head, info["reason"])
    return info
