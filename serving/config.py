"""Typed settings of the serving engine and the HTTP server; errors name the flag."""
from __future__ import annotations

from dataclasses import dataclass, field

from loradex.hub.bases import DEFAULT_BASE
from loradex.hub.errors import InvalidConfig
from loradex.hub.loading import QUANTIZE_CHOICES


@dataclass
class EngineConfig:
    """How the engine loads its base and batches requests."""

    base: str = DEFAULT_BASE
    """Base model name in the catalog; a merged model registered as a base works too (--base)."""
    quantize: str = "nf4"
    """Base weights: nf4 (bitsandbytes 4-bit), int8, or none (--quantize)."""
    device: str = "auto"
    """auto, cpu or cuda[:N] (--device)."""
    dtype: str | None = None
    """Compute dtype override: fp32, bf16, fp16; default bf16 on CUDA, fp32 on CPU (--dtype)."""
    max_loaded: int = 8
    """Adapters held in memory at once; least recently used ones are evicted (--max-loaded)."""
    pin: list[str] = field(default_factory=list)
    """Adapters (NAME[@V|@ALIAS]) loaded at start and never evicted (--pin)."""
    max_batch: int = 16
    """Rows in one forward pass at most (--max-batch)."""
    batch_window_ms: float = 10.0
    """When idle, wait this long after a request for others to batch with it (--batch-window-ms)."""
    max_queued: int = 64
    """Requests waiting for a batch slot at most; more get 429 (--max-queued)."""
    max_tokens_limit: int = 2048
    """Largest max_tokens a request may ask for (--max-tokens-limit)."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none, capped by the context left (--default-max-tokens)."""
    max_context: int | None = None
    """Prompt plus new tokens at most; default the base's max_position_embeddings (--max-context)."""
    route_merged: bool = False
    """Send requests for an adapter version that has a merged model to that model (--route-merged)."""
    max_merged: int = 2
    """Merged models loaded at most for --route-merged; further ones are served as adapters (--max-merged)."""
    batch_invariant: bool = False
    """Run every row's forward by itself, so its tokens do not depend on batch size or neighbours (--batch-invariant)."""

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidConfig(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        for flag, value, low in (("--max-loaded", self.max_loaded, 1), ("--max-batch", self.max_batch, 1),
                                 ("--max-queued", self.max_queued, 0), ("--max-tokens-limit", self.max_tokens_limit, 1),
                                 ("--default-max-tokens", self.default_max_tokens, 1), ("--max-merged", self.max_merged, 0)):
            if not isinstance(value, int) or value < low:
                raise InvalidConfig(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.batch_window_ms < 0 or self.batch_window_ms > 1000:
            raise InvalidConfig(f"--batch-window-ms must be between 0 and 1000, got {self.batch_window_ms}")
        if self.max_context is not None and self.max_context < 2:
            raise InvalidConfig(f"--max-context must be >= 2, got {self.max_context}")
        if len(self.pin) > self.max_loaded:
            raise InvalidConfig(f"--pin names {len(self.pin)} adapters but --max-loaded is {self.max_loaded}")


@dataclass
class ServerConfig:
    """The HTTP server: where it listens, who may call it, and request limits."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    """Interface to listen on (--host)."""
    port: int = 8000
    """TCP port (--port)."""
    api_key: str | None = None
    """Required as 'Authorization: Bearer KEY' on every route but /health (--api-key or LORADEX_API_KEY)."""
    max_body_bytes: int = 1 << 20
    """Largest JSON request body (--max-body-bytes)."""
    max_upload_bytes: int = 512 << 20
    """Largest adapter archive uploaded to POST /adapters (--max-upload-bytes)."""
    max_n: int = 4
    """Largest n (choices per prompt) a request may ask for (--max-n)."""
    max_stop: int = 4
    """Most stop strings per request (OpenAI allows 4) (--max-stop)."""
    max_prompts: int = 16
    """Most prompts in one /v1/completions list (--max-prompts)."""
    allow_path_register: list[str] = field(default_factory=list)
    """Folders on the server under which POST /adapters {"path": ...} may register adapters; empty (the
    default) turns registering by server path off: clients upload archives (--allow-path-register DIR)."""
    confine_local_paths: bool = False
    """Confine path arguments of /v1/ops/* from loopback clients too (by default the CLI on this machine passes
    its own paths; remote clients are always confined to --allow-path-register roots) (--confine-local-paths)."""
    drain_s: float = 30.0
    """On shutdown, how long in-flight requests may take to finish before they are cancelled (--drain-s)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidConfig(f"--port must be 0-65535, got {self.port}")
        for flag, value in (("--max-body-bytes", self.max_body_bytes), ("--max-upload-bytes", self.max_upload_bytes),
                            ("--max-n", self.max_n), ("--max-stop", self.max_stop), ("--max-prompts", self.max_prompts)):
            if not isinstance(value, int) or value < 1:
                raise InvalidConfig(f"{flag} must be an integer >= 1, got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidConfig("--api-key must not be empty")
        if self.drain_s < 0:
            raise InvalidConfig(f"--drain-s must be >= 0, got {self.drain_s}")
