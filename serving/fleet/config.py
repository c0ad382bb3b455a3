"""``loradex gateway``'s configuration: one dataclass, each field's flag in its docstring."""
from __future__ import annotations

from dataclasses import dataclass, field

from loradex.hub.errors import InvalidConfig


@dataclass
class GatewayConfig:
    """Resolved configuration of one gateway process."""

    registry: str
    """--registry: URL of the loradex registry (the ``loradex serve`` that owns the catalog)."""
    backends: list[str] = field(default_factory=list)
    """--backend (repeatable): URLs of the replicas (``loradex serve [--registry]`` or ``vllm serve``)."""
    host: str = "127.0.0.1"
    """--host: interface to listen on."""
    port: int = 8080
    """--port: TCP port."""
    alias_ttl_s: float = 2.0
    """--alias-ttl: seconds a resolution of NAME / NAME@ALIAS is reused; the bound on how late an alias move is seen."""
    max_stale_s: float = 300.0
    """--max-stale: while the registry is down, seconds a held resolution keeps being used (then 503)."""
    health_interval_s: float = 1.0
    """--health-interval: seconds between health checks of each backend."""
    max_skew: int = 4
    """--max-skew: in-flight requests an affinity backend may carry over the least loaded one before spilling."""
    request_timeout_s: float = 600.0
    """--request-timeout: seconds to wait for a backend's answer (or between two streamed chunks)."""
    api_key: str | None = None
    """--api-key / LORADEX_API_KEY: clients must send it; it is also sent to the registry and the backends."""

    def __post_init__(self):
        if not self.registry.startswith(("http://", "https://")):
            raise InvalidConfig(f"--registry must be an http(s) URL, got {self.registry!r}")
        if not self.backends:
            raise InvalidConfig("--backend: give at least one backend URL")
        for url in self.backends:
            if not url.startswith(("http://", "https://")):
                raise InvalidConfig(f"--backend must be an http(s) URL, got {url!r}")
        if len(set(self.backends)) != len(self.backends):
            raise InvalidConfig("--backend: the same URL is given twice")
        if self.alias_ttl_s < 0:
            raise InvalidConfig(f"--alias-ttl must be >= 0, got {self.alias_ttl_s}")
        if self.max_stale_s < self.alias_ttl_s:
            raise InvalidConfig(f"--max-stale ({self.max_stale_s}) must be >= --alias-ttl ({self.alias_ttl_s})")
        if self.health_interval_s <= 0:
            raise InvalidConfig(f"--health-interval must be > 0, got {self.health_interval_s}")
        if self.max_skew < 0:
            raise InvalidConfig(f"--max-skew must be >= 0, got {self.max_skew}")
        if not 0 < self.port < 65536:
            raise InvalidConfig(f"--port must be 1-65535, got {self.port}")
