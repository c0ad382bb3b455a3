"""Blinded human review: export an A/B sheet, import the ratings, un-blind, report.

Export takes items from the adapter version's latest eval run (its stored
outputs: no model is loaded), shows each prompt with the reference and the two
answers (adapter and base) as ``answer_a``/``answer_b`` in an order drawn at
random per row. Which side is the adapter is kept only in the catalog
(``review_items.adapter_is_a``), never in the sheet.

The reviewer fills ``rating`` on every row with one of::

    1  A is much better    2  A is better    3  same / can't tell
    4  B is better         5  B is much better

Import checks the whole sheet before storing anything: every exported row
present exactly once, no unknown row ids, texts unchanged, every rating an
integer 1-5. Then it stores the ratings and reports the adapter's preference
rate: (rows where the adapter's answer won + half the ties) / rows, with a
95% CI (Wilson when there are no ties, bootstrap otherwise; ``method`` says).
"""
from __future__ import annotations

import csv
import os
import random
import secrets
from pathlib import Path

from hub.catalog import Catalog, to_json, utcnow
from hub.errors import Conflict, InvalidConfig, InvalidData, NotFound
from hub.ops import op
from hub.registry import resolve

from evals import stats

COLUMNS = ["row_id", "prompt", "reference", "answer_a", "answer_b", "rating", "comment"]
TEXT_COLUMNS = ("prompt", "reference", "answer_a", "answer_b")
RATINGS = {1: "A much better", 2: "A better", 3: "same", 4: "B better", 5: "B much better"}
SCALE_HELP = "1 = A much better, 2 = A better, 3 = same, 4 = B better, 5 = B much better"
MAX_LISTED = 5


def _source_run(catalog: Catalog, version: dict) -> dict:
    run = catalog.one(
        "SELECT r.id, r.n, r.data_sha256 FROM eval_runs r WHERE r.adapter_version_id = ? AND EXISTS ("
        "SELECT 1 FROM eval_samples s WHERE s.run_id = r.id AND s.output IS NOT NULL AND s.base_output IS NOT NULL) "
        "ORDER BY r.id DESC LIMIT 1", [version["id"]])
    if run is None:
        raise NotFound(f"{version['adapter']}@{version['version']} has no eval run with generated outputs to review; "
                       f"run `loradex eval {version['adapter']}@{version['version']} --data FILE` first "
                       f"(with --metrics similarity or exact)")
    return run


@op("reviews.export", write=True)
def export_sheet(catalog: Catalog, ref, out: str | Path, n: int = 50, seed: int | None = None) -> dict:
    """Write a blinded review sheet for ``ref`` to ``out``; return {review_id, sheet, n, eval_run_id, ...}."""
    if not isinstance(n, int) or n < 1:
        raise InvalidConfig(f"--n must be a positive integer, got {n!r}")
    version = resolve(catalog, ref) if not isinstance(ref, dict) else ref
    run = _source_run(catalog, version)
    samples = catalog.query(
        "SELECT idx, prompt, reference, output, base_output FROM eval_samples "
        "WHERE run_id = ? AND output IS NOT NULL AND base_output IS NOT NULL ORDER BY idx", [run["id"]])
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    chosen = rng.sample(samples, min(n, len(samples)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with catalog.transaction() as cur:
        rid = cur.execute(
            "INSERT INTO reviews (adapter_version_id, eval_run_id, sheet_path, n, status, created_at) "
            "VALUES (?, ?, ?, ?, 'exported', ?) RETURNING id",
            [version["id"], run["id"], str(out.absolute()), len(chosen), utcnow()]).fetchone()[0]
        rows = []
        for s in chosen:
            row_id = f"{rid}-{secrets.token_hex(4)}"
            adapter_is_a = rng.random() < 0.5
            a, b = (s["output"], s["base_output"]) if adapter_is_a else (s["base_output"], s["output"])
            cur.execute("INSERT INTO review_items VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                        [rid, row_id, s["prompt"], s["reference"], s["output"], s["base_output"], adapter_is_a])
            rows.append({"row_id": row_id, "prompt": s["prompt"], "reference": s["reference"],
                         "answer_a": a, "answer_b": b, "rating": "", "comment": ""})
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    return {"review_id": rid, "sheet": str(out.absolute()), "n": len(chosen), "available": len(samples),
            "adapter": version["adapter"], "version": version["version"], "eval_run_id": run["id"],
            "scale": SCALE_HELP}


def _same(a: str | None, b: str | None) -> bool:
    norm = lambda s: (s or "").replace("\r\n", "\n").replace("\r", "\n")  # noqa: E731  (spreadsheets rewrite newlines)
    return norm(a) == norm(b)


def _fail(path: Path, problems: list[str]) -> None:
    more = f" (and {len(problems) - MAX_LISTED} more problems)" if len(problems) > MAX_LISTED else ""
    raise InvalidData(f"{path}: " + "; ".join(problems[:MAX_LISTED]) + more)


def _read(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise InvalidData(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c != "comment" and c not in (reader.fieldnames or [])]
            if missing:
                raise InvalidData(f"{path}: not a review sheet: missing column(s) {', '.join(missing)} "
                                  f"(expected {', '.join(COLUMNS)})")
            rows = []
            for row in reader:
                if all(not (v or "").strip() for k, v in row.items() if k is not None):
                    continue
                rows.append((reader.line_num, row))
    except UnicodeDecodeError:
        raise InvalidData(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise InvalidData(f"{path}: malformed CSV: {exc}") from None
    if not rows:
        raise InvalidData(f"{path}: the sheet has no rows")
    return rows


@op("reviews.import", write=True)
def import_sheet(catalog: Catalog, path: str | Path) -> dict:
    """Validate a filled sheet, store the ratings, un-blind and summarise; raises InvalidData naming rows."""
    path = Path(path)
    rows = _read(path)
    problems: list[str] = []
    review_ids = set()
    for line, row in rows:
        head = (row.get("row_id") or "").strip().split("-", 1)[0]
        if head.isdigit():
            review_ids.add(int(head))
    ids = sorted(review_ids)
    reviews = {r["id"]: r for r in catalog.query(
        f"SELECT * FROM reviews WHERE id IN ({', '.join('?' * len(ids))})", ids)} if ids else {}
    if len(reviews) > 1:
        _fail(path, [f"rows come from {len(reviews)} different review sheets ({', '.join(map(str, sorted(reviews)))}); "
                     f"import one sheet at a time"])
    if not reviews:
        _fail(path, [f"no row id matches an exported review (first row id {(rows[0][1].get('row_id') or '').strip()!r}); "
                     f"was this sheet made by `loradex review export`?"])
    review = next(iter(reviews.values()))
    if review["status"] == "imported":
        raise Conflict(f"review {review['id']} was already imported at {review['imported_at']}; export a new sheet to review again")
    items = {r["row_id"]: r for r in catalog.query("SELECT * FROM review_items WHERE review_id = ?", [review["id"]])}
    seen: dict[str, int] = {}
    ratings: dict[str, int] = {}
    for line, row in rows:
        row_id = (row.get("row_id") or "").strip()
        where = f"row {row_id or '(no id)'} (line {line})"
        if not row_id:
            problems.append(f"line {line}: empty row_id")
            continue
        if row_id not in items:
            problems.append(f"{where}: unknown row id (not in review {review['id']})")
            continue
        if row_id in seen:
            problems.append(f"{where}: duplicated row (also on line {seen[row_id]})")
            continue
        seen[row_id] = line
        item = items[row_id]
        a, b = (item["adapter_output"], item["base_output"]) if item["adapter_is_a"] else (item["base_output"], item["adapter_output"])
        expected = {"prompt": item["prompt"], "reference": item["reference"], "answer_a": a, "answer_b": b}
        changed = [c for c in TEXT_COLUMNS if not _same(row.get(c), expected[c])]
        if changed:
            problems.append(f"{where}: {', '.join(changed)} changed since export (tampered sheet)")
            continue
        raw = (row.get("rating") or "").strip()
        if not raw:
            problems.append(f"{where}: missing rating ({SCALE_HELP})")
            continue
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value not in RATINGS:
            problems.append(f"{where}: rating {raw!r} out of range ({SCALE_HELP})")
            continue
        ratings[row_id] = value
    absent = [rid for rid in items if rid not in seen]
    if absent:
        problems.append(f"{len(absent)} exported row(s) missing from the sheet: {', '.join(sorted(absent)[:MAX_LISTED])}")
    if problems:
        _fail(path, problems)

    wins = ties = losses = 0
    per_row, scores = [], []
    for row_id, value in ratings.items():
        item = items[row_id]
        if value == 3:
            verdict, score = "tie", 0.5
            ties += 1
        elif (value < 3) == bool(item["adapter_is_a"]):
            verdict, score = "adapter", 1.0
            wins += 1
        else:
            verdict, score = "base", 0.0
            losses += 1
        scores.append(score)
        per_row.append({"row_id": row_id, "rating": value, "adapter_was": "A" if item["adapter_is_a"] else "B",
                        "preferred": verdict})
    summary = stats.summarize(scores, binary=(ties == 0), seed=0)
    version = catalog.one("SELECT adapter, version FROM adapter_versions WHERE id = ?", [review["adapter_version_id"]])
    result = {
        "review_id": review["id"], "adapter": version["adapter"] if version else None,
        "version": version["version"] if version else None, "eval_run_id": review["eval_run_id"],
        "n": len(scores), "adapter_preferred": wins, "base_preferred": losses, "ties": ties,
        "preference_rate": summary["mean"], "ci_low": summary["ci_low"], "ci_high": summary["ci_high"],
        "method": summary["method"], "rows": per_row,
    }
    with catalog.transaction() as cur:
        for row_id, value in ratings.items():
            cur.execute("UPDATE review_items SET rating = ? WHERE review_id = ? AND row_id = ?",
                        [str(value), review["id"], row_id])
        cur.execute("UPDATE reviews SET status = 'imported', result = ?, imported_at = ? WHERE id = ?",
                    [to_json({k: v for k, v in result.items() if k != "rows"}), utcnow(), review["id"]])
    return result
