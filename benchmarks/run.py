"""Run the loradex benchmarks and write one JSON file of figures.

    python -m benchmarks.run                      # everything, full sizes (< 15 min on 2 CPU cores)
    python -m benchmarks.run --quick              # smaller sizes, for development
    python -m benchmarks.run --only catalog --only decode_bound
    python -m benchmarks.run --out bench-results/latest.json --compare bench-results/previous.json

Each benchmark prints one line per figure (value, spread, target, PASS/MISS)
and the run writes every figure under a stable key, with machine info, to
``--out``. Benchmarks run in a fresh temporary LORADEX_HOME (the user's catalog
is never touched); the default base is converted once into ``--cache-dir``.
Torch uses LORADEX_THREADS threads (default 1). Exit status: 0 when every
benchmark ran (misses included), 1 when one failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.common import SCHEMA_VERSION, Report, compare_lines, log, machine_info, write_json
from benchmarks.workspace import PRESETS, Sizes, close_workspace, open_workspace

# name -> module; run in this order (cheap and engine-independent first).
BENCHMARKS: dict[str, str] = {
    "catalog": "benchmarks.catalog",
    "decode_bound": "benchmarks.decode_bound",
    "serving_mixed": "benchmarks.serving_mixed",
    "scaling": "benchmarks.scaling",
    "cold_load": "benchmarks.cold_load",
    "llamacpp": "benchmarks.llamacpp",
    "http": "benchmarks.http",
    "eval_many": "benchmarks.eval_many",
    "training": "benchmarks.training",
}


@dataclass
class RunConfig:
    """What ``python -m benchmarks.run`` was asked to do."""

    preset: str = "full"
    """Size preset: full, quick or smoke (flags --quick / --smoke)."""
    reps: int | None = None
    """Timed repetitions per compared case, overriding the preset's (--reps)."""
    only: list[str] = field(default_factory=list)
    """Benchmarks to run (--only, repeatable); empty means all."""
    skip: list[str] = field(default_factory=list)
    """Benchmarks to leave out (--skip, repeatable)."""
    out: Path = Path("bench-results/latest.json")
    """Where the JSON goes (--out)."""
    compare: Path | None = None
    """A previous JSON to print changes against (--compare)."""
    base_dir: Path | None = None
    """A model folder to benchmark instead of the default base (--base-dir)."""
    quantize: str = "nf4"
    """Base quantization for serving and decode (--quantize none|nf4|int8)."""
    device: str = "auto"
    """auto, cpu or cuda (--device)."""
    cache_dir: Path = Path("bench-results/cache")
    """Where the converted default base is kept between runs (--cache-dir)."""
    keep: bool = False
    """Keep the temporary LORADEX_HOME for inspection (--keep)."""
    profile: bool = False
    """Run each benchmark under torch.profiler and write its top ops beside --out (--profile)."""

    def __post_init__(self) -> None:
        from loradex.hub.errors import InvalidConfig
        from loradex.hub.loading import QUANTIZE_CHOICES

        if self.preset not in PRESETS:
            raise InvalidConfig(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for flag, names in (("--only", self.only), ("--skip", self.skip)):
            unknown = [n for n in names if n not in BENCHMARKS]
            if unknown:
                raise InvalidConfig(f"{flag} {', '.join(unknown)}: unknown benchmark; choose from {', '.join(BENCHMARKS)}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidConfig(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.base_dir is not None and not (Path(self.base_dir) / "config.json").is_file():
            raise InvalidConfig(f"--base-dir {self.base_dir}: not a model folder (no config.json)")
        if self.reps is not None and self.reps < 1:
            raise InvalidConfig(f"--reps must be >= 1, got {self.reps}")
        if self.compare is not None and not Path(self.compare).is_file():
            raise InvalidConfig(f"--compare {self.compare}: no such file")

    @property
    def selected(self) -> list[str]:
        chosen = self.only or list(BENCHMARKS)
        return [n for n in BENCHMARKS if n in chosen and n not in self.skip]

    @property
    def sizes(self) -> Sizes:
        sizes = PRESETS[self.preset]
        return sizes if self.reps is None else replace(sizes, reps=self.reps)


def run_benchmarks(config: RunConfig, report: Report | None = None) -> dict:
    """Run the selected benchmarks; returns the JSON payload (also written to ``config.out``)."""
    report = report or Report()
    started = time.time()
    t0 = time.perf_counter()
    ws = open_workspace(sizes=config.sizes, base_dir=config.base_dir, quantize=config.quantize,
                        device=config.device, cache_dir=config.cache_dir)
    payload: dict = {
        "schema": SCHEMA_VERSION,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "config": {"preset": config.preset, "reps": config.reps, "only": config.only, "skip": config.skip, "out": str(config.out)},
        "machine": machine_info(),
        "settings": {"preset": config.preset, "sizes": asdict(config.sizes), "base": ws.base_name,
                     "base_dir": str(ws.base_folder), "quantize": config.quantize, "device": ws.device,
                     "threads": ws.settings.threads},
    }
    print(f"loradex benchmarks ({config.preset}): base {ws.base_name} [{config.quantize}] on {ws.device}, "
          f"{ws.settings.threads} torch thread(s), load {payload['machine']['load_avg']}", flush=True)
    try:
        for name in config.selected:
            report.heading(name)
            t = time.perf_counter()
            entry: dict = {"status": "ok"}
            try:
                module = importlib.import_module(BENCHMARKS[name])
                if config.profile:
                    entry["details"], entry["profile"] = profiled(module.run, ws, report, config.out, name)
                else:
                    entry["details"] = module.run(ws, report)
            except Exception as exc:  # one failing benchmark must not cost the others' figures
                entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()}
                report.note(f"{name} FAILED: {type(exc).__name__}: {exc}")
                log(traceback.format_exc())
            entry["seconds"] = round(time.perf_counter() - t, 2)
            report.benchmarks[name] = entry
            log(f"{name} done in {entry['seconds']:.0f}s")
    finally:
        close_workspace(ws, keep=config.keep)
    payload.update(report.to_dict())
    payload["total_seconds"] = round(time.perf_counter() - t0, 2)
    payload["load_avg_end"] = list(os.getloadavg())
    write_json(config.out, payload)
    return payload


def profiled(fn, ws, report: Report, out: Path, name: str) -> tuple[dict, str]:
    """Run ``fn(ws, report)`` under torch.profiler (CPU ops of every thread); write the top ops by self time.

    Profiling slows what it watches: figures from a --profile run are for
    finding the bottleneck, not for comparison.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        details = fn(ws, report)
    path = Path(out).parent / f"profile-{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    report.note(f"profile: {path}")
    return details, str(path)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes for development runs")
    size.add_argument("--smoke", action="store_true", help="tiny sizes that only prove each benchmark runs")
    p.add_argument("--reps", type=int, help="timed repetitions per compared case (default: the preset's)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave this benchmark out (repeatable)")
    p.add_argument("--out", type=Path, default=Path("bench-results/latest.json"), help="JSON output file")
    p.add_argument("--compare", type=Path, help="a previous JSON output to print changes against")
    p.add_argument("--base-dir", type=Path, help="benchmark this model folder instead of the default base")
    p.add_argument("--quantize", default="nf4", help="base quantization: none, nf4 or int8 (default nf4)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--cache-dir", type=Path, default=Path("bench-results/cache"),
                   help="where the converted default base is kept between runs")
    p.add_argument("--keep", action="store_true", help="keep the temporary LORADEX_HOME")
    p.add_argument("--profile", action="store_true",
                   help="run under torch.profiler and write profile-NAME.txt beside --out (slows the run)")
    a = p.parse_args(argv)
    preset = "quick" if a.quick else "smoke" if a.smoke else "full"
    return RunConfig(preset=preset, reps=a.reps, only=a.only, skip=a.skip, out=a.out, compare=a.compare, base_dir=a.base_dir,
                     quantize=a.quantize, device=a.device, cache_dir=a.cache_dir, keep=a.keep,
                     profile=a.profile)


def main(argv: list[str] | None = None) -> int:
    from loradex.hub.errors import LoradexError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        config = parse_args(argv)
    except LoradexError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    previous = json.loads(config.compare.read_text()) if config.compare else None
    payload = run_benchmarks(config)
    failed = [n for n, b in payload["benchmarks"].items() if b["status"] != "ok"]
    missed = [k for k, m in payload["metrics"].items() if m["pass"] is False]
    print(f"\n{len(payload['metrics'])} figures, {len(missed)} below target"
          f"{' (' + ', '.join(missed) + ')' if missed else ''}; "
          f"{len(failed)} benchmark(s) failed{' (' + ', '.join(failed) + ')' if failed else ''}; "
          f"{payload['total_seconds']:.0f}s; written to {config.out}")
    if previous is not None:
        print(f"\nchanges against {config.compare}:")
        before, now = previous.get("settings", {}), payload["settings"]
        for field_name in ("sizes", "base", "quantize", "device", "threads"):
            if before.get(field_name) != now.get(field_name):
                print(f"  (the runs differ in {field_name}: figures are not comparable one to one)")
        for line in compare_lines(previous, payload):
            print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
