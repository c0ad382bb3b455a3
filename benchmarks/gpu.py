"""`make bench-gpu`: the serving suite on CUDA with a local 1B-8B base, and vLLM multi-LoRA side by side.

    python -m benchmarks.gpu --base-dir /models/Llama-3.2-1B-Instruct            # or LORADEX_GPU_BASE=...
    python -m benchmarks.gpu --base-dir DIR --quick --out bench-results/gpu.json
    python -m benchmarks.gpu --base-dir DIR --vllm off                              # loradex only

Two parts, one JSON:

1. the loradex suite (``benchmarks.run``: decode_bound, serving_mixed, scaling,
   cold_load, http) with ``--device cuda`` on that base (``--quantize``, NF4 by
   default; kernel picked at load);
2. HTTP side by side, the same OpenAI requests to each server in turn
   (interleaved rounds): ``loradex serve`` and, when vLLM is there, ``vllm serve
   BASE --enable-lora --max-loras 8`` with the same 8 adapters as LoRA modules.
   Greedy, fixed length (``ignore_eos``, which both servers accept): one
   request with an adapter (per stream, and its time to first token, streamed)
   and 8 concurrent requests over 8 adapters. Ratios loradex / vLLM.

vLLM is found as ``LORADEX_VLLM_PYTHON`` (a python with vllm), else the
current python if it imports vllm, else a ``vllm`` executable on PATH. Without
CUDA the command says so and exits 2; without vLLM part 2 measures loradex only
and says so.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Metric, Report, interleave, log, machine_info, ratios, summarize, write_json
from benchmarks.engine_api import PROMPTS
from benchmarks.http import free_port, start_server, stop_server
from benchmarks.workspace import PRESETS, close_workspace, open_workspace

SUITE = ["decode_bound", "serving_mixed", "scaling", "cold_load", "http"]
ADAPTERS = 8
READY_TIMEOUT_S = 900


def vllm_command() -> list[str] | None:
    """How to start vLLM's OpenAI server here, or None when vLLM is not installed."""
    py = os.environ.get("LORADEX_VLLM_PYTHON")
    if py:
        return [py, "-m", "vllm.entrypoints.openai.api_server"]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    exe = shutil.which("vllm")
    return [exe, "serve"] if exe else None


def start_vllm(cmd: list[str], base_dir: Path, loras: dict[str, Path], rank: int, port: int, log_path: Path,
               gpu_share: float) -> subprocess.Popen:
    import httpx

    args = list(cmd)
    if args[-1] == "serve":
        args.append(str(base_dir))
    else:
        args += ["--model", str(base_dir)]
    args += ["--port", str(port), "--host", "127.0.0.1", "--enable-lora", "--max-loras", str(len(loras)),
             "--max-lora-rank", str(max(8, rank)), "--gpu-memory-utilization", str(gpu_share),
             "--served-model-name", "base", "--lora-modules",
             *[f"{name}={path}" for name, path in loras.items()]]
    proc = subprocess.Popen(args, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}: {log_path.read_text(errors='replace')[-1500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"vLLM was not ready after {READY_TIMEOUT_S}s")


async def _round(url: str, models: list[str], prompt_ids: list[list[int]], n: int) -> dict:
    """Concurrent streamed /v1/completions (token-id prompts, greedy, exactly n tokens); tok/s and TTFT."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        t0 = time.perf_counter()

        async def one(model: str, ids: list[int]) -> tuple[float, float, int]:
            body = {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            first, tokens = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"{url}: /v1/completions -> {resp.status_code}: {(await resp.aread())[:300]}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"]["completion_tokens"])
            return first or 0.0, time.perf_counter() - t0, tokens

        got = await asyncio.gather(*(one(m, ids) for m, ids in zip(models, prompt_ids)))
    wall = max(g[1] for g in got)
    tokens = sum(g[2] for g in got)
    if tokens != n * len(models):
        raise RuntimeError(f"{url}: expected {n * len(models)} tokens (ignore_eos), got {tokens}")
    return {"tokens_per_s": tokens / wall, "ttft_ms": 1000 * sum(g[0] for g in got) / len(got)}


def side_by_side(ws, report: Report, n: int, reps: int, vllm: str, gpu_share: float) -> dict:
    """Part 2: loradex serve vs vLLM over HTTP, same requests."""
    from loradex.hub.registry import adapter_folder

    names = ws.register_adapters("gpu", ADAPTERS, seed0=5000)
    with ws.catalog() as cat:
        folders = {name: adapter_folder(cat, ws.store, name)[1] for name in names}
    from loradex.hub.chat import encode_chat
    from loradex.hub.loading import load_tokenizer

    tok = load_tokenizer(ws.base_folder)

    ids = [encode_chat(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(ADAPTERS)]
    home = ws.root / "server-home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ws.settings.catalog_path, home / "catalog.duckdb")
    servers: dict[str, tuple[str, list[str]]] = {}
    procs = []
    notes = {}
    try:
        port = free_port()
        log(f"gpu: starting loradex serve on {port}")
        procs.append(start_server(ws, home, port, names, ws.root / "loradex.log"))
        servers["loradex"] = (f"http://127.0.0.1:{port}", names)
        cmd = vllm_command() if vllm != "off" else None
        if cmd is None:
            notes["vllm"] = "not installed" if vllm != "off" else "--vllm off"
            report.note(f"vLLM: {notes['vllm']}; loradex rows only")
        else:
            vport = free_port()
            log(f"gpu: starting vLLM on {vport}: {' '.join(cmd)}")
            procs.append(start_vllm(cmd, ws.base_folder, folders, ws.sizes.rank, vport, ws.root / "vllm.log", gpu_share))
            servers["vllm"] = (f"http://127.0.0.1:{vport}", names)
        cases = {}
        for label, (url, models) in servers.items():
            cases[f"{label}_1"] = lambda url=url, models=models: asyncio.run(_round(url, models[:1], ids[:1], n))
            cases[f"{label}_8"] = lambda url=url, models=models: asyncio.run(_round(url, models, ids, n))
        rounds = interleave(cases, reps=reps, warmup=1)
    finally:
        for p in procs:
            stop_server(p)
    tps = {k: [r["tokens_per_s"] for r in v] for k, v in rounds.items()}
    ttft = {k: [r["ttft_ms"] for r in v] for k, v in rounds.items()}
    for k in rounds:
        server, case = k.rsplit("_", 1)
        what = "1 stream with an adapter" if case == "1" else "8 concurrent requests over 8 adapters"
        report.add(Metric(f"gpu.{server}_{case}_tokens_per_s", tps[k], "tok/s", note=f"{server} over HTTP, {what}"))
        report.add(Metric(f"gpu.{server}_{case}_ttft_ms", ttft[k], "ms", note=f"{server}, mean time to first token"))
    if "vllm" in servers:
        report.add(Metric("gpu.per_stream_over_vllm", ratios(tps["loradex_1"], tps["vllm_1"]), "x", 0.7, ">=",
                          "loradex / vLLM, one stream with an adapter"))
        report.add(Metric("gpu.eight_adapters_over_vllm", ratios(tps["loradex_8"], tps["vllm_8"]), "x", 0.7, ">=",
                          "loradex / vLLM multi-LoRA, 8 adapters at once"))
    return {"fixed_tokens": n, "adapters": names, "notes": notes,
            "tokens_per_s": {k: summarize(v) for k, v in tps.items()},
            "ttft_ms": {k: summarize(v) for k, v in ttft.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-dir", type=Path, default=os.environ.get("LORADEX_GPU_BASE"),
                   help="local model folder (1B-8B, Llama family); default $LORADEX_GPU_BASE")
    p.add_argument("--quick", action="store_true", help="the quick preset for the suite, 2 rounds side by side")
    p.add_argument("--quantize", default="nf4", help="loradex base quantization: none, nf4 or int8 (default nf4)")
    p.add_argument("--vllm", choices=("auto", "off"), default="auto", help="run vLLM side by side when installed")
    p.add_argument("--tokens", type=int, default=128, help="fixed new tokens per request side by side")
    p.add_argument("--gpu-share", type=float, default=0.4, help="vLLM --gpu-memory-utilization (it shares the GPU)")
    p.add_argument("--out", type=Path, default=Path("bench-results/gpu.json"), help="JSON output")
    p.add_argument("--cache-dir", type=Path, default=Path("bench-results/cache"))
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench-gpu: error: CUDA is not available on this machine", file=sys.stderr)
        return 2
    if a.base_dir is None or not (Path(a.base_dir) / "config.json").is_file():
        print("bench-gpu: error: give a local model folder with --base-dir or LORADEX_GPU_BASE", file=sys.stderr)
        return 2
    from benchmarks.run import RunConfig, run_benchmarks

    preset = "quick" if a.quick else "full"
    suite_out = a.out.with_name(a.out.stem + "-suite.json")
    report = Report()
    suite = run_benchmarks(RunConfig(preset=preset, only=SUITE, out=suite_out, base_dir=Path(a.base_dir),
                                     quantize=a.quantize, device="cuda", cache_dir=a.cache_dir), report)
    ws = open_workspace(sizes=PRESETS[preset], base_dir=Path(a.base_dir), quantize=a.quantize, device="cuda",
                        cache_dir=a.cache_dir)
    report.heading("side by side over HTTP")
    entry: dict = {"status": "ok"}
    try:
        entry["details"] = side_by_side(ws, report, a.tokens, 2 if a.quick else 3, a.vllm, a.gpu_share)
    except Exception as exc:  # the suite's figures still get written
        import traceback

        entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        report.note(f"side by side FAILED: {entry['error']}")
    finally:
        close_workspace(ws)
    report.benchmarks["side_by_side"] = entry
    payload = dict(report.to_dict(), machine=machine_info(), suite=suite_out.name,
                   settings={"base_dir": str(a.base_dir), "quantize": a.quantize, "tokens": a.tokens, "preset": preset,
                             "vllm": " ".join(vllm_command() or []) or None})
    payload["benchmarks"].update({k: v for k, v in suite["benchmarks"].items()})
    write_json(a.out, payload)
    print(f"\nwritten to {a.out} (suite alone: {suite_out})")
    failed = [k for k, v in payload["benchmarks"].items() if v.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
