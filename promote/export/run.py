"""One export, top to bottom: plan (catalog) -> merge if needed -> write + check -> record.

    plan    resolve NAME[@V], verify the adapter snapshot, find the merge to ship
            (``--dtype`` picks one; none yet -> merge in fp32 first, recorded as usual)
    write   FORMATS[format](source, out, options) writes into --out and checks
    record  loradex_export.json (lineage + resolved options) beside the files, then an
            ``exports`` row: format, path, sha256 per file, size, method, check results,
            adapter_version_id and merge_id

The catalog is not needed while writing, so the CLI closes it between phases.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.ops import op
from loradex.hub.store import Store, file_sha256
from loradex.promote.export import FORMATS
from loradex.promote.export.source import ExportOptions, ExportResult, ExportSource, prepare_out
from loradex.promote.families import check_architecture
from loradex.promote.merge import FIXED_PROBES, MergeConfig, find_merge, merged_folder, probe_prompts

MANIFEST = "loradex_export.json"


@dataclass
class ExportPlan:
    source: ExportSource
    options: ExportOptions
    out: Path

    @property
    def missing_merge(self) -> bool:
        return self.options.needs_merge and self.source.merge is None


@op("exports.plan")
def plan_export(catalog: Catalog, store: Store, ref: str | dict, out: str | Path, options: ExportOptions) -> ExportPlan:
    from loradex.hub.bases import get_base
    from loradex.hub.registry import adapter_folder

    version, adapter_dir = adapter_folder(catalog, store, ref)
    base = get_base(catalog, version["base"], store=store)
    check_architecture(base.get("architecture"), f"loradex export --format {options.format}", base.get("model_type"))
    merge = merged_dir = None
    if options.needs_merge:
        merge = find_merge(catalog, version["id"], options.dtype)
        if merge is not None:
            merged_dir = merged_folder(catalog, store, merge)
    probes, _ = probe_prompts(catalog, version["id"], len(FIXED_PROBES))
    src = ExportSource(version=version, adapter_dir=adapter_dir, base=base, base_dir=Path(base["path"]),
                       merge=merge, merged_dir=merged_dir, probes=probes)
    return ExportPlan(source=src, options=options, out=Path(out).expanduser().absolute())


def merge_config(options: ExportOptions) -> MergeConfig:
    return MergeConfig(dtype=options.dtype or "fp32")


def attach_merge(plan: ExportPlan, catalog: Catalog, store: Store, merge_row: dict) -> None:
    plan.source.merge = merge_row
    plan.source.merged_dir = merged_folder(catalog, store, merge_row)


def write_export(plan: ExportPlan) -> ExportResult:
    """Write and check the export into ``plan.out`` (no catalog needed); cleans up on failure."""
    out = prepare_out(plan.out, plan.options.force)
    created = not any(out.iterdir())
    try:
        result = FORMATS[plan.options.format](plan.source, out, plan.options)
        write_manifest(plan, result)
        return result
    except BaseException:
        if created:
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise


def write_manifest(plan: ExportPlan, result: ExportResult) -> None:
    src = plan.source
    manifest = {
        "format": plan.options.format, "options": asdict(plan.options), "method": result.method,
        "adapter": src.version["adapter"], "version": src.version["version"],
        "adapter_version_id": src.version["id"], "adapter_digest": src.version["digest"], "base": src.base["name"],
        "merge_id": src.merge["id"] if src.merge else None,
        "merged_model": src.merge["base_name"] if src.merge else None,
        "command": result.command, "check": result.check,
    }
    (plan.out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))


def hash_folder(folder: Path) -> tuple[dict[str, str], int]:
    files, size = {}, 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(folder))
            files[rel] = file_sha256(p)
            size += p.stat().st_size
    return files, size


@op("exports.record", write=True)
def record_export(catalog: Catalog, plan: ExportPlan, result: ExportResult) -> dict:
    files, size = hash_folder(plan.out)
    src = plan.source
    check = dict(result.check, command=result.command, primary=result.primary, notes=result.notes)
    with catalog.transaction() as cur:
        eid = cur.execute(
            "INSERT INTO exports (adapter_version_id, merge_id, format, path, files, size_bytes, method, check_result, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [src.version["id"], src.merge["id"] if src.merge else None, plan.options.format, str(plan.out),
             to_json(files), size, result.method, to_json(check), utcnow()],
        ).fetchone()[0]
    return catalog.one("SELECT * FROM exports WHERE id = ?", [eid])


def export_adapter(catalog: Catalog, store: Store, ref: str | dict, out: str | Path, options: ExportOptions,
                   settings=None) -> dict:
    """Plan, merge if needed, write, check and register one export; returns the exports row."""
    from loradex.promote.merge import merge_adapter

    plan = plan_export(catalog, store, ref, out, options)
    if plan.missing_merge:
        attach_merge(plan, catalog, store, merge_adapter(catalog, store, plan.source.version,
                                                         merge_config(options), settings))
    result = write_export(plan)
    return record_export(catalog, plan, result)
