"""``evaluate``: score an adapter version and its base on a held-out set, and store the run.

Top to bottom::

    read data (fail early on a bad line)
      -> catalog (short): resolve NAME[@V|@ALIAS], verify the adapter's sha256,
         look up the base's cached outputs on this data    [catalog closed]
      -> load base (load_base) + adapter (PEFT), generate greedily in batches,
         teacher-forced perplexity; base pass with adapter disabled, unless cached
      -> score (similarity / exact / perplexity), CIs, paired diff, win rate
      -> catalog (short): store eval_runs + eval_samples (+ base cache entry)

Plain Python::

    from loradex.evals import evaluate
    run = evaluate(None, store, "support-bot@production", "held_out.jsonl",
                   metrics=("similarity", "exact"), max_new_tokens=64, settings=settings)
    run["metrics"]["similarity"]  # {mean, n, ci_low, ci_high, method, std}
    run["paired"]["similarity"]   # {diff, ci_low, ci_high, ...}  adapter - base

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
from loradex.evals.config import EVAL_ENGINE, normalize_dtype, served_default, serving_config
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

    def __post_init__(self) -> None:
        self.metrics = parse_metrics(self.metrics)
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 4096:
            raise InvalidConfig(f"--max-new-tokens must be an integer in 1..4096, got {self.max_new_tokens!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise InvalidConfig(f"--limit must be a positive integer, got {self.limit!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 1024:
            raise InvalidConfig(f"--batch-size must be an integer in 1..1024, got {self.batch_size!r}")
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
    needs_gen = any(METRICS[m].needs_generation for m in cfg.metrics)
    return {
        "strategy": "greedy" if needs_gen else "none (teacher-forced only)",
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": cfg.max_new_tokens if needs_gen else None,
        "batch_size": cfg.batch_size,
        "padding_side": "left",
        "chat_template": "base tokenizer, add_generation_prompt=True",
        "skip_special_tokens": True,
        "quantize": quantize,
        "device": device.split(":")[0],
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
    }


def _score_side(model, tokenizer, items, cfg: EvalConfig, sim_model, tick) -> tuple[list[str] | None, dict]:
    """Outputs and per-item scores of whatever ``model`` currently is (adapter on or off)."""
    from loradex.evals.generate import generate_outputs, reference_perplexities
    from loradex.evals.metrics import exact_scores, similarity_scores

    refs = [it.reference for it in items]
    outputs = None
    scores: dict[str, list[float]] = {}
    if any(METRICS[m].needs_generation for m in cfg.metrics):
        outputs = generate_outputs(model, tokenizer, items, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, on_batch=tick)
    if "similarity" in cfg.metrics:
        scores["similarity"] = similarity_scores(sim_model, outputs, refs)
    if "exact" in cfg.metrics:
        scores["exact"] = exact_scores(outputs, refs)
    if "perplexity" in cfg.metrics:
        scores["perplexity"] = reference_perplexities(model, tokenizer, items, batch_size=cfg.batch_size, on_batch=tick)
    return outputs, scores


def evaluate(
    catalog,
    store,
    ref,
    data: str | Path,
    metrics=("similarity",),
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    settings=None,
    *,
    quantize: str | None = None,
    device: str = "auto",
    use_cache: bool = True,
    progress: bool = False,
    as_served: bool = False,
    dtype: str | None = None,
) -> dict:
    """Evaluate adapter ``ref`` (``"NAME[@V|@ALIAS]"``, a Ref or a version row) on ``data``; return the stored run.

    ``catalog``: an open :class:`hub.catalog.Catalog`, or ``None`` to open short-lived
    ones from ``settings`` (default: the environment) around the model work.
    ``store``: the artifact store (default: ``Store(settings.store)``).
    The returned dict is the ``eval_runs`` row (``id``, ``metrics``, ``base_metrics``,
    ``paired``, ``win_rate``, ``decoding``, ``serving_config``, ``config_key``, ...) plus
    ``adapter``, ``version`` and ``trained_quantization``.

    Quantization: ``quantize`` if given; ``as_served=True`` takes the default
    server's (nf4); else what the adapter was trained against (none for LoRA).
    """
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store, manifest_digest

    cfg = EvalConfig(metrics=metrics, max_new_tokens=max_new_tokens, limit=limit, batch_size=batch_size, seed=seed,
                     quantize=quantize, as_served=as_served, dtype=dtype, device=device, use_cache=use_cache,
                     progress=progress)
    settings = settings or Settings()
    store = store or Store(settings.store)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    eval_set = read_eval_set(data, cfg.limit)
    items = eval_set.items

    from loradex.hub.bases import get_base
    from loradex.hub.loading import load_base, pick_device, pick_dtype
    from loradex.hub.registry import adapter_folder, resolve
    from loradex.evals.record import cache_key, cached_base, store_run

    dev = pick_device(cfg.device)
    metric_model = similarity_model_info() if "similarity" in cfg.metrics else None
    with borrowed(catalog, settings) as cat:
        version = resolve(cat, ref) if not isinstance(ref, dict) else ref
        version, folder = adapter_folder(cat, store, version)
        trained_on = version.get("quantization") if version.get("quantization") in QUANTIZE_CHOICES else "none"
        served = served_default() if cfg.as_served else {}
        quant = cfg.quantize or served.get("quantize") or trained_on
        torch_dtype = pick_dtype(dev, cfg.dtype or served.get("dtype"))
        decoding = _decoding(cfg, quant, dev, torch_dtype, len(items))
        base_row = get_base(cat, version["base"], store=store)
        # what these scores describe; a server with the same key serves these numbers
        serving = serving_config(base_row, quant, torch_dtype, dev, EVAL_ENGINE)
        key = cache_key(base=base_row["name"], base_digest=manifest_digest(base_row["files"]),
                        data_sha256=eval_set.sha256, n=len(items), decoding=decoding, metrics=cfg.metrics,
                        metric_model=metric_model or "")
        cached = cached_base(cat, key) if cfg.use_cache else None
    timings["prepare_s"] = time.perf_counter() - started

    t = time.perf_counter()
    from peft import PeftModel

    loaded = load_base(base_row["name"], quant, dev, catalog=catalog, store=store, settings=settings,
                       dtype=serving["dtype"])
    model = PeftModel.from_pretrained(loaded.model, str(folder), is_trainable=False)
    model.eval()
    tokenizer = loaded.tokenizer
    sim_model = None
    if "similarity" in cfg.metrics:
        from loradex.evals.metrics import load_similarity_model

        sim_model = load_similarity_model("cpu")
    timings["load_s"] = time.perf_counter() - t

    passes = (sum(1 for m in ("similarity", "exact") if m in cfg.metrics) > 0) + ("perplexity" in cfg.metrics)
    sides = 1 if cached is not None else 2
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items) * passes * sides, desc=f"eval {version['adapter']}@{version['version']}",
                   unit="item", file=sys.stderr)
    tick = bar.update if bar is not None else None
    try:
        t = time.perf_counter()
        outputs, scores = _score_side(model, tokenizer, items, cfg, sim_model, tick)
        timings["adapter_s"] = time.perf_counter() - t
        if cached is None:
            t = time.perf_counter()
            with model.disable_adapter():
                base_outputs, base_scores = _score_side(model, tokenizer, items, cfg, sim_model, tick)
            timings["base_s"] = time.perf_counter() - t
        else:
            base_outputs, base_scores = cached["outputs"], cached["scores"]
            timings["base_s"] = 0.0
    finally:
        if bar is not None:
            bar.close()
    del model, loaded

    summary, base_summary, paired = {}, {}, {}
    for m in cfg.metrics:
        spec = METRICS[m]
        summary[m] = stats.summarize(scores[m], binary=spec.binary, seed=cfg.seed)
        base_summary[m] = stats.summarize(base_scores[m], binary=spec.binary, seed=cfg.seed)
        paired[m] = stats.paired_difference(scores[m], base_scores[m], seed=cfg.seed)
        paired[m]["higher_is_better"] = spec.higher_is_better
    primary = primary_metric(cfg.metrics)
    win = stats.win_rate(scores[primary], base_scores[primary], higher_is_better=METRICS[primary].higher_is_better)
    win["metric"] = primary
    duration = time.perf_counter() - started
    timings["total_s"] = duration
    timings["per_item_s"] = duration / len(items)
    decoding_record = dict(decoding, eval_config=asdict(cfg) | {"metrics": list(cfg.metrics)},
                           data_format=eval_set.format, primary_metric=primary, base_cached=cached is not None,
                           timings=timings)
    samples = []
    for i, it in enumerate(items):
        samples.append({
            "idx": i, "prompt": it.prompt_text, "reference": it.reference,
            "output": outputs[i] if outputs is not None else None,
            "base_output": base_outputs[i] if base_outputs is not None else None,
            "scores": {m: scores[m][i] for m in cfg.metrics},
            "base_scores": {m: base_scores[m][i] for m in cfg.metrics},
        })
    run = {"adapter_version_id": version["id"], "base": base_row["name"], "data_path": eval_set.path,
           "data_sha256": eval_set.sha256, "n": len(items), "metrics": summary, "base_metrics": base_summary,
           "paired": paired, "win_rate": win, "decoding": decoding_record, "metric_model": metric_model,
           "seed": cfg.seed, "duration_s": duration, "serving_config": serving}
    cache_entry = None
    if cached is None and cfg.use_cache:
        cache_entry = (key, base_row["name"], {"outputs": base_outputs, "scores": base_scores})
    with borrowed(catalog, settings) as cat:
        stored = store_run(cat, run, samples, cache_entry)
    return dict(stored, trained_quantization=trained_on)
