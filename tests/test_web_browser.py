"""The web page in a real browser: headless Chromium (Debian's package) driven by Playwright.

A real `loradex serve` (tiny random base, loopback, with an API key) over a workspace with
3 adapters (4 versions, lora_B scaled 0.2 so their outputs differ), eval runs, a training
run, a merge and export row and a rated review. Every page must load with no console errors
and no request leaving loopback; the promote button refuses a failing version and accepts
a passing one; the playground streams answers for 3 adapters; compare highlights a known
difference; a review round is done in the browser. Screenshots of every page go to
$LORADEX_ARTIFACTS/web-screenshots (else a tmp folder); the path is printed.

Run: `make test-browser` (installs chromium via .ci/setup_browser.sh), or
`pytest -m browser tests/test_web_browser.py`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from loradex.evals.review import create_review, record_ratings
from loradex.evals.config import SERVE_ENGINE, serving_config
from loradex.hub.bases import add_base, get_base
from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.registry import register_adapter
from loradex.hub.settings import Settings
from loradex.hub.store import Store
from tests.catalog_rows import DATA_A, DATA_B, add_run
from tests.helpers import make_adapter, start_server, stop_server

pytestmark = pytest.mark.browser

KEY = "web-test-key"
CHROMIUM = os.environ.get("LORADEX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
N = 8
# alpha@1 beats the base clearly, most of all on item 0 (the known difference compare must show first);
# alpha@2 is no better than the base (the gate refuses it); beta@1 is good on the same data as alpha.
ALPHA1 = ([0.95] + [0.8] * (N - 1), [0.05] + [0.4] * (N - 1))
ALPHA2 = ([0.5, 0.4] * (N // 2), [0.45, 0.45] * (N // 2))
BETA1 = ([0.7] * N, [0.4] * N)
GAMMA1 = ([0.6, 0.7, 0.65, 0.6], [0.5, 0.5, 0.55, 0.5])


def _build(root: Path, base_dir: Path) -> None:
    settings = Settings(home=root / "home", store=root / "store")
    store = Store(settings.store)
    with Catalog.open(settings.catalog_path) as cat:
        add_base(cat, store, "tiny", str(base_dir))
        vs = {}
        for i, ref in enumerate(["alpha@1", "alpha@2", "beta@1", "gamma@1"]):
            folder = make_adapter(base_dir, root / "src" / ref.replace("@", "-"), seed=i + 1, scale=0.2)
            (folder / "README.md").write_text(f"# {ref}\n\nA **test** adapter.\n\n- rank 8\n- <script>alert(1)</script>\n")
            vs[ref] = register_adapter(cat, store, folder, ref.split("@")[0], base="tiny")
        # the configurations the server below runs (none/fp32 on this CPU) and the default one, for the real base row
        base_row = get_base(cat, "tiny")
        fp32 = serving_config(base_row, "none", "fp32", "cpu", SERVE_ENGINE)
        nf4 = serving_config(base_row, "nf4", "fp32", "cpu", SERVE_ENGINE)
        add_run(cat, vs["alpha@1"], *ALPHA1, outputs=["arr, the capital be Brasilia"] + [f"alpha answer {i}" for i in range(1, N)],
                serving_config=fp32)
        add_run(cat, vs["alpha@2"], *ALPHA2, serving_config=fp32)
        add_run(cat, vs["beta@1"], *BETA1, outputs=[f"beta answer {i}" for i in range(N)], serving_config=fp32)
        add_run(cat, vs["gamma@1"], *GAMMA1, data_sha=DATA_B, serving_config=nf4)
        with cat.transaction() as cur:
            rid = cur.execute(
                "INSERT INTO training_runs (adapter, base, config, data_path, data_sha256, device, precision, status, "
                "started_at, ended_at, duration_s, steps, loss_curve, final_loss, eval_loss, eval_loss_before, cost_usd, "
                "cost_basis) VALUES ('alpha', 'tiny', ?, '/data/pirate.jsonl', ?, 'cpu', 'fp32', 'completed', ?, ?, 61.5, 20, "
                "?, 1.2, 1.4, 2.9, 0.0012, ?) RETURNING id",
                [to_json({"r": 8, "alpha": 16, "learning_rate": 2e-4, "max_steps": 20}), "c" * 64, utcnow(), utcnow(),
                 to_json([[s, 3.0 - s * 0.09] for s in range(1, 21)]), to_json({"device_type": "cpu", "usd_per_hour": 0.07})],
            ).fetchone()[0]
            cur.execute("UPDATE adapter_versions SET training_run_id = ? WHERE id = ?", [rid, vs["alpha@1"]["id"]])
            mid = cur.execute(
                "INSERT INTO merges (adapter_version_id, base, merged_into, dtype, path, files, size_bytes, base_name, created_at) "
                "VALUES (?, 'tiny', 'full-precision', 'float32', '/m', '{}', 1000, 'alpha-merged', ?) RETURNING id",
                [vs["alpha@1"]["id"], utcnow()]).fetchone()[0]
            cur.execute("INSERT INTO exports (adapter_version_id, merge_id, format, path, files, size_bytes, created_at) "
                        "VALUES (?, ?, 'gguf', '/x', '{}', 900, ?)", [vs["alpha@1"]["id"], mid, utcnow()])
        review = create_review(cat, "alpha@1", n=6, seed=1)
        key = {r["row_id"]: r["adapter_is_a"] for r in cat.query("SELECT row_id, adapter_is_a FROM review_items")}
        record_ratings(cat, review["review_id"], [{"row_id": r["row_id"], "rating": 1 if key[r["row_id"]] else 5}
                                                   for r in review["rows"]])


@contextlib.contextmanager
def serve(root: Path, key: str | None):
    """`loradex serve` on loopback over the workspace at ``root``; yields its URL, stops it after."""
    proc, url = start_server("--base", "tiny", "--quantize", "none", "--host", "127.0.0.1", key=key, cwd=root,
                             env={"LORADEX_HOME": str(root / "home"), "LORADEX_STORE": str(root / "store"),
                                  "LORADEX_API_KEY": None})
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_base_dir) -> Path:
    root = tmp_path_factory.mktemp("web")
    _build(root, tiny_base_dir)
    return root


@pytest.fixture(scope="module")
def server(workspace):
    with serve(workspace, KEY) as url:
        yield url


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    base = os.environ.get("LORADEX_ARTIFACTS")
    out = Path(base) / "web-screenshots" if base else tmp_path_factory.mktemp("web-screenshots")
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {out}")
    return out


class Watch:
    """Console errors, page errors and every request URL of one browser page."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: self.urls.append(r.url))

    def take_errors(self, allowed_status: tuple[int, ...] = ()) -> list[str]:
        """Errors since the last call, less the browser's own line for an HTTP status the step expects."""
        allowed = tuple(f"status of {s} " for s in allowed_status)
        out = [e for e in self.errors if not (e.startswith("Failed to load resource") and any(a in e for a in allowed))]
        self.errors.clear()
        return out


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.fail("no chromium binary: run .ci/setup_browser.sh (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, server):
    context = browser.new_context(viewport={"width": 1366, "height": 900})  # a laptop
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.watch = Watch(pg)
    # the first visit asks for the key; it is kept in the tab's sessionStorage for the rest
    pg.goto(server + "/#/adapters")
    pg.wait_for_selector("#key-dialog[open]")
    pg.fill("#key-input", KEY)
    pg.click("#key-save")
    pg.wait_for_selector("#adapters-table tbody tr")
    assert pg.watch.take_errors(allowed_status=(401,)) == []
    yield pg
    urls = pg.watch.urls
    outside = sorted({u for u in urls if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"})
    assert urls and not outside, f"requests left loopback: {outside}"
    context.close()


def _show(page, server, hash_: str, ready: str):
    """Go to a route and wait until the page has rendered it (not the view that was there before)."""
    page.evaluate("() => { const v = document.getElementById('view'); if (v) v.dataset.shown = 'stale'; }")
    target = f"{server}/{hash_}"
    if page.url == target:
        page.reload()  # the same hash fires no hashchange
    else:
        page.goto(target)
    page.wait_for_function("(ready) => { const v = document.getElementById('view');"
                           " return v && v.dataset.shown && v.dataset.shown !== 'stale' && v.dataset.ready === ready; }",
                           arg=ready)


def test_adapters_page_search_sort_filter(page, server, shots):
    _show(page, server, "#/adapters", "adapters")
    rows = page.locator("#adapters-table tbody tr")
    assert rows.count() == 3
    assert page.inner_text('#adapters-table tr[data-adapter="alpha"]').count("tiny") == 1
    page.fill("#adapter-search", "gam")
    assert rows.count() == 1 and rows.first.get_attribute("data-adapter") == "gamma"
    page.fill("#adapter-search", "")
    page.click('button[data-sort="score"]')
    page.click('button[data-sort="score"]')  # descending: best latest score first
    assert [rows.nth(i).get_attribute("data-adapter") for i in range(3)][0] == "beta"
    page.select_option("#filter-alias", "-")
    assert rows.count() == 3
    page.screenshot(path=str(shots / "adapters.png"), full_page=True)
    assert page.watch.take_errors() == []


def test_adapter_page_and_promotion_gate(page, server, shots):
    _show(page, server, "#/adapter/alpha?v=2", "adapter")
    text = page.inner_text("#view")
    assert "alpha" in text and "adapter_model.safetensors" in text and "README.md" in text
    assert page.locator(".md script").count() == 0 and "<script>alert(1)</script>" in page.inner_text(".md")
    page.click("#promote-button")
    refusal = page.wait_for_selector("#promote-result .refusal")
    message = refusal.inner_text()
    assert message.startswith("refusing to make alpha@2 production: its lift over base tiny is not positive at 95%")
    assert "HTTP 409, gate_refused" in page.inner_text("#promote-result")
    page.screenshot(path=str(shots / "adapter-refused.png"), full_page=True)
    assert page.watch.take_errors(allowed_status=(409,)) == []

    _show(page, server, "#/adapter/alpha?v=1", "adapter")
    assert "run 1" in page.text_content("svg.lineage") and "gguf export" in page.text_content("svg.lineage")
    assert "held-out (base)" in page.inner_text("#view") and "pirate.jsonl" in page.inner_text("#view")
    assert page.locator("table.reviews tbody tr").count() == 1 and "rated" in page.inner_text("table.reviews")
    page.click("#promote-button")
    page.wait_for_selector("#promote-result .notice.ok")
    assert "production → alpha@1" in page.inner_text("#promote-result")
    assert "passes" in page.inner_text("#promote-result .gate")
    page.wait_for_selector("#alias-events td:text('production')")
    assert "production→1" in page.inner_text("#aliases")
    page.screenshot(path=str(shots / "adapter.png"), full_page=True)
    assert page.watch.take_errors() == []


def test_leaderboard(page, server, shots):
    _show(page, server, "#/leaderboard", "leaderboard")
    boards = page.locator("section.board")
    assert boards.count() == 2  # DATA_A and DATA_B are never mixed
    a = page.locator(f'section.board[data-data="{DATA_A}"]')
    assert a.locator("tbody tr").count() == 3 and a.locator("svg circle.pt-adapter").count() >= 3
    assert "alpha@1" in a.locator("tbody tr").first.inner_text()
    # each section names its serving configuration, and says which one this server (none/fp32) runs
    assert "Served as none/fp32 cpu = what this server runs" in a.inner_text()
    b = page.inner_text(f'section.board[data-data="{DATA_B}"]')
    assert "Served as nf4/fp32 cpu = what loradex serve runs by default" in b and "what this server runs" not in b
    page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
    assert page.watch.take_errors() == []


def test_compare_highlights_the_known_difference(page, server, shots):
    runs = json.loads(urllib.request.urlopen(urllib.request.Request(
        server + "/v1/evals?adapter=alpha@1", headers={"Authorization": f"Bearer {KEY}"})).read())
    run = runs[0]["id"]
    _show(page, server, f"#/compare?a={run}&b=base", "compare")
    first = page.locator("#compare-table tbody tr").first
    assert first.get_attribute("data-idx") == "0" and first.get_attribute("data-verdict") == "win"
    assert "A better" in first.inner_text() and "arr, the capital be Brasilia" in first.inner_text()
    assert "A better on 8" in page.inner_text("#compare-summary")
    page.screenshot(path=str(shots / "compare-base.png"), full_page=True)
    beta = json.loads(urllib.request.urlopen(urllib.request.Request(
        server + "/v1/evals?adapter=beta@1", headers={"Authorization": f"Bearer {KEY}"})).read())[0]["id"]
    _show(page, server, f"#/compare?a={run}&b={beta}", "compare")
    assert "B = beta@1" in page.inner_text("#compare-summary")
    assert page.locator("#compare-table tr.win").count() == N  # 0.95 / 0.8 against beta's 0.7 everywhere
    page.screenshot(path=str(shots / "compare-versions.png"), full_page=True)
    assert page.watch.take_errors() == []


def _get(server: str, path: str) -> bytes:
    req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def _decode_batches(server: str) -> tuple[float, float]:
    """(decode steps, decode steps with one row) from the server's batch_size histogram."""
    text = _get(server, "/metrics").decode()
    count = re.search(r'batch_size_count\{phase="decode"\} (\S+)', text)
    one = re.search(r'batch_size_bucket\{phase="decode",le="1"\} (\S+)', text)
    return (float(count.group(1)) if count else 0.0), (float(one.group(1)) if one else 0.0)


def test_playground_streams_three_adapters(page, server, shots):
    steps0, single0 = _decode_batches(server)
    _show(page, server, "#/playground?models=alpha@1,beta@1,gamma@1", "playground")
    assert page.locator("input[name=model]:checked").count() == 4  # the base and 3 adapters
    page.fill("#max-tokens", "12")
    page.click("#send")
    page.wait_for_selector("#playground-total", timeout=120_000)
    cards = page.locator("#answers .card")
    assert cards.count() == 4
    answers = {}
    for i in range(4):
        card = cards.nth(i)
        assert card.get_attribute("data-state") == "done", card.inner_text()
        answers[card.get_attribute("data-model")] = card.locator(".answer").inner_text()
        assert "tok/s" in card.locator(".stat").inner_text()
    assert all(answers[m].strip() for m in ("alpha@1", "beta@1", "gamma@1")), answers
    assert len(set(answers.values())) > 1, answers  # scaled adapters answer differently
    steps, single = _decode_batches(server)
    assert steps - steps0 > single - single0, "the 4 streams never shared a decode step"  # one mixed batch
    page.screenshot(path=str(shots / "playground.png"), full_page=True)
    assert page.watch.take_errors() == []


def test_review_in_the_browser(page, server, shots):
    _show(page, server, "#/review?ref=beta@1", "review")
    page.fill("#review-n", "4")
    page.fill("#review-seed", "3")
    page.click("#review-start button[type=submit]")
    page.wait_for_selector("#review-rate")
    rows = page.locator("#review-rate article")
    assert rows.count() == 4
    page.click("#review-submit")  # nothing rated: refused, naming the rows
    assert "missing rating" in page.wait_for_selector("#review-rate .notice.error").inner_text()
    for i in range(4):
        rows.nth(i).locator("input[type=radio][value='3']").check()
    page.screenshot(path=str(shots / "review.png"), full_page=True)
    page.click("#review-submit")
    result = page.wait_for_selector("#review-result").inner_text()
    assert "beta@1: adapter preferred 0.500" in result and "ties 4" in result
    assert page.watch.take_errors(allowed_status=(400, 422)) == []
    _show(page, server, "#/adapter/beta", "adapter")
    assert "rated" in page.inner_text("table.reviews")
    page.screenshot(path=str(shots / "review-on-adapter.png"), full_page=True)
    assert page.watch.take_errors() == []


def test_keyboard_reaches_every_control(page, server, shots):
    """Tab alone walks the header, the filters, the sort buttons and the adapter links, in order."""
    _show(page, server, "#/adapters", "adapters")
    page.locator("body").focus()
    seen = []
    for _ in range(40):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("""() => { const e = document.activeElement;
            return e.id || e.dataset.sort || e.dataset.page || e.textContent.trim().slice(0, 20); }"""))
    for want in ("adapters", "leaderboard", "review", "key-button", "adapter-search", "filter-base", "filter-alias",
                 "name", "score", "lift", "alpha", "beta", "gamma"):
        assert want in seen, (want, seen)
    page.focus('button[data-sort="versions"]')
    page.keyboard.press("Enter")
    assert page.get_attribute('th:has(button[data-sort="versions"])', "aria-sort") == "ascending"
    _show(page, server, "#/adapter/gamma", "adapter")
    page.focus("#gate-check")
    page.keyboard.press("Enter")
    assert "passes" in page.wait_for_selector("#promote-result .gate").inner_text()
    page.set_viewport_size({"width": 1024, "height": 768})  # a small laptop: panels stack, nothing is cut off
    page.screenshot(path=str(shots / "adapter-1024.png"), full_page=True)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 1024
    page.set_viewport_size({"width": 1366, "height": 900})
    assert page.watch.take_errors() == []


def test_without_a_key_nothing_is_asked(browser, tmp_path, tiny_base_dir):
    """A server without a key (what `make demo` runs), over its own workspace: the page never asks for one."""
    _build(tmp_path, tiny_base_dir)
    with serve(tmp_path, None) as url:
        context = browser.new_context(viewport={"width": 1366, "height": 900})
        fresh = context.new_page()
        watch = Watch(fresh)
        fresh.goto(url + "/#/adapters")
        fresh.wait_for_selector("#adapters-table tbody tr")
        assert not fresh.is_visible("#key-dialog")
        assert fresh.get_attribute("#server-health", "class") == "badge ok"
        assert fresh.inner_text("#server-base").startswith("base: tiny (none, cpu)")
        assert watch.take_errors() == [] and all(urlparse(u).hostname == "127.0.0.1" for u in watch.urls)
        context.close()
