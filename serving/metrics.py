"""Serving metrics kept in memory and rendered as Prometheus text (exposition format 0.0.4).

Small on purpose (no prometheus-client dependency): counters, gauges and
histograms keyed by label tuples, guarded by one lock, since the engine thread
and the HTTP threads both record.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Iterable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


class Metrics:
    """Named metrics with fixed label names; render() gives the /metrics text."""

    def __init__(self, prefix: str = "loradex"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str, tuple[str, ...], tuple | None]] = {}
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[str, dict[tuple, list]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], Iterable[tuple[tuple, float]]]] = {}

    def counter(self, name: str, help_: str, labels: tuple[str, ...] = ()) -> None:
        self._meta[name] = ("counter", help_, labels, None)

    def histogram(self, name: str, help_: str, labels: tuple[str, ...] = (), buckets: tuple = LATENCY_BUCKETS) -> None:
        self._meta[name] = ("histogram", help_, labels, buckets)

    def gauge(self, name: str, help_: str, fn: Callable[[], Iterable[tuple[tuple, float]]],
              labels: tuple[str, ...] = ()) -> None:
        """A gauge read at render time: ``fn`` yields (label values, value)."""
        self._meta[name] = ("gauge", help_, labels, None)
        self._gauges[name] = fn

    def inc(self, name: str, *labels, by: float = 1.0) -> None:
        with self._lock:
            vals = self._values[name]
            vals[labels] = vals.get(labels, 0.0) + by

    def observe(self, name: str, value: float, *labels) -> None:
        buckets = self._meta[name][3]
        with self._lock:
            h = self._hist[name].get(labels)
            if h is None:
                h = self._hist[name][labels] = [[0] * len(buckets), 0, 0.0]
            for i, b in enumerate(buckets):
                if value <= b:
                    h[0][i] += 1
            h[1] += 1
            h[2] += value

    def value(self, name: str, *labels) -> float:
        """Current value of a counter (0 if never incremented)."""
        with self._lock:
            return self._values[name].get(labels, 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._values[name].values())

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            for name, (kind, help_, label_names, buckets) in self._meta.items():
                full = f"{self.prefix}_{name}"
                out.append(f"# HELP {full} {help_}")
                out.append(f"# TYPE {full} {kind}")
                if kind == "counter":
                    for labels, v in sorted(self._values[name].items()):
                        out.append(f"{full}{_labels(label_names, labels)} {v:g}")
                elif kind == "histogram":
                    for labels, (counts, n, total) in sorted(self._hist[name].items()):
                        for b, c in zip(buckets, counts):
                            out.append(f"{full}_bucket{_labels(label_names + ('le',), labels + (f'{b:g}',))} {c}")
                        out.append(f"{full}_bucket{_labels(label_names + ('le',), labels + ('+Inf',))} {n}")
                        out.append(f"{full}_sum{_labels(label_names, labels)} {total:g}")
                        out.append(f"{full}_count{_labels(label_names, labels)} {n}")
        for name, fn in self._gauges.items():
            full = f"{self.prefix}_{name}"
            label_names = self._meta[name][2]
            idx = out.index(f"# TYPE {full} gauge")
            lines = [f"{full}{_labels(label_names, labels)} {v:g}" for labels, v in fn()]
            out[idx + 1:idx + 1] = lines
        return "\n".join(out) + "\n"


def serving_metrics() -> Metrics:
    """The metric set the engine and the HTTP layer record into."""
    m = Metrics()
    m.counter("requests_total", "Requests finished, by adapter, path (base|adapter|merged) and outcome",
              ("adapter", "path", "outcome"))
    m.counter("prompt_tokens_total", "Prompt tokens processed, by adapter", ("adapter",))
    m.counter("generated_tokens_total", "Tokens generated, by adapter", ("adapter",))
    m.counter("errors_total", "Failed requests, by adapter and error type", ("adapter", "error"))
    m.histogram("request_latency_seconds", "Time from submission to the last token, by adapter", ("adapter",))
    m.histogram("time_to_first_token_seconds", "Time from submission to the first token, by adapter", ("adapter",))
    m.histogram("batch_size", "Rows in each forward pass (prefill and decode)", ("phase",), BATCH_BUCKETS)
    m.counter("adapter_loads_total", "Adapters loaded into the serving cache")
    m.counter("adapter_hits_total", "Requests whose adapter was already loaded")
    m.counter("adapter_evictions_total", "Adapters evicted from the serving cache (LRU)")
    m.counter("adapter_load_failures_total", "Adapter loads that failed (integrity, format)", ("adapter",))
    m.histogram("adapter_load_seconds", "Time to verify and load one adapter", (), LOAD_BUCKETS)
    m.counter("http_requests_total", "HTTP requests, by route and status", ("route", "status"))
    return m
