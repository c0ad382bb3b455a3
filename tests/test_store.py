"""Content-addressed store: idempotent, immutable, verified, crash-tolerant."""
from __future__ import annotations

import os

from loradex.hub.store import Store, file_sha256


def _folder(tmp_path, name, content):
    d = tmp_path / name
    d.mkdir()
    (d / "a.json").write_text(content)
    (d / "b.safetensors").write_bytes(b"\x00" * 100)
    return d


def test_same_bytes_same_snapshot(tmp_path):
    store = Store(tmp_path / "store")
    s1 = store.put_folder(_folder(tmp_path, "x", "{}"))
    s2 = store.put_folder(_folder(tmp_path, "y", "{}"))
    s3 = store.put_folder(_folder(tmp_path, "z", '{"k": 1}'))
    assert s1.digest == s2.digest and s1.relpath == s2.relpath
    assert s3.digest != s1.digest
    # the shared blob is stored once
    assert store.object_path(s1.files["b.safetensors"]) == store.object_path(s3.files["b.safetensors"])
    assert file_sha256(store.resolve(s1.relpath) / "a.json") == s1.files["a.json"]
    assert not list((store.root / "tmp").iterdir())


def test_verify_detects_tampering(tmp_path):
    store = Store(tmp_path / "store")
    snap = store.put_folder(_folder(tmp_path, "x", "{}"))
    assert store.verify(snap.relpath, snap.files) == []
    target = store.resolve(snap.relpath) / "a.json"
    os.chmod(target, 0o644)
    target.write_text('{"evil": true}')
    problems = store.verify(snap.relpath, snap.files)
    assert len(problems) == 1 and problems[0].startswith("a.json: sha256")
    os.remove(store.resolve(snap.relpath) / "b.safetensors")
    assert "b.safetensors: missing" in store.verify(snap.relpath, snap.files)


def test_loads_skip_rehashing_an_unchanged_file_but_catch_a_changed_one(tmp_path, monkeypatch):
    import pytest

    from loradex.hub import store as store_mod
    from loradex.hub.errors import IntegrityError

    store = Store(tmp_path / "store")
    snap = store.put_folder(_folder(tmp_path, "x", "{}"))
    hashed = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: hashed.append(p) or real(p))
    store.verified_path(snap.relpath, snap.files, "snap")
    first = len(hashed)
    store.verified_path(snap.relpath, snap.files, "snap")  # the same files, unchanged: not hashed again
    assert len(hashed) == first
    assert store.verify(snap.relpath, snap.files) == [] and len(hashed) == 2 * first  # `verify` always hashes
    target = store.resolve(snap.relpath) / "a.json"
    st = target.stat()
    os.chmod(target, 0o644)
    target.write_text("[]")  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: ctime still moved
    with pytest.raises(IntegrityError, match="a.json: sha256"):
        store.verified_path(snap.relpath, snap.files, "snap")


def test_cleanup_removes_only_dead_writers_tmp(tmp_path):
    store = Store(tmp_path / "store")
    mine = store.new_tmp()
    dead = store.root / "tmp" / "999999999-deadbeef"
    dead.mkdir(parents=True)
    (dead / "half").write_bytes(b"x")
    assert store.cleanup_tmp() == 1
    assert mine.exists() and not dead.exists()


def test_a_replica_keeps_nothing_from_a_registry_that_sends_wrong_bytes(tmp_path):
    """materialize() checks each fetched file's sha256 before it enters the store: a lying registry leaves no junk."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pytest

    from loradex.hub.errors import IntegrityError
    from loradex.hub.remote import RemoteCatalog, materialize

    good = b"the adapter's real bytes"
    sha = hashlib.sha256(good).hexdigest()
    asked = []

    class Lying(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = b"something else entirely"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Lying)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = Store(tmp_path / "store")
        remote = RemoteCatalog(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(IntegrityError, match="adapter_model.safetensors fetched from .* does not match"):
            materialize(remote, store, "snapshots/none", {"adapter_model.safetensors": sha}, "x@1")
    finally:
        server.shutdown()
    assert asked == [f"/v1/store/objects/{sha}"]
    kept = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert kept == []
