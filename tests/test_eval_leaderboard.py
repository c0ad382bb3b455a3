"""Leaderboard ranking on constructed eval rows: best first, per data set, latest run per version."""
from __future__ import annotations

import pytest

from loradex.evals.leaderboard import build, render_text, write_png
from loradex.hub.errors import InvalidConfig, NotFound
from tests.catalog_rows import DATA_A, DATA_B, add_run, add_version

BASE = [0.4, 0.5, 0.45, 0.35, 0.5, 0.42]


def test_ranks_best_first_per_data_set(catalog, tmp_path):
    a1, a2, b1 = add_version(catalog, "alpha", 1), add_version(catalog, "alpha", 2), add_version(catalog, "beta", 1)
    add_run(catalog, a1, [x + 0.1 for x in BASE], BASE)
    add_run(catalog, a2, [x + 0.3 for x in BASE], BASE)
    add_run(catalog, b1, [x + 0.2 for x in BASE], BASE)
    add_run(catalog, b1, [x - 0.1 for x in BASE], BASE, data_sha=DATA_B)
    add_run(catalog, a1, [x + 0.4 for x in BASE], BASE, data_sha=DATA_B)
    add_run(catalog, a1, [x + 0.05 for x in BASE], BASE)  # alpha@1's latest run on A replaces its first

    sections = build(catalog)
    assert [s["data_sha256"] for s in sections] == [DATA_A, DATA_B]  # newest data set first
    a = sections[0]
    assert [r["ref"] for r in a["rows"]] == ["alpha@2", "beta@1", "alpha@1"]
    assert [r["rank"] for r in a["rows"]] == [1, 2, 3]
    assert a["rows"][0]["lift"] == pytest.approx(0.3) and a["rows"][0]["lift_ci_low"] == pytest.approx(0.3)
    assert a["rows"][2]["lift"] == pytest.approx(0.05)
    assert a["rows"][0]["ci_low"] <= a["rows"][0]["mean"] <= a["rows"][0]["ci_high"]
    assert [r["ref"] for r in build(catalog, DATA_B[:8])[0]["rows"]] == ["alpha@1", "beta@1"]
    text = render_text(sections)
    assert "ranked by similarity" in text and "+0.300 [+0.300, +0.300]" in text
    png = write_png(sections, tmp_path / "lb.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_perplexity_ranks_lowest_first(catalog):
    v1, v2 = add_version(catalog, "p", 1), add_version(catalog, "p", 2)
    add_run(catalog, v1, [5.0, 6.0, 7.0], [9.0, 9.0, 9.0], metric="perplexity")
    add_run(catalog, v2, [3.0, 4.0, 5.0], [9.0, 9.0, 9.0], metric="perplexity")
    rows = build(catalog)[0]["rows"]
    assert [r["ref"] for r in rows] == ["p@2", "p@1"] and rows[0]["lift"] == pytest.approx(-5.0)


def test_data_filter_errors(catalog, tmp_path):
    v = add_version(catalog, "alpha", 1)
    add_run(catalog, v, BASE, BASE)
    with pytest.raises(NotFound):
        build(catalog, "c" * 10)
    with pytest.raises(InvalidConfig, match="no such file"):
        build(catalog, "not-a-file.jsonl")
    add_run(catalog, v, BASE, BASE, data_sha="a" * 63 + "b")
    with pytest.raises(InvalidConfig, match="matches 2 data sets"):
        build(catalog, "aaaaaa")
    assert build(catalog, "a" * 64)[0]["data_sha256"] == DATA_A
    assert render_text([]) .startswith("no eval runs yet")


def test_png_panels_are_titled_by_file_name_with_n(catalog, tmp_path):
    from loradex.evals.leaderboard import panel_title

    add_run(catalog, add_version(catalog, "alpha", 1), [x + 0.1 for x in BASE], BASE)
    section = build(catalog)[0]
    title = panel_title(section)
    from pathlib import Path

    assert title.startswith(f"{Path(section['data_path']).name} (n={len(BASE)}, sha256 {section['data_sha256'][:8]}")
    assert panel_title({**section, "rows": [{**r, "n": n} for r, n in zip(section["rows"] * 2, (20, 50))]}
                       ).split(" (")[1].startswith("n=20-50")


def test_different_settings_are_separate_sections_and_partial_panels_say_so(catalog):
    from loradex.evals.leaderboard import panel_title

    a1, b1 = add_version(catalog, "alpha", 1), add_version(catalog, "beta", 1)
    add_run(catalog, a1, [x + 0.1 for x in BASE], BASE, max_new_tokens=64)
    add_run(catalog, b1, [x + 0.3 for x in BASE], BASE, max_new_tokens=8)  # better, but other settings
    add_run(catalog, b1, [x + 0.3 for x in BASE[:3]], BASE[:3], max_new_tokens=64)  # same settings, fewer items
    sections = build(catalog)
    assert [(s["n"], s["coverage"], [r["ref"] for r in s["rows"]]) for s in sections] == [
        (6, "full", ["beta@1"]), (6, "full", ["alpha@1"]), (3, "partial", ["beta@1"])]
    assert {s["settings_label"] for s in sections[:2]} == {"n=6, max_new_tokens=8, similarity",
                                                           "n=6, max_new_tokens=64, similarity"}
    assert "n=3 of 6, partial" in panel_title(sections[2])
    assert len({s["compare_key"] for s in sections}) == 3
