"""``evaluate`` / ``evaluate_many``: score adapter versions and their base on a held-out set, and store the runs.

Top to bottom::

    read data (fail early on a bad line)
      -> catalog (short): resolve every NAME[@V|@ALIAS] (and --all-of NAME), verify each adapter's sha256,
         look up the base's cached outputs on this data    [catalog closed]
      -> open the serving engine on the base (as `loradex serve` loads it), pin the adapters,
         generate greedily for every adapter and the base in shared batches (evals/engine_eval.py),
         teacher-forced perplexity per side; the base pass is skipped when cached
      -> score (similarity / exact / perplexity), CIs, paired diff, win rate, per adapter
      -> catalog (short): store one eval_runs row + eval_samples per adapter (+ base cache entry once)

Plain Python::

    from loradex.evals import evaluate, evaluate_many
    run = evaluate(None, store, "support-bot@production", "held_out.jsonl",
                   metrics=("similarity", "exact"), max_new_tokens=64, settings=settings)
    run["metrics"]["similarity"]  # {mean, n, ci_low, ci_high, method, std}
    run["paired"]["similarity"]   # {diff, ci_low, ci_high, ...}  adapter - base
    runs = evaluate_many(None, store, ["pirate@1", "pirate@2", "shouty"], "held_out.jsonl", settings=settings)

One adapter or many, generation goes through the same engine, so a run's
outputs are what ``loradex serve`` answers under its serving configuration.

Pass an open ``catalog`` to use it throughout (it stays open while the model
runs), or ``None`` to open short-lived catalogs from ``settings`` so other
processes can use the catalog while the model generates (what the CLI does).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loradex.hub.catalog import borrowed
from loradex.hub.errors import InvalidConfig
from loradex.hub.loading import QUANTIZE_CHOICES

from loradex.evals import stats
from loradex.evals.config import SERVE_ENGINE, normalize_dtype, served_default, serving_config
from loradex.evals.data import read_eval_set
from loradex.evals.metrics import METRICS, parse_metrics, primary_metric, similarity_model_info


@dataclass
class EvalConfig:
    """How an eval runs; saved with every run (``eval_runs.decoding.eval_config``)."""

    metrics: tuple = ("similarity",)
    """Metrics to compute (--metrics): similarity, exact, perplexity."""
    max_new_tokens: int = 64
    """Greedy tokens generated per item (--max-new-tokens)."""
    limit: int | None = None
    """Score only the first N items of the file (--limit); the data hash stays the file's."""
    batch_size: int = 8
    """Items per generation / perplexity batch (--batch-size)."""
    seed: int = 0
    """Seed of the bootstrap resampling (--seed); generation is greedy and needs none."""
    quantize: str | None = None
    """Load the base as none | nf4 | int8 (--quantize); default: what the adapter was trained against, else none."""
    as_served: bool = False
    """Score under what ``loradex serve`` runs by default (--as-served): its quantization and compute dtype."""
    dtype: str | None = None
    """Compute dtype fp32 | bf16 | fp16 (--dtype); default as the server's: fp32 on CPU, bf16 on CUDA."""
    device: str = "auto"
    """auto | cpu | cuda[:N] (--device)."""
    use_cache: bool = True
    """Reuse the base's cached outputs on the same data and decoding (--no-cache turns it off)."""
    progress: bool = False
    """Show a progress bar on stderr."""
    batch_invariant: bool = False
    """Each row's forward runs by itself, so outputs do not depend on batch size or neighbours (--batch-invariant)."""

    def __post_init__(self) -> None:
        self.metrics = parse_metrics(self.metrics)
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 4096:
            raise InvalidConfig(f"--max-new-tokens must be an integer in 1..4096, got {self.max_new_tokens!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise InvalidConfig(f"--limit must be a positive integer, got {self.limit!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 1024:
            raise InvalidConfig(f"--batch-size must be an integer in 1..1024, got {self.batch_size!r}")
        if not isinstance(self.batch_invariant, bool):
            raise InvalidConfig(f"--batch-invariant is a switch (true or false), got {self.batch_invariant!r}")
        if not isinstance(self.seed, int):
            raise InvalidConfig(f"--seed must be an integer, got {self.seed!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise InvalidConfig(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.dtype is not None:
            self.dtype = normalize_dtype(self.dtype)
        if self.as_served:
            served = served_default()
            if self.quantize is not None and self.quantize != served["quantize"]:
                raise InvalidConfig(f"--as-served scores under the default server's --quantize {served['quantize']}; "
                                    f"drop --quantize {self.quantize} or --as-served")
            if self.dtype is not None and self.dtype != (normalize_dtype(served["dtype"]) if served["dtype"] else None):
                raise InvalidConfig(f"--as-served scores under the default server's dtype "
                                    f"({served['dtype'] or 'fp32 on CPU, bf16 on CUDA'}); drop --dtype {self.dtype} or --as-served")


def _decoding(cfg: EvalConfig, quantize: str, device: str, dtype, n: int) -> dict:
    """The settings that decide every side's outputs (part of the base cache's key; batch composition is not)."""
    needs_gen = any(METRICS[m].needs_generation for m in cfg.metrics)
    return {
        "strategy": "greedy" if needs_gen else "none (teacher-forced only)",
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": cfg.max_new_tokens if needs_gen else None,
        "batch_size": cfg.batch_size,
        "batch_invariant": cfg.batch_invariant,
        "engine": SERVE_ENGINE,
        "padding_side": "right",
        "chat_template": "base tokenizer, add_generation_prompt=True",
        "skip_special_tokens": True,
        "quantize": quantize,
        "device": device.split(":")[0],
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
    }


def _scores(outputs: list[str] | None, ppl: list[float] | None, items, cfg: EvalConfig, sim_model) -> dict:
    """Per-item scores of one side from its outputs (and perplexities)."""
    from loradex.evals.metrics import exact_scores, similarity_scores

    refs = [it.reference for it in items]
    scores: dict[str, list[float]] = {}
    if "similarity" in cfg.metrics:
        scores["similarity"] = similarity_scores(sim_model, outputs, refs)
    if "exact" in cfg.metrics:
        scores["exact"] = exact_scores(outputs, refs)
    if "perplexity" in cfg.metrics:
        scores["perplexity"] = ppl
    return scores


def resolve_refs(catalog, refs=(), all_of=()) -> list[dict]:
    """Version rows for ``refs`` (NAME, NAME@V, NAME@ALIAS or rows) plus every ready version of each ``all_of`` NAME.

    In the order given, each version once (``pirate`` and ``pirate@2`` may be the same version).
    """
    from loradex.hub.errors import NotFound
    from loradex.hub.registry import list_adapters, resolve

    rows: list[dict] = []
    for ref in refs:
        rows.append(ref if isinstance(ref, dict) else resolve(catalog, ref))
    for name in all_of:
        resolve(catalog, name)  # NotFound with a did-you-mean when the name is unknown
        versions = sorted(r["version"] for r in list_adapters(catalog) if r["adapter"] == name)
        if not versions:
            raise NotFound(f"adapter {name!r} has no ready version")
        rows += [resolve(catalog, f"{name}@{v}") for v in versions]
    seen: set[int] = set()
    unique = [r for r in rows if not (r["id"] in seen or seen.add(r["id"]))]
    if not unique:
        raise InvalidConfig("name at least one adapter to evaluate (NAME, NAME@V, NAME@ALIAS or --all-of NAME)")
    bases = sorted({r["base"] for r in unique})
    if len(bases) > 1:
        raise InvalidConfig(f"one eval runs adapters of one base; these are for {', '.join(bases)}: "
                            f"evaluate each base's adapters separately")
    return unique


def evaluate(catalog, store, ref, data: str | Path, **options) -> dict:
    """Evaluate adapter ``ref`` (``"NAME[@V|@ALIAS]"``, a Ref or a version row) on ``data``; return the stored run.

    :func:`evaluate_many` with one adapter, with the same keyword options (``metrics``,
    ``max_new_tokens``, ``limit``, ``batch_size``, ``seed``, ``settings``, ``quantize``, ``device``,
    ``use_cache``, ``progress``, ``as_served``, ``dtype``, ``batch_invariant``).
    ``catalog``: an open :class:`hub.catalog.Catalog`, or ``None`` to open short-lived
    ones from ``settings`` (default: the environment) around the model work.
    ``store``: the artifact store (default: ``Store(settings.store)``).
    The returned dict is the ``eval_runs`` row (``id``, ``metrics``, ``base_metrics``,
    ``paired``, ``win_rate``, ``decoding``, ``serving_config``, ``config_key``, ...) plus
    ``adapter``, ``version`` and ``trained_quantization``.

    Quantization: ``quantize`` if given; ``as_served=True`` takes the default
    server's (nf4); else what the adapter was trained against (none for LoRA).
    """
    if "all_of" in options:
        raise TypeError("evaluate() takes one adapter; use evaluate_many(..., all_of=...) for a whole family")
    return evaluate_many(catalog, store, [ref], data, **options)[0]


def evaluate_many(
    catalog,
    store,
    refs,
    data: str | Path,
    metrics=("similarity",),
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    settings=None,
    *,
    all_of=(),
    quantize: str | None = None,
    device: str = "auto",
    use_cache: bool = True,
    progress: bool = False,
    as_served: bool = False,
    dtype: str | None = None,
    batch_invariant: bool = False,
) -> list[dict]:
    """Evaluate several adapter versions of one base in one pass; one stored run each, in the order given.

    ``refs``: references or version rows; ``all_of``: names whose every ready version
    is added. The base's outputs are generated once (or taken from the cache) and
    shared by every run; each run is stored exactly as a single eval stores it.
    """
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store, manifest_digest

    cfg = EvalConfig(metrics=metrics, max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size, seed=seed,
                     quantize=quantize, as_served=as_served, dtype=dtype, device=device, use_cache=use_cache,
                     progress=progress, batch_invariant=batch_invariant)
    settings = settings or Settings()
    store = store or Store(settings.store)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    eval_set = read_eval_set(data, cfg.limit)
    items = eval_set.items

    from loradex.hub.bases import get_base
    from loradex.hub.loading import pick_device, pick_dtype
    from loradex.hub.registry import adapter_folder
    from loradex.evals.engine_eval import Side, generate_sides, open_engine, side_perplexities
    from loradex.evals.record import cache_key, cached_base, store_run

    dev = pick_device(cfg.device)
    metric_model = similarity_model_info() if "similarity" in cfg.metrics else None
    with borrowed(catalog, settings) as cat:
        versions = [adapter_folder(cat, store, row)[0] for row in resolve_refs(cat, refs, all_of)]
        trained = {v["id"]: (v.get("quantization") if v.get("quantization") in QUANTIZE_CHOICES else "none")
                   for v in versions}
        served = served_default() if cfg.as_served else {}
        quant = cfg.quantize or served.get("quantize")
        if quant is None:  # as trained: one engine, so the adapters must agree
            kinds = sorted(set(trained.values()))
            if len(kinds) > 1:
                listing = ", ".join(f"{v['adapter']}@{v['version']}: {trained[v['id']]}" for v in versions)
                raise InvalidConfig(f"these adapters were trained under different quantizations ({listing}); "
                                    f"give --quantize or --as-served to score them under one configuration")
            quant = kinds[0]
        torch_dtype = pick_dtype(dev, cfg.dtype or served.get("dtype"))
        decoding = _decoding(cfg, quant, dev, torch_dtype, len(items))
        base_row = get_base(cat, versions[0]["base"], store=store)
        # what these scores describe; a server with the same key serves these numbers, token for token
        serving = serving_config(base_row, quant, torch_dtype, dev, SERVE_ENGINE)
        key = cache_key(base=base_row["name"], base_digest=manifest_digest(base_row["files"]),
                        data_sha256=eval_set.sha256, n=len(items), decoding=decoding, metrics=cfg.metrics,
                        metric_model=metric_model or "")
        cached = cached_base(cat, key) if cfg.use_cache else None
    timings["prepare_s"] = time.perf_counter() - started

    sides = [Side(f"{v['adapter']}@{v['version']}", v) for v in versions]
    base_side = Side(base_row["name"], None)
    gen_sides = sides + ([base_side] if cached is None else [])
    needs_gen = any(METRICS[m].needs_generation for m in cfg.metrics)
    rows_per_batch = cfg.batch_size * len(gen_sides)
    t = time.perf_counter()
    engine = open_engine(base_row["name"], quantize=quant, device=dev, dtype=serving["dtype"], adapters=versions,
                         rows_per_batch=rows_per_batch, max_rows=len(items) * len(gen_sides),
                         max_new_tokens=cfg.max_new_tokens, batch_invariant=cfg.batch_invariant,
                         catalog=catalog, store=store, settings=settings)
    sim_model = None
    if "similarity" in cfg.metrics:
        from loradex.evals.metrics import load_similarity_model

        sim_model = load_similarity_model("cpu")
    timings["load_s"] = time.perf_counter() - t

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        total = len(items) * len(gen_sides) * (int(needs_gen) + int("perplexity" in cfg.metrics))
        what = sides[0].label if len(sides) == 1 else f"{len(sides)} adapters"
        bar = tqdm(total=total, desc=f"eval {what}", unit="row", file=sys.stderr)
    tick = bar.update if bar is not None else None
    outputs: dict[str, list[str] | None] = {s.label: None for s in gen_sides}
    ppl: dict[str, list[float] | None] = {s.label: None for s in gen_sides}
    try:
        t = time.perf_counter()
        if needs_gen:
            outputs = generate_sides(engine, items, gen_sides, max_new_tokens=cfg.max_new_tokens, on_row=tick)
        timings["generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if "perplexity" in cfg.metrics:
            # batch-invariant: one item per forward, so no neighbour's padding changes a row's numbers
            ppl_batch = 1 if cfg.batch_invariant else cfg.batch_size
            for s in gen_sides:
                ppl[s.label] = side_perplexities(engine, items, s, batch_size=ppl_batch, on_batch=tick)
        timings["perplexity_s"] = time.perf_counter() - t
    finally:
        if bar is not None:
            bar.close()
        engine.shutdown()
    del engine

    t = time.perf_counter()
    if cached is None:
        base_outputs = outputs[base_side.label]
        base_scores = _scores(base_outputs, ppl[base_side.label], items, cfg, sim_model)
    else:
        base_outputs, base_scores = cached["outputs"], cached["scores"]
    side_scores = {s.label: _scores(outputs[s.label], ppl[s.label], items, cfg, sim_model) for s in sides}
    timings["score_s"] = time.perf_counter() - t
    duration = time.perf_counter() - started
    timings["total_s"] = duration
    timings["per_item_s"] = duration / len(items)
    batch = {"sides": [s.label for s in gen_sides], "adapters": len(sides), "base_generated": cached is None,
             "items_per_batch": cfg.batch_size, "max_rows_per_forward": 1 if cfg.batch_invariant else rows_per_batch,
             "rows": len(items) * len(gen_sides),
             "mode": ("per-row forwards (batch-invariant)" if cfg.batch_invariant
                      else "continuous batching: rows of every side share forwards, joining between decode steps")}
    primary = primary_metric(cfg.metrics)
    runs = []
    cache_entry = None
    if cached is None and cfg.use_cache:
        cache_entry = (key, base_row["name"], {"outputs": base_outputs, "scores": base_scores})
    for s in sides:
        scores = side_scores[s.label]
        adapter_outputs = outputs[s.label]
        summary, base_summary, paired = {}, {}, {}
        for m in cfg.metrics:
            spec = METRICS[m]
            summary[m] = stats.summarize(scores[m], binary=spec.binary, seed=cfg.seed)
            base_summary[m] = stats.summarize(base_scores[m], binary=spec.binary, seed=cfg.seed)
            paired[m] = stats.paired_difference(scores[m], base_scores[m], seed=cfg.seed)
            paired[m]["higher_is_better"] = spec.higher_is_better
        win = stats.win_rate(scores[primary], base_scores[primary], higher_is_better=METRICS[primary].higher_is_better)
        win["metric"] = primary
        decoding_record = dict(decoding, eval_config=asdict(cfg) | {"metrics": list(cfg.metrics)},
                               data_format=eval_set.format, primary_metric=primary, base_cached=cached is not None,
                               batch=batch, timings=timings)
        samples = []
        for i, it in enumerate(items):
            samples.append({
                "idx": i, "prompt": it.prompt_text, "reference": it.reference,
                "output": adapter_outputs[i] if adapter_outputs is not None else None,
                "base_output": base_outputs[i] if base_outputs is not None else None,
                "scores": {m: scores[m][i] for m in cfg.metrics},
                "base_scores": {m: base_scores[m][i] for m in cfg.metrics},
            })
        run = {"adapter_version_id": s.row["id"], "base": base_row["name"], "data_path": eval_set.path,
               "data_sha256": eval_set.sha256, "n": len(items), "metrics": summary, "base_metrics": base_summary,
               "paired": paired, "win_rate": win, "decoding": decoding_record, "metric_model": metric_model,
               "seed": cfg.seed, "duration_s": duration, "serving_config": serving}
        with borrowed(catalog, settings) as cat:
            stored = store_run(cat, run, samples, cache_entry)
        cache_entry = None  # the base's outputs enter the cache once
        runs.append(dict(stored, trained_quantization=trained[s.row["id"]]))
    return runs
