"""Forgetting: did fine-tuning make the base worse at plain general text?

A task adapter is trained to change some answers; it should not make the model
worse at everything else. The cheap check (PEFT added one for the same reason)
is held-out loss on general text: the **mean token NLL** of each passage of a
small general-text set, scored by the base and by base + adapter on the same
weights, as one eval serves them. The change adapter - base (nats/token,
positive = the adapter finds general text less likely = forgetting) is paired
per passage and reported with a 95% percentile-bootstrap CI
(:func:`evals.stats.paired_difference`, passages resampled as pairs).

The set ships with loradex: ``evals/data/general.jsonl``, 240 short passages of
plain prose on everyday, science, history, geography and practical topics,
written for loradex and released CC0 (``evals/data/README.md``). Passages are
scored as raw text (no chat template, no special tokens): every token after
the first is predicted from the ones before it.

Top to bottom::

    read passages -> catalog (short): resolve the version, its base row, the config
      -> load base (+ quantization) and the adapter (PEFT)
      -> per-passage NLL with the adapter, then with the adapter disabled
      -> summaries + paired difference -> catalog (short): forgetting_runs row

Run it with ``loradex eval REF --forgetting`` (alone, or beside ``--data FILE``).
The promotion gate refuses a version whose latest measurement under the serving
configuration regressed beyond ``LORADEX_GATE_MAX_FORGETTING`` nats/token
(default :data:`DEFAULT_MAX_FORGETTING`) at 95%, i.e. the CI's lower bound is
above it (:func:`forgetting_policy`).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from loradex.hub.catalog import borrowed
from loradex.hub.chat import pad_id
from loradex.hub.errors import InvalidConfig, InvalidData

from loradex.evals import stats

GENERAL_SET = Path(__file__).resolve().parent / "data" / "general.jsonl"
"""The shipped general-text set (CC0, written for loradex)."""

DEFAULT_MAX_FORGETTING = 0.1
"""Gate threshold, nats/token (about +10.5% perplexity): refuse when the 95% CI's lower bound is above it.

Measured on the default base (all 236 passages, fp32): the shipped pirate style adapter
changes held-out loss by +0.098 [95% CI +0.074, +0.122] (passes: not beyond 0.1 at 95%);
the same adapter with lora_B x 30 by +13.8 [+13.7, +13.9] (refused).
"""


def forgetting_policy() -> tuple[float | None, bool]:
    """(max regression in nats/token or None = off, whether a measurement is required) for the gate.

    From the environment of the process holding the catalog: ``LORADEX_GATE_MAX_FORGETTING``
    (a number >= 0, or ``off``; default 0.1) and ``LORADEX_GATE_REQUIRE_FORGETTING`` (``1`` to
    refuse versions never measured).
    """
    raw = os.environ.get("LORADEX_GATE_MAX_FORGETTING", "").strip().lower()
    if raw in ("off", "none", "no"):
        limit = None
    elif not raw:
        limit = DEFAULT_MAX_FORGETTING
    else:
        try:
            limit = float(raw)
        except ValueError:
            raise InvalidConfig(f"LORADEX_GATE_MAX_FORGETTING must be a number of nats/token or `off`, got {raw!r}") from None
        if not math.isfinite(limit) or limit < 0:
            raise InvalidConfig(f"LORADEX_GATE_MAX_FORGETTING must be >= 0 (or `off`), got {raw!r}")
    require = os.environ.get("LORADEX_GATE_REQUIRE_FORGETTING", "").strip().lower() in ("1", "true", "yes", "on")
    return limit, require


def read_passages(path: str | Path | None = None, limit: int | None = None) -> tuple[list[str], str, str]:
    """(passages, sha256 of the file, path) of a JSONL file of ``{"text": ...}`` rows (default: the shipped set)."""
    from loradex.hub.store import file_sha256

    p = Path(path) if path else GENERAL_SET
    if not p.is_file():
        raise InvalidData(f"forgetting set {p}: no such file")
    texts = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidData(f"{p}:{i}: not JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InvalidData(f"{p}:{i}: each line needs a non-empty \"text\" string")
        texts.append(text.strip())
    if not texts:
        raise InvalidData(f"forgetting set {p} has no passages")
    if limit is not None:
        texts = texts[:limit]
    return texts, file_sha256(p), str(p)


def passage_nlls(model, tokenizer, texts: list[str], *, batch_size: int = 16) -> tuple[list[float], int]:
    """(mean token NLL of each passage, scored tokens in all) under whatever ``model`` currently is."""
    import torch

    pad = pad_id(tokenizer)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for t, ids in zip(texts, encoded):
        if len(ids) < 2:
            raise InvalidData(f"forgetting passage {t[:40]!r} has fewer than 2 tokens")
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    result = [math.nan] * len(texts)
    tokens = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: position t predicts token t+1
            ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, :len(encoded[i])] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        valid = mask[:, 1:].to(device).bool()
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        nll = -(picked * valid).sum(dim=1) / valid.sum(dim=1)
        for row, i in enumerate(batch):
            result[i] = float(nll[row].item())
        tokens += int(valid.sum().item())
    return result, tokens


def measure_forgetting(
    catalog,
    store,
    ref,
    settings=None,
    *,
    data: str | Path | None = None,
    limit: int | None = None,
    quantize: str | None = None,
    as_served: bool = False,
    dtype: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
    seed: int = 0,
    eval_run_id: int | None = None,
    use_cache: bool = True,
) -> dict:
    """Score held-out loss of ``ref``'s base with and without the adapter on the general set; store and return the row.

    Quantization as :func:`evals.run.evaluate` chooses it: ``quantize`` if given,
    ``as_served`` = the default server's, else what the adapter was trained against.
    The row's ``serving_config`` / ``config_key`` say what it measured. The base's
    per-passage losses are cached in ``base_eval_cache`` (keyed by base digest, set
    sha256, n and configuration), so measuring a second adapter on the same base
    scores only the adapter side; ``use_cache=False`` recomputes them.
    """
    from peft import PeftModel

    from loradex.evals.config import EVAL_ENGINE, served_default, serving_config
    from loradex.evals.record import cached_base, store_forgetting
    from loradex.hub.store import manifest_digest
    from loradex.hub.bases import get_base
    from loradex.hub.loading import QUANTIZE_CHOICES, load_base, pick_device, pick_dtype
    from loradex.hub.registry import adapter_folder, resolve
    from loradex.hub.settings import Settings
    from loradex.hub.store import Store

    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidConfig(f"forgetting batch size must be a positive integer, got {batch_size!r}")
    settings = settings or Settings()
    store = store or Store(settings.store)
    started = time.perf_counter()
    texts, sha, path = read_passages(data, limit)
    dev = pick_device(device)
    with borrowed(catalog, settings) as cat:
        version = resolve(cat, ref) if not isinstance(ref, dict) else ref
        version, folder = adapter_folder(cat, store, version)
        trained_on = version.get("quantization") if version.get("quantization") in QUANTIZE_CHOICES else "none"
        served = served_default() if as_served else {}
        quant = quantize or served.get("quantize") or trained_on
        torch_dtype = pick_dtype(dev, dtype or served.get("dtype"))
        base_row = get_base(cat, version["base"], store=store)
        cfg = serving_config(base_row, quant, torch_dtype, dev, EVAL_ENGINE)
        key = _cache_key(cfg, manifest_digest(base_row["files"]), sha, len(texts))
        cached = cached_base(cat, key) if use_cache else None
    loaded = load_base(base_row["name"], quant, dev, catalog=catalog, store=store, settings=settings, dtype=cfg["dtype"])
    model = PeftModel.from_pretrained(loaded.model, str(folder), is_trainable=False)
    model.eval()
    t = time.perf_counter()
    adapter, tokens = passage_nlls(model, loaded.tokenizer, texts, batch_size=batch_size)
    if cached is not None:
        base = cached["nll"]
    else:
        with model.disable_adapter():
            base, _ = passage_nlls(model, loaded.tokenizer, texts, batch_size=batch_size)
    score_s = time.perf_counter() - t
    del model, loaded
    bad = [i for i, (a, b) in enumerate(zip(adapter, base)) if not (math.isfinite(a) and math.isfinite(b))]
    if bad:
        raise InvalidData(f"forgetting: passage {bad[0]} scored a non-finite loss (adapter {adapter[bad[0]]}, "
                          f"base {base[bad[0]]})")
    paired = stats.paired_difference(adapter, base, seed=seed)
    row = {"adapter_version_id": version["id"], "base": base_row["name"], "data_path": path, "data_sha256": sha,
           "n": len(texts), "tokens": tokens, "serving_config": cfg,
           "base_nll": stats.summarize(base, binary=False, seed=seed),
           "adapter_nll": stats.summarize(adapter, binary=False, seed=seed),
           "diff": paired["diff"], "ci_low": paired["ci_low"], "ci_high": paired["ci_high"],
           "method": paired["method"], "eval_run_id": eval_run_id,
           "duration_s": time.perf_counter() - started}
    cache = (key, base_row["name"], {"nll": base}) if cached is None and use_cache else None
    with borrowed(catalog, settings) as cat:
        stored = store_forgetting(cat, row, cache)
    return dict(stored, adapter=version["adapter"], version=version["version"], score_s=score_s,
                base_cached=cached is not None)


def _cache_key(cfg: dict, base_digest: str, data_sha256: str, n: int) -> str:
    """base_eval_cache key of the base's per-passage losses: everything that decides them."""
    import hashlib

    blob = json.dumps({"kind": "forgetting", "base": cfg["base"], "base_digest": base_digest, "data": data_sha256,
                       "n": n, "quantize": cfg["quantize"], "dtype": cfg["dtype"], "device": cfg["device"]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
