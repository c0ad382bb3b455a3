"""loradex against llama.cpp (llama-cpp-python), side by side on one machine, in one run.

What a CPU user would pick instead of loradex for one adapter: llama.cpp over
the base as an f16 GGUF with the adapter as a GGUF LoRA, both written by
``loradex export --format gguf-lora`` (the same code, ``promote/export``).
Every case gets the same prompt token ids (the base's chat template, encoded
once by the engine), greedy decoding, and a fixed length: loradex requests
carry ``ignore_eos`` (the vLLM extra the API accepts), llama.cpp is read for
exactly ``fixed_tokens`` tokens whatever it emits.

Cases, interleaved after a warm-up round:

    (e)   loradex engine as it serves by default: ``--quantize`` of the run (NF4 by default), its Linear kernel
          picked at load by measurement (``serving/kernels.py``), one request with an adapter
    (eb)  the same engine forced onto the bitsandbytes kernel (``LORADEX_KERNELS=bnb``: how NF4 was served
          before the kernel choice), one request, same adapter; skipped when (e) picked bitsandbytes anyway
    (l)   llama.cpp f16 GGUF + the adapter as GGUF LoRA, one request
    (e8)  loradex engine: 8 concurrent requests over 8 adapters, one continuous batch
    (l8)  llama.cpp: the same 8 one after another, switching the LoRA per request (what llama.cpp can do:
          one adapter set per context at a time)

Figures: tokens/s of each (prefill included: wall time from submission to the
last token), time to first token, and the ratios e/l (per stream, target
>= 0.7 floor, 1.0 goal), eb/l (the same before the kernel choice, no target)
and e8/l8 (8 adapters, target >= 4), each the median of per-round ratios. A
warm-up round of short requests comes first; the timed rounds rotate their
order. Without llama-cpp-python the benchmark reports that
in one line and no figures (not a failure).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import time
from pathlib import Path

from benchmarks.common import Metric, Report, interleave, log, ratios, summarize
from benchmarks.engine_api import PROMPTS, Round, engine_round, open_engine
from benchmarks.workspace import Workspace

NAME = "llamacpp"
ADAPTERS = 8


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def kernels_env(mode: str):
    """LORADEX_KERNELS set to ``mode`` while an engine loads (the kernel is chosen at load)."""
    old = os.environ.get("LORADEX_KERNELS")
    os.environ["LORADEX_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LORADEX_KERNELS", None)
        else:
            os.environ["LORADEX_KERNELS"] = old


class LlamaCppServer:
    """One llama.cpp context over the f16 base GGUF with every adapter loaded; one adapter applied per request."""

    def __init__(self, base_gguf: Path, loras: dict[str, Path], n_ctx: int, threads: int):
        import llama_cpp
        from llama_cpp import Llama

        self.lib = llama_cpp
        self.llm = Llama(model_path=str(base_gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False, seed=0)
        self.adapters = {}
        for name, path in loras.items():
            ad = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
            if not ad:
                raise RuntimeError(f"llama.cpp could not load the GGUF LoRA {path}")
            self.adapters[name] = ad
        self.current: str | None = None

    def use(self, name: str | None) -> None:
        if name == self.current:
            return
        if name is None:
            rc = self.lib.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            arr = (self.lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            scales = (ctypes.c_float * 1)(1.0)
            rc = self.lib.llama_set_adapters_lora(self.llm._ctx.ctx, arr, 1, scales)
        if rc:
            raise RuntimeError(f"llama.cpp refused to set adapter {name}")
        self.current = name

    def request(self, ids: list[int], adapter: str | None, n: int, t0: float) -> tuple[int, float, float]:
        """Greedy, exactly ``n`` tokens; returns (tokens, time to first token, time to last token) from t0."""
        self.use(adapter)
        first = None
        count = 0
        for _tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter() - t0
            if count >= n:
                break
        return count, first or 0.0, time.perf_counter() - t0

    def round(self, reqs: list[tuple[list[int], str | None]], n: int) -> Round:
        """Requests that all arrive at t0, served one after another."""
        t0 = time.perf_counter()
        tokens, ttft, lat = 0, [], []
        for ids, adapter in reqs:
            got, first, last = self.request(ids, adapter, n, t0)
            tokens += got
            ttft.append(first)
            lat.append(last)
        return Round(wall_s=time.perf_counter() - t0, tokens=tokens, latencies_s=lat, ttft_s=ttft)

    def close(self) -> None:
        try:
            self.use(None)
        finally:
            for ad in self.adapters.values():
                self.lib.llama_adapter_lora_free(ad)
            self.adapters = {}
            self.llm.close()


def export_ggufs(ws: Workspace, names: list[str]) -> tuple[Path, dict[str, Path]]:
    """``loradex export --format gguf-lora`` of the first adapter (base f16 GGUF + LoRA), the rest as LoRA only."""
    from loradex.hub.registry import adapter_folder
    from loradex.promote.export import gguf_lora
    from loradex.promote.export.run import export_adapter
    from loradex.promote.export.source import ExportOptions

    out = ws.root / "gguf"
    loras: dict[str, Path] = {}
    with ws.catalog() as cat:
        export_adapter(cat, ws.store, f"{names[0]}@1", out / names[0],
                       ExportOptions(format="gguf-lora", quant="f32", run_check=False), ws.settings)
        first = out / names[0]
        base_gguf = next(first.glob("*.f16.gguf"))
        loras[names[0]] = next(first.glob("*.lora.*.gguf"))
        for name in names[1:]:  # the same writer export uses, without rewriting the base each time
            _, folder = adapter_folder(cat, ws.store, f"{name}@1")
            path = out / f"{name}-v1.lora.f32.gguf"
            gguf_lora.write_lora_gguf(folder, ws.base_record["config"], path, dtype="f32", base_name=ws.base_name,
                                      name=f"{name}-v1")
            loras[name] = path
    return base_gguf, loras


def run(ws: Workspace, report: Report) -> dict:
    sizes = ws.sizes
    if not available():
        report.note("llama-cpp-python is not installed: no llama.cpp rows (bash .ci/setup_llamacpp.sh installs it)")
        return {"skipped": "llama-cpp-python is not installed"}
    if ws.device != "cpu":
        report.note("llama.cpp rows run on CPU only (this run is on CUDA; see `make bench-gpu` for vLLM)")
        return {"skipped": "not a CPU run"}
    n = sizes.fixed_tokens
    names = ws.register_adapters("lcpp", ADAPTERS)
    log("llamacpp: exporting the base and adapters as GGUF")
    base_gguf, loras = export_ggufs(ws, names)
    with ws.catalog() as cat:
        engine = bnb_engine = server = None
        try:
            log("llamacpp: loading the engines and llama.cpp")
            engine = open_engine(ws, cat, max_loaded=ADAPTERS, pin=names)  # LORADEX_KERNELS as set (auto)
            kernels = {"default": engine.loaded.info.get("kernels")}
            chosen = kernels["default"] or {}
            if chosen.get("linear") in ("dense", "native") or chosen.get("lm_head") in ("fp16", "native"):
                with kernels_env("bnb"):
                    bnb_engine = open_engine(ws, cat, max_loaded=ADAPTERS, pin=names)
                kernels["bnb"] = bnb_engine.loaded.info.get("kernels")
            ids = [engine.encode(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
                   for i in range(ADAPTERS)]
            server = LlamaCppServer(base_gguf, loras, n_ctx=max(len(x) for x in ids) + n + 8,
                                    threads=ws.settings.threads)

            def reqs(k: int, tokens: int) -> list[dict]:
                return [{"ids": ids[i], "adapter": names[i], "max_tokens": tokens, "ignore_eos": True} for i in range(k)]

            cases = {
                "e": lambda: engine_round(engine, reqs(1, n)),
                "l": lambda: server.round([(ids[0], names[0])], n),
                "e8": lambda: engine_round(engine, reqs(ADAPTERS, n)),
                "l8": lambda: server.round([(ids[i], names[i]) for i in range(ADAPTERS)], n),
            }
            if bnb_engine is not None:
                cases["eb"] = lambda: engine_round(bnb_engine, reqs(1, n))
            for _ in range(sizes.warmup):  # short requests: every path and adapter touched once
                for e in (engine, bnb_engine):
                    if e is not None:
                        engine_round(e, reqs(ADAPTERS, 4))
                server.round([(ids[i], names[i]) for i in range(ADAPTERS)], 4)
            rounds = interleave(cases, reps=sizes.reps, warmup=0)
        finally:
            if server is not None:
                server.close()
            for e in (engine, bnb_engine):
                if e is not None:
                    e.shutdown()
    for case, rs in rounds.items():
        want = n * (ADAPTERS if case.endswith("8") else 1)
        got = [r.tokens for r in rs]
        if any(t != want for t in got):
            raise RuntimeError(f"case {case}: expected {want} tokens per round (fixed length), got {got}")
    tps = {k: [r.tokens_per_s for r in v] for k, v in rounds.items()}
    ttft = {k: [1000 * sum(r.ttft_s) / len(r.ttft_s) for r in v] for k, v in rounds.items()}
    k = kernels["default"] or {}
    how = f"loradex {ws.quantize} ({k.get('linear', '?')} kernel, {k.get('lm_head', 'as loaded')} head)"
    report.add(Metric("llamacpp.engine_tokens_per_s", tps["e"], "tok/s", note=f"{how}, 1 stream, adapter, {n} tokens"))
    report.add(Metric("llamacpp.llamacpp_tokens_per_s", tps["l"], "tok/s", note="llama.cpp f16 GGUF + GGUF LoRA, 1 stream"))
    report.add(Metric("llamacpp.per_stream_ratio", ratios(tps["e"], tps["l"]), "x", 0.7, ">=",
                      "loradex / llama.cpp, per stream with an adapter (goal 1.0)"))
    if "eb" in tps:
        report.add(Metric("llamacpp.engine_bnb_tokens_per_s", tps["eb"], "tok/s",
                          note=f"loradex {ws.quantize} through bitsandbytes (LORADEX_KERNELS=bnb), 1 stream"))
        report.add(Metric("llamacpp.per_stream_bnb_ratio", ratios(tps["eb"], tps["l"]), "x",
                          note="the same before the kernel choice: bitsandbytes / llama.cpp"))
    report.add(Metric("llamacpp.engine_ttft_ms", ttft["e"], "ms", note="loradex, time to first token"))
    if "eb" in ttft:
        report.add(Metric("llamacpp.engine_bnb_ttft_ms", ttft["eb"], "ms", note="loradex bitsandbytes, time to first token"))
    report.add(Metric("llamacpp.llamacpp_ttft_ms", ttft["l"], "ms", note="llama.cpp, time to first token"))
    report.add(Metric("llamacpp.engine_8_adapters_tokens_per_s", tps["e8"], "tok/s",
                      note="loradex, 8 concurrent requests over 8 adapters"))
    report.add(Metric("llamacpp.llamacpp_8_sequential_tokens_per_s", tps["l8"], "tok/s",
                      note="llama.cpp, the same 8 one after another, LoRA switched per request"))
    report.add(Metric("llamacpp.eight_adapter_ratio", ratios(tps["e8"], tps["l8"]), "x", 4.0, ">=",
                      "loradex 8-adapter batch / llama.cpp sequential"))
    report.add(Metric("llamacpp.engine_8_ttft_ms", ttft["e8"], "ms", note="loradex, mean time to first token of the 8"))
    report.add(Metric("llamacpp.llamacpp_8_ttft_ms", ttft["l8"], "ms", note="llama.cpp, mean time to first token of the 8"))
    return {"fixed_tokens": n, "adapters": names, "kernels": kernels,
            "tokens_per_s": {k: summarize(v) for k, v in tps.items()},
            "ttft_ms": {k: summarize(v) for k, v in ttft.items()},
            "base_gguf_mb": round(base_gguf.stat().st_size / 1e6, 1)}
