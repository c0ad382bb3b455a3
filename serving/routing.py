"""Promote-in-place routing: which merged model, if any, can serve an adapter version.

A merged model is registered twice by ``loradex merge``: as a base (``bases.kind
= 'merged'``) and as a row of ``merges`` linking it to the adapter version it
came from (``merges.adapter_version_id``, ``merges.base_name``). With
``loradex serve --route-merged``, a request for that adapter version is sent to
the merged model, served bare (no LoRA work per token), instead of to the
shared base plus the adapter. Only merges made from the base being served
qualify, so the answer is the same model.
"""
from __future__ import annotations

from pathlib import Path


def merged_base_for(catalog, row: dict, served_base: str) -> str | None:
    """Name of the newest merged base built from version ``row`` on ``served_base``, if one is usable."""
    found = catalog.one(
        "SELECT m.base_name FROM merges m JOIN bases b ON b.name = m.base_name "
        "WHERE m.adapter_version_id = ? AND m.base = ? AND m.base_name IS NOT NULL "
        "ORDER BY m.id DESC LIMIT 1",
        [row["id"], served_base],
    )
    if found is None:
        return None
    base = catalog.one("SELECT path FROM bases WHERE name = ?", [found["base_name"]])
    if base is None or not Path(base["path"]).is_dir():
        return None
    return found["base_name"]
