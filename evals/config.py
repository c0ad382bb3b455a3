"""The serving configuration a score was measured under, and its stable key.

A score only describes what is served when both ran the same numbers: the same
base weights, quantization, compute dtype and device type. A LoRA adapter
trained on the fp32 base scored 0.580 exact match evaluated as trained and
0.263 behind the default NF4 server; nothing in the hub said so. Every eval
run therefore records::

    serving_config = {base, base_digest, quantize, dtype, device, engine}
    config_key     = "BASE@DIGEST12/QUANTIZE/DTYPE/DEVICE"   e.g. smollm2-135m-instruct@1f3c0a9e22b1/nf4/fp32/cpu

``config_key`` is what is compared (a running server builds the same dict with
:func:`serving_config` and looks scores up by its key). ``engine`` (which code
generated the tokens) is recorded for the audit trail but is not part of the
key: evals now generate on the server's own engine (:mod:`evals.engine_eval`),
runs stored before that used ``transformers.generate`` on a PEFT model, and
greedy decoding on the same weights is what a score promises about a server,
not the loop that drives it.

:func:`served_default` says what ``loradex serve`` runs with no flags
(its ``EngineConfig`` defaults), so ``eval --as-served``, the leaderboard's
``--config as-served`` and the gate's advice follow it if it changes.
"""
from __future__ import annotations

from loradex.hub.errors import InvalidConfig
from loradex.hub.loading import QUANTIZE_CHOICES

EVAL_ENGINE = "transformers.generate+peft"
"""What evals generated with before they moved to the serving engine (older runs record it)."""
SERVE_ENGINE = "loradex-engine"
"""What ``loradex serve`` and ``loradex eval`` drive: serving/engine.py's continuous batcher over serving/lora.py."""

_DTYPES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}


def normalize_dtype(dtype) -> str:
    """``torch.float32`` / ``"float32"`` / ``"fp32"`` -> ``"fp32"`` (likewise bf16, fp16)."""
    text = str(dtype).replace("torch.", "")
    if text not in _DTYPES:
        raise InvalidConfig(f"--dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    return _DTYPES[text]


def default_dtype(device: str) -> str:
    """The compute dtype hub.loading picks when none is given: fp32 on CPU, bf16 on CUDA."""
    # hub.loading.pick_dtype falls back to fp16 on CUDA without bf16; a key records what actually loaded.
    return "bf16" if device_type(device) == "cuda" else "fp32"


def device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``; ``cpu`` -> ``cpu``."""
    return str(device).split(":")[0]


def serving_config(base_row: dict, quantize: str, dtype, device: str, engine: str = EVAL_ENGINE) -> dict:
    """The configuration a model ran under: base + its files' digest, quantize, compute dtype, device type, engine.

    ``base_row`` is the catalog's ``bases`` row (``name`` and ``files`` = {file: sha256});
    the digest is :func:`hub.store.manifest_digest` of those files, as the catalog knows them.
    """
    from loradex.hub.store import manifest_digest

    if quantize not in QUANTIZE_CHOICES:
        raise InvalidConfig(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    files = base_row.get("files")
    return {"base": base_row["name"], "base_digest": manifest_digest(files) if files else None,
            "quantize": quantize, "dtype": normalize_dtype(dtype), "device": device_type(device), "engine": engine}


def config_key(cfg: dict | None) -> str | None:
    """``BASE@DIGEST12/QUANTIZE/DTYPE/DEVICE``, or None when the config is unknown (old runs without a quantize)."""
    if not cfg or not cfg.get("quantize") or not cfg.get("dtype") or not cfg.get("device"):
        return None
    digest = (cfg.get("base_digest") or "unknown")[:12]
    return f"{cfg['base']}@{digest}/{cfg['quantize']}/{cfg['dtype']}/{cfg['device']}"


def config_label(cfg: dict | None) -> str:
    """Short human label, e.g. ``nf4/fp32 cpu``; ``unknown`` for runs recorded before configs were."""
    if not cfg or not cfg.get("quantize"):
        return "unknown"
    return f"{cfg['quantize']}/{cfg.get('dtype') or '?'} {cfg.get('device') or '?'}"


def served_default() -> dict:
    """What ``loradex serve`` runs with no flags: ``{"quantize": ..., "dtype": None}`` (None = the device's default)."""
    from loradex.serving.config import EngineConfig

    return {"quantize": EngineConfig.quantize, "dtype": EngineConfig.dtype}


def default_served_config(base_row: dict, device: str | None = None) -> dict:
    """The configuration ``loradex serve --base BASE`` runs with no other flags on ``device`` (default: this machine's).

    For listings without a running server (``loradex show``, the promotion gate):
    ``scores_for_config(catalog, default_served_config(base_row))`` gives each version's
    score as the default server would serve it.
    """
    if device is None:
        from loradex.hub.loading import pick_device

        device = pick_device("auto")
    d = served_default()
    return serving_config(base_row, d["quantize"], d["dtype"] or default_dtype(device), device, SERVE_ENGINE)


def is_served_default(cfg: dict | None) -> bool:
    """Whether ``cfg`` is what ``loradex serve --base cfg.base`` runs with no other flags on its device."""
    if not cfg or not cfg.get("quantize"):
        return False
    d = served_default()
    dtype = normalize_dtype(d["dtype"]) if d["dtype"] else default_dtype(cfg["device"])
    return cfg["quantize"] == d["quantize"] and cfg.get("dtype") == dtype


def from_decoding(base_row: dict | None, base: str, decoding: dict | None, engine: str = EVAL_ENGINE) -> dict | None:
    """A run's config rebuilt from what it recorded in ``decoding`` (quantize, dtype, device), for old rows.

    None when the run did not record its quantization. ``base_row`` may be None (a
    base since deleted): the digest is then unknown.
    """
    decoding = decoding or {}
    quantize, dtype, device = decoding.get("quantize"), decoding.get("dtype"), decoding.get("device")
    if quantize not in QUANTIZE_CHOICES or not dtype or not device:
        return None
    try:
        dtype = normalize_dtype(dtype)
    except InvalidConfig:
        return None
    row = base_row if base_row is not None else {"name": base, "files": None}
    cfg = serving_config(row, quantize, dtype, device, engine)
    cfg["derived_from"] = "decoding"  # rebuilt by the 007 migration, digest = the base's files at that time
    return cfg


def config_filter(spec: str | None):
    """A predicate over (config, key) for ``--config KEY|as-served|QUANT``; None keeps everything.

    ``none``/``nf4``/``int8`` keep that quantization; ``as-served`` keeps what the
    default server runs (its quantization and default dtype); anything else is a
    config key or a prefix of one (e.g. ``smollm2-135m-instruct@1f3c``).
    """
    if spec is None:
        return None
    if spec in QUANTIZE_CHOICES:
        return lambda cfg, key: bool(cfg) and cfg.get("quantize") == spec
    if spec == "as-served":
        return lambda cfg, key: is_served_default(cfg)
    if not spec.strip():
        raise InvalidConfig("--config must be a config key, as-served, or one of none, nf4, int8")
    return lambda cfg, key: key is not None and key.startswith(spec)


def eval_command(ref: str, cfg: dict) -> str:
    """The ``loradex eval`` command that scores ``ref`` under ``cfg``."""
    cmd = f"loradex eval {ref} --data FILE --quantize {cfg['quantize']}"
    if cfg.get("dtype") and cfg["dtype"] != default_dtype(cfg.get("device") or "cpu"):
        cmd += f" --dtype {cfg['dtype']}"
    return cmd + f" --device {cfg.get('device') or 'cpu'}"  # explicit: eval's default is auto (CUDA when present)


def served_warning(run: dict, data: str | None = None) -> str | None:
    """A sentence when ``run`` was not scored under what ``loradex serve`` runs by default, else None.

    Says which configuration it measured, what the server runs, and the commands
    that make the two agree (score it as served, or serve it as scored).
    """
    cfg = run.get("serving_config")
    if not cfg or is_served_default(cfg):
        return None
    served = served_default()
    ref = f"{run.get('adapter')}@{run.get('version')}"
    served_dtype = normalize_dtype(served["dtype"]) if served["dtype"] else default_dtype(cfg["device"])
    how = "as trained, under" if run.get("trained_quantization") == cfg["quantize"] else "under"
    serve = f"loradex serve --quantize {cfg['quantize']}" + (f" --dtype {cfg['dtype']}" if cfg["dtype"] != served_dtype else "")
    return (f"{ref} was scored {how} {config_label(cfg)}, but `loradex serve` runs "
            f"{served['quantize']}/{served_dtype} {cfg['device']} by default, so these numbers do not describe "
            f"the default server; score it as served: `loradex eval {ref} --data {data or 'FILE'} --as-served`, "
            f"or serve it as scored: `{serve}`")
