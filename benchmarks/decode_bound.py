"""Decode at batch 1 against the memory-bandwidth bound.

Generating one token at batch 1 reads every weight once (a matrix-vector
product per layer), so no implementation can beat::

    bound tok/s = memory bandwidth (bytes/s) / bytes of weights read per token

* bandwidth: measured here, copying a large buffer with torch on the same
  thread count the model uses (bytes read + bytes written per second; a
  read-only sum is reported beside it);
* bytes per token: the storage of every weight a token touches at the loaded
  quantization: packed 4-bit weights plus their quantization constants for NF4,
  full-precision norms and the (tied, unquantized) lm_head, one embedding row
  (a native head that reads an exact Q8 or bf16 copy counts that copy, not the fp32 matrix);
* tokens/s: greedy decode of ``decode_tokens`` tokens minus a 1-token run (the
  prefill), interleaved, so only decode steps are counted.

The fraction is reported for loradex's engine (``decode.fraction_of_bound``)
and for plain ``model.generate`` (transformers) beside it.
"""
from __future__ import annotations

import time

from benchmarks.common import Metric, Report, interleave, log, ratios, summarize
from benchmarks.workspace import Workspace

NAME = "decode_bound"
PROMPT = "Write a long story about a lighthouse keeper who finds a map."


def memory_bandwidth(mb: int, reps: int = 5) -> dict:
    """Copy (read+write) and read-only GB/s of ``reps`` runs; the bound uses the best copy run."""
    import torch

    n = mb * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    copies, reads = [], []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        copies.append(2 * n * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        float(src.sum())
        reads.append(n * 4 / (time.perf_counter() - t) / 1e9)
    return {"read_gbs": max(reads), "copy_samples": copies, "read_samples": reads,
            "buffer_mb": mb}


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _quant_state_bytes(qs) -> int:
    """Bytes of a bitsandbytes QuantState's constants (absmax, code, nested state for double quant)."""
    import torch

    total = 0
    for attr in ("absmax", "code", "offset"):
        val = getattr(qs, attr, None)
        if isinstance(val, torch.Tensor):
            total += _tensor_bytes(val)
    nested = getattr(qs, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def weight_bytes_per_token(model) -> dict:
    """Bytes of weights one decode step reads, by kind (linear, lm_head, norm, embedding)."""
    import torch

    seen: set[int] = set()
    out = {"linear": 0, "lm_head": 0, "norm": 0, "embedding": 0, "other": 0}
    modules = list(model.named_modules())
    # The lm_head is read in full every token; count it first so a tied
    # embedding matrix is not counted twice (the embedding reads one row).
    modules.sort(key=lambda item: 0 if item[0].endswith("lm_head") else 1)
    for name, mod in modules:
        if list(mod.children()):
            continue
        if isinstance(mod, torch.nn.Embedding):  # one row per token, even when the matrix is the tied lm_head
            out["embedding"] += mod.weight.shape[1] * mod.weight.element_size()
            continue
        kind = "lm_head" if name.endswith("lm_head") else "norm" if "norm" in type(mod).__name__.lower() else (
            "linear" if isinstance(mod, torch.nn.Linear) or hasattr(mod, "in_features") else "other")
        tensors = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if getattr(mod, "packed", None) is not None:  # a native head over an exact compact copy reads only that
            tensors = [t for t in (mod.packed, mod.scales, getattr(mod, "bias", None)) if t is not None]
        for t in tensors:
            if t.data_ptr() in seen or t.device.type == "meta":
                continue
            seen.add(t.data_ptr())
            out[kind] += _tensor_bytes(t)
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                out[kind] += _quant_state_bytes(qs)
    out = {k: v for k, v in out.items() if v}
    out["total"] = sum(out.values())
    return out


def hf_decoder(loaded):
    """fn(n_tokens) -> (seconds, tokens) for plain transformers greedy generation at batch 1."""
    import torch

    tok = loaded.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    enc = {k: v.to(loaded.device) for k, v in enc.items()}

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t, out.shape[1] - enc["input_ids"].shape[1]

    return run


def decode_rates(decoders: dict, n: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """{name: [decode tok/s per rep]}: (tokens(n) - 1) / (t(n) - t(1)), runs interleaved.

    Subtracting a 1-token run removes the prefill (and per-request overhead),
    leaving the decode steps alone.
    """
    cases = {}
    for name, fn in decoders.items():
        cases[f"{name}:1"] = lambda fn=fn: fn(1)
        cases[f"{name}:n"] = lambda fn=fn: fn(n)
    times = interleave(cases, reps=reps, warmup=warmup)
    rates = {}
    for name in decoders:
        rates[name] = [(got - 1) / (tn - t1) for (tn, got), (t1, _) in zip(times[f"{name}:n"], times[f"{name}:1"])
                       if tn > t1 and got > 1]
    return rates


def run(ws: Workspace, report: Report) -> dict:
    from benchmarks import engine_api
    from loradex.hub.loading import load_base

    sizes = ws.sizes
    bw = memory_bandwidth(sizes.bandwidth_mb)
    log(f"decode: memory bandwidth copy {max(bw['copy_samples']):.1f} GB/s, read {bw['read_gbs']:.1f} GB/s")
    n = max(sizes.decode_tokens, 2)
    with ws.catalog() as cat:
        loaded = load_base(ws.base_name, quantize=ws.quantize, device=ws.device, catalog=cat, store=ws.store)
        engine = engine_api.open_engine(ws, cat)
        # what the engine reads per token, after its kernel choice at load (serving/kernels.py): a dense copy
        # of NF4 layers or an fp16 LM head changes the bytes, so the bound is the engine's own
        per_token = weight_bytes_per_token(engine.loaded.model)
        hf_per_token = weight_bytes_per_token(loaded.model)
        kernels = engine.loaded.info.get("kernels") or {}
        try:
            decoders = {"hf": hf_decoder(loaded), "engine": engine_api.batch1_decoder(engine, PROMPT)}
            rates = decode_rates(decoders, n, sizes.reps, sizes.warmup)
        finally:
            engine.shutdown()
    bound = max(bw["copy_samples"]) * 1e9 / per_token["total"]
    hf_bound = max(bw["copy_samples"]) * 1e9 / hf_per_token["total"]

    report.add(Metric("decode.mem_bandwidth_gbs", [max(bw["copy_samples"])], "GB/s",
                      note=f"best of {len(bw['copy_samples'])}, torch copy {bw['buffer_mb']} MB, read+write, {ws.settings.threads} thread(s); "
                           f"read-only {bw['read_gbs']:.1f} GB/s"))
    report.add(Metric("decode.bytes_per_token_mb", [per_token["total"] / 1e6], "MB",
                      note=f"{ws.quantize} weights as the engine serves them ({kernels.get('linear', '?')} kernel, "
                           f"{kernels.get('lm_head', 'as loaded')} head): "
                           + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in per_token.items() if k != "total")))
    report.add(Metric("decode.bound_tokens_per_s", [bound], "tok/s", note="bandwidth / bytes per token"))
    for name, values in rates.items():
        label = "loradex engine" if name == "engine" else "transformers generate"
        report.add(Metric(f"decode.{name}_tokens_per_s", values, "tok/s", note=f"batch 1, {label}"))
    report.add(Metric("decode.fraction_of_bound", [r / bound for r in rates["engine"]], "x",
                      note="loradex engine tok/s / bound"))
    report.add(Metric("decode.hf_fraction_of_bound", [r / hf_bound for r in rates["hf"]], "x",
                      note=f"transformers generate tok/s / its own bound ({hf_per_token['total'] / 1e6:.0f} MB per token)"))
    report.add(Metric("decode.engine_over_hf", ratios(rates["engine"], rates["hf"]), "x",
                      note="loradex engine vs transformers generate, batch 1"))
    return {"bandwidth": bw, "bytes_per_token": per_token, "bound_tokens_per_s": bound, "kernels": kernels,
            "hf_bytes_per_token": hf_per_token,
            "tokens_per_s": {k: summarize(v) for k, v in rates.items()}}
