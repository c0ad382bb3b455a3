"""The web page's server side, without a browser: shell and assets, no CDN, key rules, review rounds as JSON.

The page itself is tested in headless Chromium in tests/test_web_browser.py (marker ``browser``).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from loradex.evals.review import create_review, export_sheet, import_sheet, record_ratings, review_sheet
from loradex.hub.errors import Conflict, InvalidData, NotFound
from tests.catalog_rows import add_run, add_version

KEY = "web-key"
STATIC = Path(__file__).parent.parent / "serving" / "web" / "static"
N = 6


@pytest.fixture
def client(settings, catalog, store):
    """The app over the test's catalog (its base never loads: the page's routes do not need it), behind a key."""
    from fastapi.testclient import TestClient

    from loradex.serving.app import create_app
    from loradex.serving.config import EngineConfig, ServerConfig

    app = create_app(ServerConfig(engine=EngineConfig(base="no-such-base", quantize="none"), api_key=KEY),
                     settings=settings, catalog=catalog, store=store)
    with TestClient(app) as c:
        app.state.server.wait_loaded(30)
        yield c


@pytest.fixture
def rated(catalog):
    v = add_version(catalog, "bot", 1)
    add_run(catalog, v, [0.7] * N, [0.4] * N)
    return v


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_shell_and_assets_are_served_open_with_a_strict_csp(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert '<script type="module" src="/web/static/js/app.js">' in r.text
    for path in sorted(STATIC.rglob("*")):
        if path.is_file():
            rel = path.relative_to(STATIC).as_posix()
            r = client.get(f"/web/static/{rel}")
            assert r.status_code == 200, rel
            assert r.headers["content-type"].split(";")[0] in ("text/html", "text/javascript", "text/css", "image/svg+xml")


def test_no_asset_comes_from_the_internet():
    """Nothing under static/ names another origin (the SVG namespace is a name, not a request)."""
    for path in STATIC.rglob("*"):
        if path.is_file():
            text = path.read_text().replace("http://www.w3.org/2000/svg", "")
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path
            assert "@import" not in text and "fonts.googleapis" not in text


@pytest.mark.parametrize("path", ["/web/static/../routes.py", "/web/static/%2e%2e/routes.py", "/web/static/js",
                                  "/web/static/nope.js", "/web/static/..%2f__init__.py"])
def test_only_static_files_are_served(client, path):
    assert client.get(path).status_code == 404


def test_docs_pages_are_disabled_but_the_schema_stays(client):
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 401  # behind the key, like every route but /health
    schema = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "/v1/reviews/{review_id}/ratings" in schema["paths"]


def test_data_routes_need_the_key(client, rated):
    for method, url, body in (("GET", "/v1/adapters", None), ("POST", "/v1/reviews", {"ref": "bot"}),
                              ("GET", "/v1/reviews/1", None), ("POST", "/v1/reviews/1/ratings", {"ratings": []}),
                              ("GET", "/v1/adapters/bot@1/files", None)):
        assert client.request(method, url, json=body).status_code == 401, url
    assert client.get("/").status_code == 200 and client.get("/health").status_code == 200


def test_review_round_over_http_is_blinded_checked_and_stored(client, catalog, rated):
    r = client.post("/v1/reviews", json={"ref": "bot@1", "n": 4, "seed": 5}, headers=AUTH)
    assert r.status_code == 201, r.text
    created = r.json()
    rid = created["review_id"]
    assert created["n"] == 4 and len(created["rows"]) == 4
    assert set(created["rows"][0]) == {"row_id", "prompt", "reference", "answer_a", "answer_b"}  # no side named
    again = client.get(f"/v1/reviews/{rid}", headers=AUTH).json()
    assert again["status"] == "exported" and sorted(x["row_id"] for x in again["rows"]) == sorted(x["row_id"] for x in created["rows"])
    assert "adapter_is_a" not in r.text and "adapter_output" not in r.text

    rows = created["rows"]
    partial = [{"row_id": rows[0]["row_id"], "rating": 2}, {"row_id": rows[1]["row_id"], "rating": 9}]
    r = client.post(f"/v1/reviews/{rid}/ratings", json={"ratings": partial}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_data"
    msg = r.json()["error"]["message"]
    assert f"review {rid}:" in msg and f"row {rows[1]['row_id']} (item 2): rating '9' out of range" in msg
    assert "2 exported row(s) missing" in msg

    key = {x["row_id"]: x["adapter_is_a"] for x in catalog.query("SELECT row_id, adapter_is_a FROM review_items")}
    ratings = [{"row_id": x["row_id"], "rating": 1 if key[x["row_id"]] else 5, "comment": "ok"} for x in rows]
    r = client.post(f"/v1/reviews/{rid}/ratings", json={"ratings": ratings}, headers=AUTH)
    assert r.status_code == 200, r.text
    res = r.json()
    assert (res["adapter_preferred"], res["base_preferred"], res["ties"], res["preference_rate"]) == (4, 0, 0, 1.0)
    assert client.post(f"/v1/reviews/{rid}/ratings", json={"ratings": ratings}, headers=AUTH).status_code == 409
    shown = client.get("/v1/adapters/bot", headers=AUTH).json()["versions"][0]["reviews"]
    assert shown[0]["status"] == "imported" and shown[0]["result"]["adapter_preferred"] == 4


def test_record_ratings_has_the_sheet_semantics(catalog, rated, tmp_path):
    created = create_review(catalog, "bot", n=N, seed=1)
    rows = created["rows"]
    good = [{"row_id": x["row_id"], "rating": 3} for x in rows]
    for bad, message in ((good + [good[0]], "duplicated row (also on item 1)"),
                         ([{**good[0], "row_id": f"{created['review_id']}-deadbeef"}] + good[1:], "unknown row id"),
                         ([{**good[0], "rating": "great"}] + good[1:], "rating 'great' out of range"),
                         ([{"row_id": good[0]["row_id"]}] + good[1:], "missing rating"),
                         (good[1:], "1 exported row(s) missing")):
        with pytest.raises(InvalidData, match=re.escape(message)):
            record_ratings(catalog, created["review_id"], bad)
    assert catalog.one("SELECT count(*) AS n FROM review_items WHERE rating IS NOT NULL")["n"] == 0
    out = record_ratings(catalog, created["review_id"], good)
    assert out["ties"] == N and out["preference_rate"] == 0.5 and out["method"].startswith("bootstrap")
    assert review_sheet(catalog, created["review_id"])["result"]["ties"] == N
    with pytest.raises(Conflict):
        record_ratings(catalog, created["review_id"], good)
    with pytest.raises(NotFound):
        record_ratings(catalog, 999, good)
    # a CSV round's rows can be rated in the browser too (same rows, same key)
    sheet = export_sheet(catalog, "bot", tmp_path / "s.csv", n=3, seed=2)
    shown = review_sheet(catalog, sheet["review_id"])
    assert shown["sheet"] == str((tmp_path / "s.csv").absolute()) and len(shown["rows"]) == 3
    record_ratings(catalog, sheet["review_id"], [{"row_id": x["row_id"], "rating": 1} for x in shown["rows"]])
    with pytest.raises(Conflict):
        import_sheet(catalog, tmp_path / "s.csv")


def test_file_sizes_come_from_the_store(client, catalog, store, tiny_base, tiny_base_dir, tmp_path):
    from loradex.hub.registry import register_adapter
    from tests.helpers import make_adapter

    row = register_adapter(catalog, store, make_adapter(tiny_base_dir, tmp_path / "ad", scale=0.2), "sized", base="tiny")
    r = client.get("/v1/adapters/sized@1/files", headers=AUTH)
    assert r.status_code == 200, r.text
    files = {f["file"]: f for f in r.json()["files"]}
    assert set(files) == set(row["files"])
    for name, f in files.items():
        assert f["sha256"] == row["files"][name] and f["size_bytes"] == store.object_path(f["sha256"]).stat().st_size > 0
    assert client.get("/v1/adapters/nope@1/files", headers=AUTH).status_code == 404
