"""Blinded review round trip: export, fill, import; tampered, incomplete and bad sheets are refused."""
from __future__ import annotations

import csv
import json

import pytest

from loradex.evals.review import export_sheet, import_sheet
from loradex.hub.errors import Conflict, InvalidData, NotFound
from tests.catalog_rows import add_run, add_version
from tests.helpers import run_cli

N = 12


@pytest.fixture
def reviewed(catalog):
    v = add_version(catalog, "bot", 1)
    add_run(catalog, v, [0.5] * N, [0.4] * N)
    return v


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _fill(catalog, rows, adapter_rating=1, base_rating=5, ties=0):
    """Rate every row: the adapter's side wins, except the first ``ties`` rows (3)."""
    key = {r["row_id"]: r["adapter_is_a"] for r in catalog.query("SELECT row_id, adapter_is_a FROM review_items")}
    for i, row in enumerate(rows):
        if i < ties:
            row["rating"] = "3"
        else:
            row["rating"] = str(adapter_rating if key[row["row_id"]] else base_rating)
    return rows


def test_export_is_blinded_and_random_per_row(catalog, reviewed, tmp_path):
    res = export_sheet(catalog, "bot", tmp_path / "sheet.csv", n=10, seed=7)
    assert res["n"] == 10 and res["available"] == N
    rows = _read(tmp_path / "sheet.csv")
    assert list(rows[0]) == ["row_id", "prompt", "reference", "answer_a", "answer_b", "rating", "comment"]
    text = (tmp_path / "sheet.csv").read_text()
    assert "adapter_is_a" not in text and "adapter" not in rows[0]
    key = catalog.query("SELECT row_id, adapter_is_a, adapter_output FROM review_items WHERE review_id = ?", [res["review_id"]])
    assert len(key) == 10
    sides = {r["row_id"]: r for r in key}
    for row in rows:
        item = sides[row["row_id"]]
        assert (row["answer_a"] if item["adapter_is_a"] else row["answer_b"]) == item["adapter_output"]
    assert 0 < sum(r["adapter_is_a"] for r in key) < 10  # both orders occur
    assert catalog.one("SELECT status FROM reviews WHERE id = ?", [res["review_id"]])["status"] == "exported"


def test_round_trip_unblinds_and_reports_preference(catalog, reviewed, tmp_path):
    sheet = tmp_path / "sheet.csv"
    res = export_sheet(catalog, "bot@1", sheet, n=N, seed=1)
    _write(sheet, _fill(catalog, _read(sheet), ties=2))
    out = import_sheet(catalog, sheet)
    assert out["review_id"] == res["review_id"] and out["n"] == N
    assert (out["adapter_preferred"], out["base_preferred"], out["ties"]) == (N - 2, 0, 2)
    assert out["preference_rate"] == pytest.approx((N - 2 + 1) / N)
    assert out["ci_low"] < out["preference_rate"] <= out["ci_high"] and out["method"].startswith("bootstrap")
    assert all(r["preferred"] in ("adapter", "tie") for r in out["rows"])
    stored = catalog.one("SELECT status, result FROM reviews WHERE id = ?", [res["review_id"]])
    assert stored["status"] == "imported" and stored["result"]["adapter_preferred"] == N - 2
    ratings = [r["rating"] for r in catalog.query("SELECT rating FROM review_items WHERE review_id = ?", [res["review_id"]])]
    assert len(ratings) == N and sorted(set(ratings)) <= ["1", "3", "5"] and ratings.count("3") == 2
    with pytest.raises(Conflict, match="already imported"):
        import_sheet(catalog, sheet)


def test_base_preferred_without_ties_uses_wilson(catalog, reviewed, tmp_path):
    sheet = tmp_path / "sheet.csv"
    export_sheet(catalog, "bot", sheet, n=8, seed=2)
    _write(sheet, _fill(catalog, _read(sheet), adapter_rating=4, base_rating=2))  # reviewer picks the base every time
    out = import_sheet(catalog, sheet)
    assert out["preference_rate"] == 0.0 and out["base_preferred"] == 8 and out["method"] == "wilson"
    assert out["ci_low"] == 0.0 and 0.2 < out["ci_high"] < 0.4


@pytest.mark.parametrize("damage, message", [
    (lambda rows: rows[3].update(rating=""), "missing rating"),
    (lambda rows: rows[2].update(rating="7"), "rating '7' out of range"),
    (lambda rows: rows[2].update(rating="great"), "rating 'great' out of range"),
    (lambda rows: rows[1].update(answer_a=rows[1]["answer_a"] + " (edited)"), "answer_a changed since export"),
    (lambda rows: rows[0].update(answer_a=rows[0]["answer_b"], answer_b=rows[0]["answer_a"]), "answer_a, answer_b changed"),
    (lambda rows: rows.append(dict(rows[0])), "duplicated row"),
    (lambda rows: rows[4].update(row_id=rows[4]["row_id"].split("-")[0] + "-deadbeef"), "unknown row id"),
    (lambda rows: rows.pop(5), "1 exported row(s) missing from the sheet"),
])
def test_bad_sheets_name_the_row(catalog, reviewed, tmp_path, damage, message):
    sheet = tmp_path / "sheet.csv"
    export_sheet(catalog, "bot", sheet, n=8, seed=3)
    rows = _fill(catalog, _read(sheet))
    damage(rows)
    _write(sheet, rows)
    with pytest.raises(InvalidData) as exc:
        import_sheet(catalog, sheet)
    assert message in str(exc.value) and str(sheet) in str(exc.value)
    if "missing from" not in message:
        assert "row " in str(exc.value) and "(line " in str(exc.value)
    # nothing was stored
    assert catalog.one("SELECT status FROM reviews")["status"] == "exported"
    assert catalog.one("SELECT count(*) AS n FROM review_items WHERE rating IS NOT NULL")["n"] == 0


def test_not_a_sheet_and_no_outputs(catalog, reviewed, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidData, match="missing column"):
        import_sheet(catalog, other)
    fake = tmp_path / "fake.csv"
    _write(fake, [{"row_id": "77-abc", "prompt": "p", "reference": "r", "answer_a": "a", "answer_b": "b",
                   "rating": "1", "comment": ""}])
    with pytest.raises(InvalidData, match="no row id matches an exported review"):
        import_sheet(catalog, fake)
    v2 = add_version(catalog, "bot", 2)
    with pytest.raises(NotFound, match="no eval run with generated outputs"):
        export_sheet(catalog, v2, tmp_path / "x.csv")


def test_cli_round_trip_and_one_line_errors(catalog, reviewed, tmp_path):
    catalog.close()
    sheet = tmp_path / "sheet.csv"
    r = run_cli("review", "export", "bot", "--n", "6", "--out", str(sheet))
    assert r.returncode == 0, r.stderr
    assert "6 blinded rows" in r.stdout
    rows = _read(sheet)
    rows[0]["rating"] = "9"
    _write(sheet, rows)
    r = run_cli("review", "import", str(sheet))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"row {rows[0]['row_id']}" in r.stderr
    from loradex.hub.catalog import Catalog
    from loradex.hub.settings import Settings

    with Catalog.open(Settings().catalog_path) as cat:
        _write(sheet, _fill(cat, rows))
    r = run_cli("review", "import", str(sheet), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["adapter_preferred"] == 6 and out["preference_rate"] == 1.0


def test_stored_review_is_shown_by_show_and_leaderboard(catalog, reviewed, tmp_path):
    sheet = tmp_path / "sheet.csv"
    res = export_sheet(catalog, "bot", sheet, n=N, seed=2)
    catalog.close()
    r = run_cli("show", "bot")
    assert r.returncode == 0, r.stderr
    assert f"review {res['review_id']} (eval run {res['eval_run_id']}, {N} rows): exported, awaiting ratings" in r.stdout
    from loradex.hub.catalog import Catalog
    from loradex.hub.settings import Settings

    with Catalog.open(Settings().catalog_path) as cat:
        _write(sheet, _fill(cat, _read(sheet), ties=2))
        import_sheet(cat, sheet)
    line = (f"review {res['review_id']} (eval run {res['eval_run_id']}, {N} rows): human preference for the adapter "
            f"{(N - 1) / N:.0%}")
    r = run_cli("show", "bot")
    assert r.returncode == 0 and line in r.stdout and f"({N - 2} adapter, 2 ties, 0 base)" in r.stdout, r.stdout
    r = run_cli("leaderboard")
    assert r.returncode == 0, r.stderr
    board = r.stdout.split("human reviews and judges (latest per version):")
    assert len(board) == 2 and "bot@1" in board[1] and line in board[1]
    r = run_cli("leaderboard", "--json")
    assert json.loads(r.stdout)["reviews"]["bot@1"]["id"] == res["review_id"]
