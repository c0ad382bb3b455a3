"""What every benchmark shares: interleaved timing, statistics, result lines, machine info, JSON.

A benchmark measures the cases it compares in the same run, interleaved
(rep 1: A B C, rep 2: B C A, ...), after warm-up runs that are thrown away, and
reports the median with its spread (min-max over repetitions). A ratio is the
median of the per-repetition ratios, so slow moments on a shared machine hit
both sides of a comparison alike.

Each figure becomes a :class:`Metric` under a stable dotted key
(``serving.mixed_over_base``) and one printed line::

    serving.mixed_over_base            0.83 x      [0.80-0.85 n=3]  target >= 0.8   PASS
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

SCHEMA_VERSION = 1


# -- statistics ---------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; values need not be sorted."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize(values: list[float]) -> dict:
    """median, min, max, p25, p75, n and spread_pct ((max-min)/median) of repeated measurements."""
    if not values:
        return {"median": None, "min": None, "max": None, "p25": None, "p75": None, "n": 0, "spread_pct": None}
    med = float(statistics.median(values))
    lo, hi = float(min(values)), float(max(values))
    return {
        "median": med, "min": lo, "max": hi,
        "p25": percentile(values, 25), "p75": percentile(values, 75),
        "n": len(values),
        "spread_pct": (hi - lo) / med * 100.0 if med else None,
    }


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-repetition ratios of two interleaved series (pairs with a zero denominator dropped)."""
    return [a / b for a, b in zip(numerators, denominators) if b]


def interleave(cases: dict[str, Callable[[], Any]], *, reps: int, warmup: int = 1) -> dict[str, list[Any]]:
    """Run each case ``warmup`` times (discarded), then ``reps`` rounds in rotating order.

    Returns {case: [result of each timed call]}; a case returns whatever it
    measured (seconds, a dict of figures, ...).
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    out: dict[str, list[Any]] = {name: [] for name in names}
    for i in range(reps):
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            out[name].append(cases[name]())
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


# -- results ----------------------------------------------------------------------------
@dataclass
class Metric:
    """One reported figure under a stable key, with its spread and (optional) target."""

    key: str
    """Stable dotted key, e.g. ``serving.mixed_over_base``; later runs compare by it."""
    samples: list[float]
    """One value per timed repetition (a single value for one-off measurements)."""
    unit: str
    """``x`` for ratios, ``tok/s``, ``ms``, ``GB/s``, ``steps/s`` ..."""
    target: float | None = None
    """The goal this benchmark is held to, if any."""
    op: str | None = None
    """How ``value`` must compare with ``target``: ``>=`` or ``<=``."""
    note: str = ""
    """What was compared, in a few words (printed after the verdict)."""

    def __post_init__(self) -> None:
        if self.op not in (None, ">=", "<="):
            raise ValueError(f"Metric {self.key}: op must be '>=' or '<=', got {self.op!r}")
        if (self.target is None) != (self.op is None):
            raise ValueError(f"Metric {self.key}: target and op go together")
        self.samples = [float(s) for s in self.samples]

    @property
    def value(self) -> float | None:
        return summarize(self.samples)["median"]

    @property
    def passed(self) -> bool | None:
        value = self.value
        if self.target is None or value is None:
            return None
        return value >= self.target if self.op == ">=" else value <= self.target

    @property
    def noisy(self) -> bool:
        """The repetitions disagree by more than the figure itself: the verdict means little."""
        stats = summarize(self.samples)
        return stats["n"] > 1 and (stats["max"] - stats["min"]) > abs(stats["median"])

    def to_dict(self) -> dict:
        stats = summarize(self.samples)
        return {
            "value": stats["median"], "unit": self.unit, "min": stats["min"], "max": stats["max"],
            "n": stats["n"], "spread_pct": stats["spread_pct"], "samples": self.samples,
            "target": self.target, "op": self.op, "pass": self.passed, "noisy": self.noisy, "note": self.note,
        }

    def line(self) -> str:
        stats = summarize(self.samples)
        if stats["n"] == 0:
            figure = f"{'n/a':>10} {self.unit:<7} {'':<22}"
        elif stats["n"] == 1:
            figure = f"{_fmt(stats['median']):>10} {self.unit:<7} {'':<22}"
        else:
            spread = f"[{_fmt(stats['min'])}-{_fmt(stats['max'])} n={stats['n']}]"
            figure = f"{_fmt(stats['median']):>10} {self.unit:<7} {spread:<22}"
        if self.target is None:
            verdict = f"{'target -':<16} {'-':<4}"
        else:
            verdict = f"{'target ' + self.op + ' ' + _fmt(self.target):<16} {'PASS' if self.passed else 'MISS':<4}"
        note = f"{self.note} (NOISY: spread > value)" if self.noisy else self.note
        return f"{self.key:<38} {figure} {verdict}  {note}".rstrip()


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


class Report:
    """Collects the metrics of a run and prints each line as soon as it is measured."""

    def __init__(self, stream: TextIO | None = None):
        self.metrics: dict[str, Metric] = {}
        self.benchmarks: dict[str, dict] = {}
        self._stream = stream or sys.stdout

    def add(self, metric: Metric) -> Metric:
        if metric.key in self.metrics:
            raise ValueError(f"metric {metric.key} reported twice")
        self.metrics[metric.key] = metric
        print(metric.line(), file=self._stream, flush=True)
        return metric

    def note(self, text: str) -> None:
        print(f"  {text}", file=self._stream, flush=True)

    def heading(self, text: str) -> None:
        print(f"\n== {text}", file=self._stream, flush=True)

    def to_dict(self) -> dict:
        return {
            "metrics": {k: m.to_dict() for k, m in sorted(self.metrics.items())},
            "figures": {k: m.value for k, m in sorted(self.metrics.items())},
            "benchmarks": self.benchmarks,
        }


def log(msg: str) -> None:
    """Progress on stderr (the result table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- machine info ----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "duckdb", "fastapi",
                "uvicorn", "httpx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine_info() -> dict:
    """Where the figures were measured: CPU, memory, load, threads, accelerator, versions, commit."""
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": _mem_total_gb(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": _versions(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    return info


# -- JSON -----------------------------------------------------------------------------
def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` with sorted keys, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def compare_lines(previous: dict, current: dict) -> list[str]:
    """One line per figure present in both runs: old -> new and the change in percent."""
    old = previous.get("figures", {})
    lines = []
    for key, new in sorted(current.get("figures", {}).items()):
        before = old.get(key)
        if before is None or new is None:
            continue
        change = (new - before) / before * 100.0 if before else float("nan")
        lines.append(f"{key:<38} {_fmt(before):>10} -> {_fmt(new):<10} {change:+.1f}%")
    return lines
