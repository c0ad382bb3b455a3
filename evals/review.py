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

The same round without a file (what the web page uses, ``serving/web/``)::

    create_review(catalog, ref, n, seed)        -> {review_id, rows: [{row_id, prompt, reference, answer_a, answer_b}]}
    review_sheet(catalog, review_id)            -> the same blinded rows again (to resume a round)
    record_ratings(catalog, review_id, ratings) -> import_sheet's result; ratings = [{row_id, rating[, comment]}]

Both paths draw, blind, check and un-blind with the same functions below.

A rated round becomes preference data (``loradex review pairs REVIEW_ID -o pairs.jsonl``,
:func:`review_pairs`), one JSON object per line, the format TRL's DPO trainer and
``loradex train --method dpo`` read::

    {"prompt":   [{"role": "user", "content": "..."}],          # the conversation before the answer
     "chosen":   [{"role": "assistant", "content": "..."}],     # the answer the reviewer preferred
     "rejected": [{"role": "assistant", "content": "..."}],     # the other one
     "review": {"review_id": 3, "row_id": "3-9f2c...", "rating": 2, "preferred": "adapter"}}

Ties (rating 3) and rows whose two answers are identical are dropped (counted).
The prompt is the eval item's full conversation (system turn included) when the
eval run's data file is still there with the same sha256; otherwise the stored
prompt text as one user turn (``prompt_source`` says which).
"""
from __future__ import annotations

import csv
import os
import random
import secrets
from pathlib import Path

from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.errors import Conflict, InvalidConfig, InvalidData, NotFound
from loradex.hub.ops import op
from loradex.hub.registry import resolve

from loradex.evals import stats

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


def _draw(catalog: Catalog, ref, n: int, seed: int | None) -> tuple[dict, dict, list[dict], random.Random]:
    """The version, its source eval run, the samples drawn for review, and the rng that orders A/B."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidConfig(f"--n must be a positive integer, got {n!r}")
    version = resolve(catalog, ref) if not isinstance(ref, dict) else ref
    run = _source_run(catalog, version)
    samples = catalog.query(
        "SELECT idx, prompt, reference, output, base_output FROM eval_samples "
        "WHERE run_id = ? AND output IS NOT NULL AND base_output IS NOT NULL ORDER BY idx", [run["id"]])
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    return version, run, samples, rng


def _insert(cur, version: dict, run: dict, chosen: list[dict], rng: random.Random, sheet_path: str | None) -> tuple[int, list[dict]]:
    """Insert the review and its items (the blinding key stays here); return (review id, blinded rows)."""
    rid = cur.execute(
        "INSERT INTO reviews (adapter_version_id, eval_run_id, sheet_path, n, status, created_at) "
        "VALUES (?, ?, ?, ?, 'exported', ?) RETURNING id",
        [version["id"], run["id"], sheet_path, len(chosen), utcnow()]).fetchone()[0]
    rows = []
    for s in chosen:
        row_id = f"{rid}-{secrets.token_hex(4)}"
        adapter_is_a = rng.random() < 0.5
        cur.execute("INSERT INTO review_items (review_id, row_id, prompt, reference, adapter_output, base_output, "
                    "adapter_is_a, rating, sample_idx) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                    [rid, row_id, s["prompt"], s["reference"], s["output"], s["base_output"], adapter_is_a, s["idx"]])
        rows.append(_blinded({"row_id": row_id, "prompt": s["prompt"], "reference": s["reference"],
                              "adapter_output": s["output"], "base_output": s["base_output"],
                              "adapter_is_a": adapter_is_a}))
    return rid, rows


def _blinded(item: dict) -> dict:
    """A review item as the reviewer sees it: answers as A and B, no side named."""
    a, b = (item["adapter_output"], item["base_output"]) if item["adapter_is_a"] else (item["base_output"], item["adapter_output"])
    return {"row_id": item["row_id"], "prompt": item["prompt"], "reference": item["reference"], "answer_a": a, "answer_b": b}


@op("reviews.export", write=True)
def export_sheet(catalog: Catalog, ref, out: str | Path, n: int = 50, seed: int | None = None) -> dict:
    """Write a blinded review sheet for ``ref`` to ``out``; return {review_id, sheet, n, eval_run_id, ...}."""
    version, run, samples, rng = _draw(catalog, ref, n, seed)
    chosen = rng.sample(samples, min(n, len(samples)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with catalog.transaction() as cur:  # the file is written inside the transaction: no row without its sheet
        rid, rows = _insert(cur, version, run, chosen, rng, str(out.absolute()))
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows([{**r, "rating": "", "comment": ""} for r in rows])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    return {"review_id": rid, "sheet": str(out.absolute()), "n": len(chosen), "available": len(samples),
            "adapter": version["adapter"], "version": version["version"], "eval_run_id": run["id"],
            "scale": SCALE_HELP}


@op("reviews.create", write=True)
def create_review(catalog: Catalog, ref, n: int = 50, seed: int | None = None) -> dict:
    """A blinded review round without a file: {review_id, rows, n, available, adapter, version, eval_run_id, scale}."""
    version, run, samples, rng = _draw(catalog, ref, n, seed)
    chosen = rng.sample(samples, min(n, len(samples)))
    with catalog.transaction() as cur:
        rid, rows = _insert(cur, version, run, chosen, rng, None)
    return {"review_id": rid, "n": len(chosen), "available": len(samples), "adapter": version["adapter"],
            "version": version["version"], "eval_run_id": run["id"], "status": "exported", "scale": SCALE_HELP,
            "ratings": RATINGS, "rows": rows}


@op("reviews.sheet")
def review_sheet(catalog: Catalog, review_id: int) -> dict:
    """A review round's blinded rows (as exported), its status, and its result once rated."""
    review = catalog.one("SELECT * FROM reviews WHERE id = ?", [review_id])
    if review is None:
        raise NotFound(f"review {review_id} not found")
    version = catalog.one("SELECT adapter, version FROM adapter_versions WHERE id = ?", [review["adapter_version_id"]])
    items = catalog.query("SELECT * FROM review_items WHERE review_id = ? ORDER BY row_id", [review_id])
    return {"review_id": review_id, "n": review["n"], "adapter": version["adapter"] if version else None,
            "version": version["version"] if version else None, "eval_run_id": review["eval_run_id"],
            "status": review["status"], "sheet": review["sheet_path"], "result": review["result"],
            "scale": SCALE_HELP, "ratings": RATINGS, "rows": [_blinded(i) for i in items]}


def describe_review(review: dict) -> str:
    """One line for `show`, the leaderboard and `review list`: a round's human verdict, or that it awaits ratings."""
    head = f"review {review['id']} (eval run {review.get('eval_run_id')}, {review['n']} rows)"
    r = review.get("result")
    if review.get("status") != "imported" or not r:
        return f"{head}: exported, awaiting ratings"
    return (f"{head}: human preference for the adapter {r['preference_rate']:.0%} "
            f"[95% CI {r['ci_low']:.0%}, {r['ci_high']:.0%}] ({r['adapter_preferred']} adapter, {r['ties']} ties, "
            f"{r['base_preferred']} base)")


def _conversations(run: dict | None) -> tuple[list | None, str]:
    """The eval data file's conversations by item index, if the file is unchanged; else None and why."""
    from loradex.evals.data import read_eval_set

    if not run or not run.get("data_path"):
        return None, "review text (the eval run is gone)"
    path = Path(run["data_path"])
    if not path.is_file():
        return None, f"review text ({path} is gone)"
    try:
        data = read_eval_set(path)
    except InvalidData:
        return None, f"review text ({path} no longer reads as an eval set)"
    if data.sha256 != run["data_sha256"]:
        return None, f"review text ({path} changed since the eval)"
    return [list(it.messages) for it in data.items], f"eval data {path}"


@op("reviews.pairs")
def review_pairs(catalog: Catalog, review_id: int) -> dict:
    """A rated review round as DPO pairs (see the module docstring): {review_id, pairs, n, ties, identical, ...}."""
    review = catalog.one("SELECT * FROM reviews WHERE id = ?", [review_id])
    if review is None:
        raise NotFound(f"review {review_id} not found")
    if review["status"] != "imported":
        raise Conflict(f"review {review_id} has no ratings yet: fill its sheet and run `loradex review import SHEET` "
                       f"(or rate it on the web page) first")
    run = catalog.one("SELECT id, data_path, data_sha256 FROM eval_runs WHERE id = ?", [review["eval_run_id"]])
    convs, source = _conversations(run)
    by_text = {}
    if convs is not None:
        from loradex.evals.data import EvalItem

        for i, msgs in enumerate(convs):
            by_text.setdefault(EvalItem(tuple(msgs), "", 0).prompt_text, i)  # rows exported before sample_idx
    items = catalog.query("SELECT * FROM review_items WHERE review_id = ? ORDER BY row_id", [review_id])
    pairs, ties, identical, fallback = [], 0, 0, 0
    for it in items:
        rating = int(it["rating"])
        if rating == 3:
            ties += 1
            continue
        adapter_won = (rating < 3) == bool(it["adapter_is_a"])
        chosen, rejected = ((it["adapter_output"], it["base_output"]) if adapter_won
                            else (it["base_output"], it["adapter_output"]))
        if _same(chosen, rejected):
            identical += 1
            continue
        idx = it.get("sample_idx")
        if convs is not None and idx is None:
            idx = by_text.get(it["prompt"])
        if convs is not None and idx is not None and 0 <= idx < len(convs):
            prompt = convs[idx]
        else:
            prompt = [{"role": "user", "content": it["prompt"]}]
            fallback += 1
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}],
                      "review": {"review_id": review_id, "row_id": it["row_id"], "rating": rating,
                                 "preferred": "adapter" if adapter_won else "base"}})
    version = catalog.one("SELECT adapter, version FROM adapter_versions WHERE id = ?", [review["adapter_version_id"]])
    return {"review_id": review_id, "adapter": version["adapter"] if version else None,
            "version": version["version"] if version else None, "n": len(pairs), "rated": len(items), "ties": ties,
            "identical": identical, "prompt_source": source if not fallback else
            (f"review text for {fallback} row(s): {source}" if convs is not None else source), "pairs": pairs}


def write_pairs(result: dict, out: str | Path) -> Path:
    """Write :func:`review_pairs`' pairs as JSONL (temp file, fsync, rename)."""
    import json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in result["pairs"]:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


@op("reviews.latest")
def latest_reviews(catalog: Catalog) -> dict[str, dict]:
    """{NAME@V: its latest rated review round (id, eval_run_id, n, status, result)} for every version with one."""
    rows = catalog.query(
        "SELECT r.id, r.eval_run_id, r.n, r.status, r.result, r.imported_at, v.adapter, v.version FROM reviews r "
        "JOIN adapter_versions v ON v.id = r.adapter_version_id WHERE r.status = 'imported' ORDER BY r.id DESC")
    latest: dict[str, dict] = {}
    for r in rows:
        latest.setdefault(f"{r['adapter']}@{r['version']}", r)
    return latest


def _same(a: str | None, b: str | None) -> bool:
    norm = lambda s: (s or "").replace("\r\n", "\n").replace("\r", "\n")  # noqa: E731  (spreadsheets rewrite newlines)
    return norm(a) == norm(b)


def _fail(where, problems: list[str]) -> None:
    """One InvalidData naming the sheet (or review) and the first few problems."""
    more = f" (and {len(problems) - MAX_LISTED} more problems)" if len(problems) > MAX_LISTED else ""
    raise InvalidData(f"{where}: " + "; ".join(problems[:MAX_LISTED]) + more)


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
    return _record(catalog, review, path, [(f"line {line}", row) for line, row in rows], check_texts=True)


@op("reviews.rate", write=True)
def record_ratings(catalog: Catalog, review_id: int, ratings: list[dict]) -> dict:
    """Store a whole round's ratings ``[{row_id, rating[, comment]}]`` given in the browser; same checks and result as import_sheet."""
    review = catalog.one("SELECT * FROM reviews WHERE id = ?", [review_id])
    if review is None:
        raise NotFound(f"review {review_id} not found")
    if not isinstance(ratings, list) or not all(isinstance(r, dict) for r in ratings):
        raise InvalidData(f"review {review_id}: ratings must be a list of {{row_id, rating}} objects")
    if not ratings:
        _fail(f"review {review_id}", ["no ratings given"])
    entries = [(f"item {i + 1}", {k: ("" if v is None else str(v)) for k, v in r.items()}) for i, r in enumerate(ratings)]
    return _record(catalog, review, f"review {review_id}", entries, check_texts=False)


def _record(catalog: Catalog, review: dict, where, entries: list[tuple[str, dict]], *, check_texts: bool) -> dict:
    """Check every entry (each row once, known ids, texts unchanged, ratings 1-5), then store, un-blind, summarise.

    ``entries`` are (position, row) pairs: a sheet's lines, or the items of a JSON list.
    Nothing is stored unless the whole round passes.
    """
    if review["status"] == "imported":
        raise Conflict(f"review {review['id']} was already imported at {review['imported_at']}; export a new sheet to review again")
    items = {r["row_id"]: r for r in catalog.query("SELECT * FROM review_items WHERE review_id = ?", [review["id"]])}
    problems: list[str] = []
    seen: dict[str, str] = {}
    ratings: dict[str, int] = {}
    for pos, row in entries:
        row_id = (row.get("row_id") or "").strip()
        label = f"row {row_id or '(no id)'} ({pos})"
        if not row_id:
            problems.append(f"{pos}: empty row_id")
            continue
        if row_id not in items:
            problems.append(f"{label}: unknown row id (not in review {review['id']})")
            continue
        if row_id in seen:
            problems.append(f"{label}: duplicated row (also on {seen[row_id]})")
            continue
        seen[row_id] = pos
        if check_texts:
            expected = _blinded(items[row_id])
            changed = [c for c in TEXT_COLUMNS if not _same(row.get(c), expected[c])]
            if changed:
                problems.append(f"{label}: {', '.join(changed)} changed since export (tampered sheet)")
                continue
        raw = (row.get("rating") or "").strip()
        if not raw:
            problems.append(f"{label}: missing rating ({SCALE_HELP})")
            continue
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value not in RATINGS:
            problems.append(f"{label}: rating {raw!r} out of range ({SCALE_HELP})")
            continue
        ratings[row_id] = value
    absent = [rid for rid in items if rid not in seen]
    if absent:
        problems.append(f"{len(absent)} exported row(s) missing from the sheet: {', '.join(sorted(absent)[:MAX_LISTED])}")
    if problems:
        _fail(where, problems)

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
        if cur.execute("SELECT status FROM reviews WHERE id = ?", [review["id"]]).fetchone()[0] == "imported":
            raise Conflict(f"review {review['id']} was rated meanwhile by another client; export a new sheet to review again")
        for row_id, value in ratings.items():
            cur.execute("UPDATE review_items SET rating = ? WHERE review_id = ? AND row_id = ?",
                        [str(value), review["id"], row_id])
        cur.execute("UPDATE reviews SET status = 'imported', result = ?, imported_at = ? WHERE id = ?",
                    [to_json({k: v for k, v in result.items() if k != "rows"}), utcnow(), review["id"]])
    return result
