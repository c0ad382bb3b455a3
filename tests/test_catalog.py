"""Catalog: migrations, cursors per thread, and the one-writer-per-file rule."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from loradex.hub import migrations
from loradex.hub.catalog import Catalog
from loradex.hub.errors import CatalogLocked
from tests.helpers import run_cli


def test_migrations_are_recorded_and_applied_once(settings):
    with Catalog.open(settings.catalog_path) as cat:
        names = [r["name"] for r in cat.query("SELECT name FROM _migrations ORDER BY name")]
        assert names == [name for name, _ in migrations.MIGRATIONS]
        tables = {r["table_name"] for r in cat.query("SELECT table_name FROM information_schema.tables")}
        assert {"bases", "adapter_versions", "aliases", "training_runs", "eval_runs", "merges", "exports"} <= tables
    with Catalog.open(settings.catalog_path) as cat:  # reopening applies nothing new
        assert migrations.apply(cat.cursor()) == []


def test_new_migration_is_applied_in_order(settings):
    seen = []

    def m_extra(cur):
        seen.append("extra")
        cur.execute("CREATE TABLE extra_t (x INTEGER)")

    with Catalog.open(settings.catalog_path) as cat:
        applied = migrations.apply(cat.cursor(), migrations.MIGRATIONS + [("999_extra", m_extra)])
        assert applied == ["999_extra"] and seen == ["extra"]
        assert migrations.apply(cat.cursor(), migrations.MIGRATIONS + [("999_extra", m_extra)]) == []


def test_cursor_per_thread(catalog):
    catalog.execute("CREATE TABLE t (i INTEGER)")
    errors = []

    def work(i):
        try:
            with catalog.transaction() as cur:
                cur.execute("INSERT INTO t VALUES (?)", [i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert catalog.one("SELECT count(*) AS n FROM t")["n"] == 16


HOLDER = textwrap.dedent(
    """
    import sys, time
    from loradex.hub.catalog import Catalog
    cat = Catalog.open(sys.argv[1], role=sys.argv[2], url="http://127.0.0.1:9999")
    print("ready", flush=True)
    time.sleep(float(sys.argv[3]))
    cat.close()
    """
)


def _hold(path, role, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), role, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_server_held_catalog_fails_fast_with_one_line(settings):
    proc = _hold(settings.catalog_path, "server", 60)
    try:
        t0 = time.monotonic()
        res = run_cli("show", "anything")
        assert time.monotonic() - t0 < 30  # no waiting out the lock timeout
        assert res.returncode == CatalogLocked.exit_code
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "loradex serve" in lines[0] and f"pid {proc.pid}" in lines[0] and "http://127.0.0.1:9999" in lines[0]
        assert "Traceback" not in res.stderr
        # every command goes through the server's API; this holder has none listening, which is said in one line
        res = run_cli("list")
        assert res.returncode == CatalogLocked.exit_code and res.stderr.count("\n") == 1
        assert "http://127.0.0.1:9999, which did not answer" in res.stderr
    finally:
        proc.kill()
        proc.wait()


def test_short_holder_is_waited_for(settings):
    proc = _hold(settings.catalog_path, "cli", 2)
    try:
        res = run_cli("list", "--json")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "[]"
    finally:
        proc.wait()


def test_wait_is_bounded(settings):
    proc = _hold(settings.catalog_path, "cli", 30)
    try:
        with pytest.raises(CatalogLocked, match=f"process {proc.pid}"):
            Catalog.open(settings.catalog_path, wait_s=0.5)
    finally:
        proc.kill()
        proc.wait()
