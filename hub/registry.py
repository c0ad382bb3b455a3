"""Adapter registry: register, resolve, list, alias, delete, verify.

Registration is the one validated path every adapter takes (``loradex
register``, the end of ``loradex train``, ``POST /adapters``)::

    validate folder (nothing written yet)
      -> same bytes under this name already?  return that version (idempotent)
      -> insert version row as 'pending' (owner pid recorded)
      -> copy files into the store (tmp dir, fsync, rename)
      -> mark 'ready'

A crash between the steps leaves a 'pending' row whose pid is dead, and maybe a
temp folder; ``cleanup_stale`` removes both, and nothing reads pending rows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from loradex.hub.bases import DEFAULT_BASE, get_base
from loradex.hub.catalog import Catalog, pid_alive, to_json, utcnow
from loradex.hub.errors import Conflict, GateRefused, InvalidAdapter, InvalidConfig, NotFound
from loradex.hub.names import Ref, check_name, parse_ref
from loradex.hub.ops import op
from loradex.hub.store import Store
from loradex.hub.validate import validate_adapter

VERSION_COLUMNS = (
    "id, adapter, version, base, digest, path, files, size_bytes, peft_type, rank, alpha, target_modules, "
    "param_count, features, quantization, source, status, training_run_id, created_at"
)


def cleanup_stale(catalog: Catalog, store: Store) -> int:
    """Drop pending rows of dead writers and their temp folders; returns rows removed."""
    rows = catalog.query("SELECT id, owner_pid FROM adapter_versions WHERE status = 'pending'")
    dead = [r["id"] for r in rows if not r["owner_pid"] or not pid_alive(int(r["owner_pid"]))]
    if dead:
        with catalog.transaction() as cur:
            for vid in dead:
                cur.execute("DELETE FROM adapter_versions WHERE id = ? AND status = 'pending'", [vid])
    store.cleanup_tmp()
    return len(dead)


def did_you_mean(word: str, choices) -> str:
    """"; did you mean 'x'?" for the closest of ``choices`` (difflib), or ""."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _guess_base(catalog: Catalog, path: str | Path) -> str:
    """The registered base an adapter folder names in ``base_model_name_or_path``."""
    from loradex.hub.validate import resolve_adapter_path

    folder, _ = resolve_adapter_path(str(path))  # a missing folder is the error, not the unknown base
    hint = None
    try:
        hint = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        hint = None
    if hint:
        for row in catalog.query("SELECT name, source, path FROM bases"):
            if hint in (row["name"], row["source"], row["path"]):
                return row["name"]
        tail = hint.rstrip("/").rsplit("/", 1)[-1].lower()
        if tail.startswith("smollm2-135m-instruct"):
            return DEFAULT_BASE
    raise InvalidAdapter(
        f"cannot tell which registered base this adapter belongs to (base_model_name_or_path={hint!r}); "
        f"pass --base NAME"
    )


@op("adapters.register", write=True)
def register_adapter(
    catalog: Catalog,
    store: Store,
    path: str | Path,
    name: str,
    *,
    base: str | None = None,
    allow_noop: bool = False,
    source: str | None = None,
    training_run_id: int | None = None,
    quantization: str | None = None,
    description: str | None = None,
) -> dict:
    """Validate and store an adapter folder; return the (ready) version row."""
    check_name(name, "adapter name")
    if base is None:
        base = _guess_base(catalog, path)
    base_row = get_base(catalog, base, store=store)
    checked = validate_adapter(path, base_row, allow_noop=allow_noop)
    from loradex.hub.store import manifest_digest

    digest = manifest_digest(checked.files)
    with catalog.version_lock:
        existing = catalog.one(
            f"SELECT {VERSION_COLUMNS} FROM adapter_versions WHERE adapter = ? AND digest = ? AND status = 'ready'",
            [name, digest],
        )
        if existing and existing["base"] == base and store.resolve(existing["path"]).is_dir():
            return {**existing, "existing": True}  # the same files under this name: nothing new registered
        with catalog.transaction() as cur:
            other_base = cur.execute(
                "SELECT base FROM adapter_versions WHERE adapter = ? AND status = 'ready' LIMIT 1", [name]
            ).fetchone()
            if other_base and other_base[0] != base:
                raise Conflict(
                    f"adapter {name!r} already has versions for base {other_base[0]!r}; "
                    f"register this one (base {base!r}) under another name"
                )
            if not cur.execute("SELECT 1 FROM adapters WHERE name = ?", [name]).fetchone():
                cur.execute("INSERT INTO adapters VALUES (?, ?, ?)", [name, description, utcnow()])
            version = cur.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM adapter_versions WHERE adapter = ?", [name]
            ).fetchone()[0]
            quant = quantization or (checked.config.get("loradex", {}) or {}).get("quantization")
            row = cur.execute(
                "INSERT INTO adapter_versions (adapter, version, base, digest, path, files, size_bytes, peft_type, "
                "rank, alpha, target_modules, param_count, features, quantization, source, status, owner_pid, "
                "training_run_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'LORA', ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?) "
                "RETURNING id",
                [name, version, base, digest, f"snapshots/{digest}", to_json(checked.files), checked.size_bytes,
                 checked.rank, checked.alpha, to_json(checked.target_modules), checked.param_count,
                 to_json(checked.features), quant, source or str(checked.folder), os.getpid(),
                 training_run_id, utcnow()],
            ).fetchone()
        vid = row[0]
    try:
        snap = store.put_folder(checked.folder, list(checked.files))
        if snap.digest != digest:
            raise InvalidAdapter(f"{checked.folder} changed while it was being registered; try again")
    except BaseException:
        with catalog.transaction() as cur:
            cur.execute("DELETE FROM adapter_versions WHERE id = ?", [vid])
        raise
    with catalog.transaction() as cur:
        cur.execute("UPDATE adapter_versions SET status = 'ready', owner_pid = NULL WHERE id = ?", [vid])
    return get_version_by_id(catalog, vid)


@op("adapters.get")
def get_version_by_id(catalog: Catalog, vid: int) -> dict:
    row = catalog.one(f"SELECT {VERSION_COLUMNS} FROM adapter_versions WHERE id = ?", [vid])
    if row is None:
        raise NotFound(f"adapter version id {vid} not found")
    return row


@op("adapters.resolve")
def resolve(catalog: Catalog, ref: str | Ref) -> dict:
    """The ready version row a reference points at (latest when no tag)."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if not catalog.one("SELECT name FROM adapters WHERE name = ?", [ref.name]):
        names = [r["name"] for r in catalog.query("SELECT name FROM adapters")]
        raise NotFound(f"adapter {ref.name!r} not found{did_you_mean(ref.name, names)}")
    version = ref.version
    if ref.alias is not None:
        row = catalog.one("SELECT version FROM aliases WHERE adapter = ? AND alias = ?", [ref.name, ref.alias])
        if row is None:
            known = [r["alias"] for r in catalog.query("SELECT alias FROM aliases WHERE adapter = ?", [ref.name])]
            raise NotFound(f"adapter {ref.name!r} has no alias {ref.alias!r}{did_you_mean(ref.alias, known)}")
        version = row["version"]
    if version is None:
        row = catalog.one(
            f"SELECT {VERSION_COLUMNS} FROM adapter_versions WHERE adapter = ? AND status = 'ready' "
            "ORDER BY version DESC LIMIT 1",
            [ref.name],
        )
    else:
        row = catalog.one(
            f"SELECT {VERSION_COLUMNS} FROM adapter_versions WHERE adapter = ? AND version = ? AND status = 'ready'",
            [ref.name, version],
        )
    if row is None:
        raise NotFound(f"adapter {ref} not found" if version is None else f"adapter {ref.name}@{version} not found")
    return row


LIST_COLUMNS = (
    "v.id, v.adapter, v.version, v.base, v.digest, v.path, v.size_bytes, v.rank, v.alpha, v.target_modules, "
    "v.param_count, v.quantization, v.status, v.training_run_id, v.created_at"
)


@op("adapters.list")
def list_adapters(catalog: Catalog, base: str | None = None) -> list[dict]:
    """Every ready version, by name then newest first, with its aliases (listing columns only)."""
    sql = (
        f"SELECT {LIST_COLUMNS}, a.aliases FROM adapter_versions v LEFT JOIN "
        "(SELECT adapter, version, list(alias ORDER BY alias) AS aliases FROM aliases GROUP BY adapter, version) a "
        "ON a.adapter = v.adapter AND a.version = v.version WHERE v.status = 'ready'"
    )
    params: list = []
    if base:
        sql += " AND v.base = ?"
        params.append(base)
    return catalog.query(sql + " ORDER BY v.adapter, v.version DESC", params)


@op("aliases.of")
def aliases_of(catalog: Catalog, name: str) -> dict[str, int]:
    return {r["alias"]: r["version"] for r in catalog.query(
        "SELECT alias, version FROM aliases WHERE adapter = ? ORDER BY alias", [name])}


GATED_ALIASES = ("production",)


def served_config_for(catalog: Catalog, row: dict, served_config: dict | None = None) -> dict | None:
    """The configuration ``row`` is served with: the given server's, when it serves that base, else the default's.

    None when the adapter's base is not registered (nothing can serve it, so no configuration applies).
    """
    if served_config and served_config.get("base") == row["base"]:
        return served_config
    from loradex.evals.config import default_served_config

    try:
        base_row = get_base(catalog, row["base"], provision=False)
    except NotFound:
        return None
    return default_served_config(base_row)


def current_actor() -> str:
    """Who is acting, as recorded with alias moves: USER@HOST."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@op("aliases.set", write=True)
def set_alias(catalog: Catalog, ref: str, alias: str, *, force: bool = False, reason: str | None = None,
              actor: str | None = None, served_config: dict | None = None) -> dict:
    """Point ``alias`` at the version ``ref`` names, and record who moved it and why.

    ``production`` is gated: ``evals.gate.check_promotion`` must pass, else
    ``GateRefused`` with the gate's numbers. ``force=True`` overrides the gate
    and needs a ``reason``; the override, the reason, the actor and the gate's
    numbers land in ``alias_events``. This is the one path for the CLI, the
    HTTP API and Python alike.

    The gate counts only scores measured under the configuration the version will
    be served with: ``served_config`` (a running server passes its own), else what
    ``loradex serve`` runs by default for the adapter's base on this machine.
    """
    check_name(alias, "alias")
    if alias.isdigit() or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise Conflict(f"alias {alias!r} looks like a version number; choose a word")
    reason = (reason or "").strip() or None
    if force and reason is None:
        raise InvalidConfig("--force needs --reason TEXT: say why the promotion gate is overridden (it is recorded)")
    row = resolve(catalog, ref)
    gate = None
    forced = False
    if alias in GATED_ALIASES:
        from loradex.evals.gate import check_promotion

        gate = check_promotion(catalog, row, config=served_config_for(catalog, row, served_config))
        if not gate["ok"]:
            if not force:
                raise GateRefused(
                    f"refusing to make {row['adapter']}@{row['version']} {alias}: " + "; ".join(gate["reasons"])
                    + " (use --force --reason TEXT to override; the override is recorded)")
            forced = True
    actor = actor or current_actor()
    now = utcnow()
    with catalog.transaction() as cur:
        cur.execute("DELETE FROM aliases WHERE adapter = ? AND alias = ?", [row["adapter"], alias])
        cur.execute("INSERT INTO aliases VALUES (?, ?, ?, ?)", [row["adapter"], alias, row["version"], now])
        cur.execute(
            "INSERT INTO alias_events (adapter, alias, version, forced, gate, reason, actor, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [row["adapter"], alias, row["version"], forced, to_json(gate) if gate is not None else None, reason,
             actor, now],
        )
    return {"adapter": row["adapter"], "alias": alias, "version": row["version"], "forced": forced, "gate": gate,
            "reason": reason, "actor": actor, "created_at": now}


@op("aliases.remove", write=True)
def remove_alias(catalog: Catalog, name: str, alias: str, *, actor: str | None = None) -> None:
    if not catalog.one("SELECT 1 AS x FROM aliases WHERE adapter = ? AND alias = ?", [name, alias]):
        raise NotFound(f"adapter {name!r} has no alias {alias!r}")
    with catalog.transaction() as cur:
        cur.execute("DELETE FROM aliases WHERE adapter = ? AND alias = ?", [name, alias])
        cur.execute(
            "INSERT INTO alias_events (adapter, alias, version, forced, gate, actor, created_at) "
            "VALUES (?, ?, NULL, false, NULL, ?, ?)",
            [name, alias, actor or current_actor(), utcnow()],
        )


@op("adapters.delete", write=True)
def delete_version(catalog: Catalog, store: Store, ref: str, *, force: bool = False) -> dict:
    """Delete one version (refused while an alias points at it, unless forced)."""
    parsed = parse_ref(ref)
    if parsed.version is None:
        raise Conflict(f"delete needs an explicit version: {parsed.name}@N (see `loradex show {parsed.name}`)")
    row = resolve(catalog, parsed)
    pointing = [r["alias"] for r in catalog.query(
        "SELECT alias FROM aliases WHERE adapter = ? AND version = ?", [row["adapter"], row["version"]])]
    if pointing and not force:
        raise Conflict(
            f"{row['adapter']}@{row['version']} is aliased as {', '.join(pointing)}; "
            f"move the alias first or pass --force"
        )
    with catalog.transaction() as cur:
        cur.execute("DELETE FROM aliases WHERE adapter = ? AND version = ?", [row["adapter"], row["version"]])
        cur.execute("DELETE FROM adapter_versions WHERE id = ?", [row["id"]])
        if not cur.execute("SELECT 1 FROM adapter_versions WHERE adapter = ?", [row["adapter"]]).fetchone():
            cur.execute("DELETE FROM adapters WHERE name = ?", [row["adapter"]])
    still_used = {r["path"] for r in catalog.query("SELECT path FROM adapter_versions")}
    if row["path"] not in still_used:
        referenced: set[str] = set()
        for r in catalog.query("SELECT files FROM adapter_versions"):
            referenced.update(r["files"].values())
        store.remove_snapshot(row["path"], referenced)
    return row


@op("adapters.verify")
def verify(catalog: Catalog, store: Store, name: str | None = None) -> list[dict]:
    """Re-hash every stored version (of ``name``); one result per version."""
    sql = f"SELECT {VERSION_COLUMNS} FROM adapter_versions WHERE status = 'ready'"
    params: list = []
    if name:
        parsed = parse_ref(name)
        if parsed.version is not None or parsed.alias is not None:
            rows = [resolve(catalog, parsed)]
        else:
            rows = catalog.query(sql + " AND adapter = ? ORDER BY version", [parsed.name])
            if not rows:
                raise NotFound(f"adapter {parsed.name!r} not found")
    else:
        rows = catalog.query(sql + " ORDER BY adapter, version", params)
    results = []
    for row in rows:
        problems = store.verify(row["path"], row["files"])
        results.append({"adapter": row["adapter"], "version": row["version"], "ok": not problems, "problems": problems})
    return results


def adapter_folder(catalog: Catalog, store: Store, ref: str | Ref | dict) -> tuple[dict, Path]:
    """(version row, verified snapshot folder): sha256-checked before any load."""
    from loradex.hub.remote import materialize

    row = ref if isinstance(ref, dict) else resolve(catalog, ref)
    folder = materialize(catalog, store, row["path"], row["files"], f"adapter {row['adapter']}@{row['version']}")
    return row, folder
