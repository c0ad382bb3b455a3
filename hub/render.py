"""Plain-text tables and sizes for the CLI."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def table(rows: Iterable[dict], columns: list[str], headers: list[str] | None = None) -> str:
    rows = list(rows)
    headers = headers or [c.upper() for c in columns]
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):  # the catalog stores UTC without a zone: RFC 3339 says so with "Z"
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    return str(value)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; timestamps as RFC 3339 (``2026-12-03T04:40:31.923060Z``), anything else as its str()."""
    return json.loads(json.dumps(value, default=_json_default))
