"""What a run costs: an editable table of hourly prices per device type.

The defaults below are on-demand list prices (USD per hour) as of 2025 for a
single accelerator; edit them by writing ``$LORADEX_HOME/prices.json``
(``{"a10g": 1.10, "my-box": 0.0}``), which is merged over this table. A CPU run
is priced as ``cpu`` (the electricity of a small box; set 0 to ignore).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from loradex.hub.errors import InvalidConfig

DEFAULT_USD_PER_HOUR: dict[str, float] = {
    "cpu": 0.05,
    "t4": 0.59,
    "l4": 0.80,
    "a10g": 1.10,
    "a100-40gb": 2.10,
    "a100-80gb": 2.50,
    "h100": 3.95,
    "h200": 4.54,
}


def prices_file(home: str | Path | None = None) -> Path:
    home = Path(home or os.environ.get("LORADEX_HOME", ".loradex"))
    return home / "prices.json"


def price_table(home: str | Path | None = None) -> dict[str, float]:
    """The default table with ``$LORADEX_HOME/prices.json`` merged over it."""
    table = dict(DEFAULT_USD_PER_HOUR)
    path = prices_file(home)
    if path.is_file():
        try:
            extra = json.loads(path.read_text())
        except ValueError as exc:
            raise InvalidConfig(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(extra, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in extra.values()):
            raise InvalidConfig(f"{path}: expected {{device type: USD per hour >= 0}}")
        table.update({str(k).lower(): float(v) for k, v in extra.items()})
    return table


def known_device_types(home: str | Path | None = None) -> set[str]:
    return set(price_table(home))


def estimate_cost(duration_s: float, device: str, gpu_type: str, home: str | Path | None = None) -> tuple[float, dict]:
    """(USD, basis) for ``duration_s`` seconds on ``device`` (cpu -> the cpu price)."""
    table = price_table(home)
    device_type = "cpu" if device == "cpu" else gpu_type.lower()
    if device_type not in table:
        raise InvalidConfig(f"--gpu-type {gpu_type!r} is not in the price table ({', '.join(sorted(table))})")
    rate = table[device_type]
    return duration_s / 3600.0 * rate, {"device_type": device_type, "usd_per_hour": rate}
