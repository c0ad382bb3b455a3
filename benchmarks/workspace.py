"""The benchmark's sandbox: sizes, a temporary catalog and store, the base, random adapters.

Every run works in a fresh ``LORADEX_HOME`` under a temp folder, so the user's
catalog is never touched. The default base is converted from its GGUF once and
kept in ``--cache-dir`` (``bench-results/cache`` by default), because the
conversion alone takes 20-40 s.

Adapters are generated straight from the base's recorded layer shapes (no model
load): random r=16 LoRA on q_proj and v_proj, lora_A uniform like PEFT's
kaiming init, lora_B small normal so the adapter is not a no-op, saved with a
PEFT ``LoraConfig`` so every loader reads them as ordinary PEFT adapters.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from loradex.hub.errors import InvalidConfig

ENV_KEYS = ("LORADEX_HOME", "LORADEX_STORE")


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does; ``full``, ``quick`` and ``smoke`` presets below."""

    reps: int = 3
    """Timed repetitions per compared case (after warm-up)."""
    warmup: int = 1
    """Untimed runs of every case before the timed ones."""
    requests: int = 8
    """Concurrent requests in the serving cases (one adapter each in case a)."""
    adapters: int = 8
    """Distinct adapters in the serving cases."""
    new_tokens: int = 32
    """Tokens generated per request (greedy, no early stop)."""
    rank: int = 16
    """LoRA rank of the generated adapters."""
    scaling_counts: tuple[int, ...] = (1, 10, 100)
    """Registered adapters rotated through in the scaling benchmark."""
    scaling_rounds: int = 1
    """Batches of ``requests`` measured per scaling configuration."""
    cold_reps: int = 5
    """Never-loaded adapters timed in the cold-load benchmark."""
    decode_tokens: int = 64
    """Tokens generated at batch 1 in the decode benchmark."""
    bandwidth_mb: int = 512
    """Size of the buffer copied to measure memory bandwidth."""
    train_steps: int = 10
    """Optimizer steps per training run (the first is warm-up and not counted)."""
    train_examples: int = 64
    """Synthetic chat examples in the training data."""
    train_batch: int = 4
    """Per-device batch size for both trainers."""
    catalog_rows: int = 10_000
    """Adapter versions inserted in bulk before timing catalog calls."""
    catalog_reps: int = 10
    """Timed register/list/show calls each."""
    http_reps: int = 3
    """Timed rounds of case (a) over HTTP and in-process."""
    fixed_tokens: int = 64
    """New tokens of every request in the llama.cpp comparison (fixed length: ignore_eos)."""

    def __post_init__(self) -> None:
        for name in ("reps", "requests", "adapters", "new_tokens", "rank", "scaling_rounds", "cold_reps",
                     "decode_tokens", "bandwidth_mb", "train_steps", "train_examples", "train_batch",
                     "catalog_rows", "catalog_reps", "http_reps", "fixed_tokens"):
            if getattr(self, name) < 1:
                raise InvalidConfig(f"benchmark size {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InvalidConfig(f"benchmark size warmup must be >= 0, got {self.warmup}")
        if self.train_steps < 2:
            raise InvalidConfig("benchmark size train_steps must be >= 2 (the first step is warm-up)")


PRESETS: dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(reps=2, warmup=1, new_tokens=16, scaling_counts=(1, 10, 100), scaling_rounds=1,
                   cold_reps=3, decode_tokens=32, bandwidth_mb=256, train_steps=5, train_examples=32,
                   catalog_reps=5, http_reps=2),
    # For the test suite on a tiny random model: every code path, seconds of work.
    "smoke": Sizes(reps=1, warmup=1, requests=3, adapters=3, new_tokens=4, rank=4, scaling_counts=(1, 3),
                   scaling_rounds=1, cold_reps=1, decode_tokens=4, bandwidth_mb=8, train_steps=2,
                   train_examples=8, train_batch=2, catalog_rows=300, catalog_reps=2, http_reps=1, fixed_tokens=4),
}


@dataclass
class Workspace:
    """Settings, store and base of one benchmark run (a temp LORADEX_HOME)."""

    root: Path
    settings: object
    store: object
    base_name: str
    base_folder: Path
    base_record: dict
    sizes: Sizes
    quantize: str
    device: str
    cache_dir: Path
    saved_env: dict = field(default_factory=dict)
    """LORADEX_HOME/LORADEX_STORE as they were before the run (restored on close)."""
    adapters_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.adapters_dir = self.root / "generated"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def catalog(self) -> Iterator[object]:
        """A short-lived handle on this run's catalog (DuckDB allows one writer per process)."""
        from loradex.hub.catalog import Catalog

        cat = Catalog.open(self.settings.catalog_path, wait_s=30)
        try:
            yield cat
        finally:
            cat.close()

    def make_adapter(self, name: str, *, seed: int, rank: int | None = None) -> Path:
        """A random LoRA adapter folder over this run's base (not registered)."""
        return make_random_adapter(self.base_record, self.adapters_dir / name, rank=rank or self.sizes.rank,
                                   seed=seed, base_name=self.base_name)

    def register_adapters(self, prefix: str, count: int, *, seed0: int = 0) -> list[str]:
        """Generate and register ``count`` adapters named ``{prefix}-{i}``; returns their names."""
        from loradex.hub.registry import register_adapter

        names = []
        with self.catalog() as cat:
            for i in range(count):
                name = f"{prefix}-{i}"
                folder = self.make_adapter(name, seed=seed0 + i)
                register_adapter(cat, self.store, folder, name, base=self.base_name, source="benchmark")
                names.append(name)
        return names


def make_random_adapter(base_record: dict, out: Path, *, rank: int = 16, alpha: int | None = None,
                        targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0,
                        b_std: float = 0.02, base_name: str | None = None) -> Path:
    """Write a random PEFT LoRA adapter for the base described by ``base_record`` into ``out``."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = base_record["layers"]
    modules = sorted(m for m in layers if m.rsplit(".", 1)[-1] in targets)
    if not modules:
        raise InvalidConfig(f"base {base_record['name']!r} has no modules named {', '.join(targets)}")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        out_f, in_f = layers[module]
        bound = 1.0 / math.sqrt(in_f)
        a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
        b = torch.randn(out_f, rank, generator=gen) * b_std
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_name or base_record["name"])
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def cached_default_base(cache_dir: Path) -> Path:
    """The default base converted once into ``cache_dir`` (reused by later runs)."""
    from loradex.hub.bases import convert_gguf, locate_default_gguf
    from loradex.hub.store import Store

    marker = cache_dir / "default-base.json"
    if marker.is_file():
        folder = Path(json.loads(marker.read_text())["folder"])
        if (folder / "config.json").is_file():
            return folder
    folder = convert_gguf(locate_default_gguf(), Store(cache_dir / "store"))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"folder": str(folder)}))
    return folder


def open_workspace(*, sizes: Sizes, base_dir: Path | None = None, base_name: str | None = None,
                   quantize: str = "nf4", device: str = "auto", cache_dir: Path,
                   root: Path | None = None) -> Workspace:
    """Create a fresh LORADEX_HOME, register the base in it, and point the environment at it.

    The environment variables matter: the serving and training stages open
    ``Settings()`` themselves, and a uvicorn subprocess inherits them.
    """
    from loradex.hub.bases import DEFAULT_BASE, add_base
    from loradex.hub.catalog import Catalog
    from loradex.hub.loading import pick_device
    from loradex.hub.settings import Settings, apply_threads
    from loradex.hub.store import Store

    root = Path(root or tempfile.mkdtemp(prefix="loradex-bench-"))
    settings = Settings(home=root / "home", store=root / "store")
    saved_env = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ["LORADEX_HOME"] = str(settings.home)
    os.environ["LORADEX_STORE"] = str(settings.store)
    apply_threads(settings.threads)
    store = Store(settings.store)
    if base_dir is None:
        base_dir = cached_default_base(cache_dir)
        base_name = base_name or DEFAULT_BASE
    base_name = base_name or Path(base_dir).name.lower().replace("_", "-")
    with Catalog.open(settings.catalog_path, wait_s=30) as cat:
        record = add_base(cat, store, base_name, str(base_dir))
    return Workspace(root=root, settings=settings, store=store, base_name=base_name, base_folder=Path(base_dir),
                     base_record=record, sizes=sizes, quantize=quantize, device=pick_device(device),
                     cache_dir=cache_dir, saved_env=saved_env)


def close_workspace(ws: Workspace, *, keep: bool = False) -> None:
    """Put the environment back and (unless ``keep``) delete the run's temp folder."""
    for key, value in ws.saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if not keep:
        shutil.rmtree(ws.root, ignore_errors=True)
