"""The hub's commands (init, base, register, list, show, alias, delete, verify, jobs) and ``Context``.

Every command opens the catalog only for as long as it works (DuckDB allows one
read-write process per file), or goes through the server that owns it, and
prints data as a table or, with ``--json``, as JSON. ``loradex/cli.py``
assembles these with each stage's ``add_commands(sub, common)`` and turns a
:class:`LoradexError` into one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from loradex.hub.render import human_bytes, table, to_jsonable
from loradex.hub.settings import Settings

class Context:
    """What a command needs: settings, a lazily opened catalog, the store, output."""

    def __init__(self, args: argparse.Namespace, settings: Settings | None = None):
        self.args = args
        self.settings = settings or Settings()
        self.as_json = bool(getattr(args, "json", False))
        self._catalog = None
        self._store = None

    @property
    def store(self):
        from loradex.hub.store import Store

        if self._store is None:
            self._store = Store(self.settings.store)
        return self._store

    @property
    def catalog(self):
        """The catalog file, or, while ``loradex serve`` owns it, that server's API (same operations)."""
        if self._catalog is None:
            from loradex.hub.registry import cleanup_stale
            from loradex.hub.remote import connect, is_remote

            self._catalog = connect(self.settings)
            if not is_remote(self._catalog):
                cleanup_stale(self._catalog, self.store)
        return self._catalog

    def close_catalog(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    def emit(self, data: Any, human: str | Callable[[], str]) -> None:
        if self.as_json:
            print(json.dumps(to_jsonable(data), indent=2))
        else:
            print(human() if callable(human) else human)


# -- hub commands ------------------------------------------------------------------

def cmd_init(ctx: Context) -> int:
    from loradex.hub.bases import ensure_default_base

    row = ensure_default_base(ctx.catalog, ctx.store)
    ctx.emit(_base_view(row), f"default base {row['name']} ready at {row['path']}")
    return 0


def _base_view(row: dict) -> dict:
    return {k: row.get(k) for k in ("name", "kind", "source", "architecture", "num_parameters", "size_bytes", "dtype", "path", "created_at")}


def cmd_base_add(ctx: Context) -> int:
    from loradex.hub.bases import add_base

    row = add_base(ctx.catalog, ctx.store, ctx.args.name, _absolute_source(ctx.args.source))
    ctx.emit(_base_view(row), f"added base {row['name']} ({row['architecture']}, "
             f"{row['num_parameters']:,} parameters) from {row['source']}")
    return 0


def _absolute_source(source: str) -> str:
    """Local paths made absolute, so the catalog (or a server doing the work) reads the same folder."""
    from pathlib import Path

    prefix, rest = ("gguf:", source[5:]) if source.startswith("gguf:") else ("", source)
    p = Path(rest).expanduser()
    return prefix + str(p.absolute()) if p.exists() else source


def cmd_base_list(ctx: Context) -> int:
    from loradex.hub.bases import list_bases

    rows = list_bases(ctx.catalog)
    ctx.emit(rows, lambda: table(
        [dict(r, size=human_bytes(r["size_bytes"])) for r in rows],
        ["name", "kind", "architecture", "num_parameters", "size", "source"]) if rows else "no bases yet: run `loradex init`")
    return 0


def cmd_register(ctx: Context) -> int:
    from pathlib import Path

    from loradex.hub.registry import register_adapter

    path = ctx.args.path if ctx.args.path.startswith("hf:") else str(Path(ctx.args.path).absolute())
    row = register_adapter(ctx.catalog, ctx.store, path, ctx.args.name, base=ctx.args.base,
                           allow_noop=ctx.args.allow_noop, description=ctx.args.description)
    if row.get("existing"):
        ctx.emit(row, f"already registered as {row['adapter']}@{row['version']} (same files, digest {row['digest'][:12]})")
        return 0
    ctx.emit(row, lambda: f"registered {row['adapter']}@{row['version']} (base {row['base']}, r={row['rank']}, "
             f"alpha={row['alpha']:g}, targets {','.join(row['target_modules'])}, "
             f"{row['param_count']:,} params, {human_bytes(row['size_bytes'])}, digest {row['digest'][:12]})")
    return 0


def cmd_list(ctx: Context) -> int:
    from loradex.hub.registry import list_adapters

    rows = [dict(r, ref=f"{r['adapter']}@{r['version']}") for r in list_adapters(ctx.catalog, base=ctx.args.base)]
    ctx.emit(rows, lambda: table(
        [dict(r, size=human_bytes(r["size_bytes"]), targets=",".join(r["target_modules"]), sha=r["digest"][:12])
         for r in rows],
        ["ref", "aliases", "base", "rank", "alpha", "targets", "param_count", "size", "sha", "created_at"],
    ) if rows else "no adapters registered")
    return 0


def cmd_show(ctx: Context) -> int:
    from loradex.hub.queries import adapter_detail

    data = adapter_detail(ctx.catalog, ctx.args.ref)
    ctx.emit(data, lambda: _show_text(data["adapter"], data["aliases"], data["versions"]))
    return 0


def _show_text(name: str, aliases: dict, versions: list[dict]) -> str:
    out = [f"adapter {name}" + (f"  aliases: {', '.join(f'{a}->{v}' for a, v in aliases.items())}" if aliases else "")]
    for v in versions:
        out.append(f"\n  version {v['version']}" + (f"  [{', '.join(v['aliases'])}]" if v["aliases"] else ""))
        out.append(f"    base         {v['base']}")
        out.append(f"    rank/alpha   r={v['rank']} alpha={v['alpha']:g}")
        out.append(f"    targets      {', '.join(v['target_modules'])}")
        out.append(f"    parameters   {v['param_count']:,}")
        out.append(f"    size         {human_bytes(v['size_bytes'])}")
        out.append(f"    digest       {v['digest']}")
        for f, sha in sorted(v["files"].items()):
            out.append(f"    sha256       {sha}  {f}")
        out.append(f"    quantization {v['quantization'] or 'none'}   source {v['source']}")
        out.append(f"    created      {v['created_at']}")
        tr = v["training_run"]
        if tr:
            cost = f"${tr['cost_usd']:.4f}" if tr["cost_usd"] is not None else "-"
            loss = f"{tr['final_loss']:.4f}" if tr["final_loss"] is not None else "-"
            out.append(f"    training     run {tr['id']} {tr['status']}, {(tr.get('method') or 'sft').upper()}, "
                       f"{tr['steps']} steps, final loss {loss}, "
                       f"{tr['device']}/{tr['precision']}, est. cost {cost}, data {str(tr['data_sha256'])[:12]}")
            pref = tr.get("preference")
            if pref:
                out.append(f"    preference   margin log p(chosen) - log p(rejected) {pref['margin_before']:+.3f} -> "
                           f"{pref['margin_after']:+.3f} nats on {pref['n']} pairs (preferred {pref['accuracy_before']:.0%} "
                           f"-> {pref['accuracy_after']:.0%})")
            if tr.get("loss_png"):
                out.append(f"    loss curve   {tr['loss_png']}")
        if v.get("served"):
            out.append(f"    as served    {v['served']['note']}")
        for ev in v["evals"]:
            parts = []
            for metric, m in sorted((ev["metrics"] or {}).items()):
                lift = (ev["paired"] or {}).get(metric)
                txt = f"{metric} {m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
                if lift:
                    txt += f" lift {lift['diff']:+.3f} [{lift['ci_low']:+.3f}, {lift['ci_high']:+.3f}]"
                parts.append(txt)
            from loradex.evals.config import config_label

            out.append(f"    eval run {ev['id']} n={ev['n']} data {ev['data_sha256'][:12]} "
                       f"({config_label(ev.get('serving_config'))}): " + "; ".join(parts)
                       + (" ZERO EFFECT (outputs = base's)" if ev.get("zero_effect") else ""))
            for j in v.get("judgements") or []:
                if j["eval_run_id"] == ev["id"]:
                    from loradex.evals.judge import describe

                    out.append(f"      {describe(j['summary'], j['judge'])} [judgement {j['id']}]")
        for r in v.get("reviews") or []:
            from loradex.evals.review import describe_review

            out.append(f"    {describe_review(r)}")
        for f in v.get("forgetting") or []:
            from loradex.evals.config import config_label
            from loradex.evals.record import forgetting_label

            out.append(f"    forgetting {f['id']} ({config_label(f.get('serving_config'))}): {forgetting_label(f)}")
        for m in v["merges"]:
            out.append(f"    merge {m['id']} {m['dtype']} into {m['merged_into']} -> base {m['base_name']}")
        for e in v["exports"]:
            out.append(f"    export {e['id']} {e['format']} {e['path']} ({human_bytes(e['size_bytes'])})")
    return "\n".join(out)


def cmd_alias_set(ctx: Context) -> int:
    from loradex.hub.registry import current_actor, set_alias

    move = set_alias(ctx.catalog, ctx.args.ref, ctx.args.alias, force=ctx.args.force, reason=ctx.args.reason,
                     actor=current_actor())
    msg = (f"{move['adapter']}@{move['alias']} -> version {move['version']}"
           + (f" (forced past the gate: {move['reason']})" if move["forced"] and move["gate"] else ""))
    ctx.emit(move, msg)
    return 0


def cmd_alias_rm(ctx: Context) -> int:
    from loradex.hub.names import check_name
    from loradex.hub.registry import current_actor, remove_alias

    check_name(ctx.args.name, "adapter name")
    remove_alias(ctx.catalog, ctx.args.name, ctx.args.alias, actor=current_actor())
    ctx.emit({"adapter": ctx.args.name, "alias": ctx.args.alias, "removed": True}, f"removed alias {ctx.args.name}@{ctx.args.alias}")
    return 0


def cmd_delete(ctx: Context) -> int:
    from loradex.hub.registry import delete_version

    row = delete_version(ctx.catalog, ctx.store, ctx.args.ref, force=ctx.args.force)
    ctx.emit({"adapter": row["adapter"], "version": row["version"], "deleted": True}, f"deleted {row['adapter']}@{row['version']}")
    return 0


def cmd_verify(ctx: Context) -> int:
    from loradex.hub.registry import verify

    results = verify(ctx.catalog, ctx.store, ctx.args.name)
    bad = [r for r in results if not r["ok"]]

    def human() -> str:
        lines = [f"{r['adapter']}@{r['version']}: " + ("ok" if r["ok"] else "TAMPERED: " + "; ".join(r["problems"])) for r in results]
        lines.append(f"{len(results) - len(bad)}/{len(results)} versions intact")
        return "\n".join(lines)

    ctx.emit(results, human)
    return 8 if bad else 0


def cmd_jobs(ctx: Context) -> int:
    from loradex.hub.jobs import get_job, list_jobs

    if ctx.args.id is not None:
        job = get_job(ctx.catalog, ctx.args.id)
        human = (f"job {job['id']} {job['kind']} {job['state']} ({(job['progress'] or {}).get('phase', '-')})"
                 + (f"\n  error: {job['error']}" if job["error"] else "")
                 + (f"\n  result: {json.dumps(to_jsonable(job['result']), sort_keys=True)}" if job["result"] else ""))
        ctx.emit(job, human)
        return 1 if job["state"] == "failed" else 0
    rows = list_jobs(ctx.catalog, ctx.args.state)
    ctx.emit(rows, lambda: table([dict(r, phase=(r["progress"] or {}).get("phase")) for r in rows],
                                 ["id", "kind", "state", "phase", "actor", "created_at", "finished_at", "error"])
             if rows else "no jobs")
    return 0


# -- parser -------------------------------------------------------------------------

def add_commands(sub, common) -> None:
    """The hub's own commands: init, base, register, list, show, alias, delete, verify, jobs."""
    p = sub.add_parser("init", parents=[common], help="provision the default base model (smollm2-135m-instruct)")
    p.set_defaults(func=cmd_init)

    base = sub.add_parser("base", parents=[common], help="add and list base models")
    bsub = base.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    p = bsub.add_parser("add", parents=[common], help="register a base model from a folder, HF cache id or gguf:PATH")
    p.add_argument("name", help="name to register the base under")
    p.add_argument("--from", dest="source", required=True, help="PATH, HF_ID (already cached) or gguf:PATH")
    p.set_defaults(func=cmd_base_add)
    p = bsub.add_parser("list", parents=[common], help="list base models")
    p.set_defaults(func=cmd_base_list)

    p = sub.add_parser("register", parents=[common], help="validate and register a PEFT LoRA adapter folder")
    p.add_argument("path", help="adapter folder, Hugging Face cache snapshot, or hf:ORG/NAME (cached)")
    p.add_argument("--name", required=True, help="adapter name")
    p.add_argument("--base", help="base model name (default: guessed from base_model_name_or_path)")
    p.add_argument("--allow-noop", action="store_true", help="register even if every lora_B is zero")
    p.add_argument("--description", help="free-text description")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("list", parents=[common], help="list registered adapter versions")
    p.add_argument("--base", help="only adapters of this base")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="show an adapter: versions, files, run, scores, exports")
    p.add_argument("ref", help="NAME, NAME@VERSION or NAME@ALIAS")
    p.set_defaults(func=cmd_show)

    alias = sub.add_parser("alias", parents=[common], help="point aliases (e.g. production) at versions")
    asub = alias.add_subparsers(dest="alias_command", metavar="ACTION", required=True)
    p = asub.add_parser("set", parents=[common], help="set NAME@VERSION's alias (production is gated by evals)")
    p.add_argument("ref", help="NAME@VERSION")
    p.add_argument("alias", help="alias name, e.g. production")
    p.add_argument("--force", action="store_true", help="override the promotion gate (needs --reason; recorded)")
    p.add_argument("--reason", help="why the gate is overridden: recorded with who and when")
    p.set_defaults(func=cmd_alias_set)
    p = asub.add_parser("rm", parents=[common], help="remove an alias")
    p.add_argument("name")
    p.add_argument("alias")
    p.set_defaults(func=cmd_alias_rm)

    p = sub.add_parser("delete", parents=[common], help="delete NAME@VERSION (refused while aliased)")
    p.add_argument("ref", help="NAME@VERSION")
    p.add_argument("--force", action="store_true", help="delete even if an alias points at it")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("verify", parents=[common], help="re-check sha256 of stored adapters; non-zero exit on tampering")
    p.add_argument("name", nargs="?", help="only this adapter (NAME or NAME@VERSION)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("jobs", parents=[common], help="list the server's merge/export/eval jobs, or show one")
    p.add_argument("id", nargs="?", type=int, help="a job id (exit 1 if it failed)")
    p.add_argument("--state", choices=("queued", "running", "succeeded", "failed"), help="only jobs in this state")
    p.set_defaults(func=cmd_jobs)
