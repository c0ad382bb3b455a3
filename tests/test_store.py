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


def test_cleanup_removes_only_dead_writers_tmp(tmp_path):
    store = Store(tmp_path / "store")
    mine = store.new_tmp()
    dead = store.root / "tmp" / "999999999-deadbeef"
    dead.mkdir(parents=True)
    (dead / "half").write_bytes(b"x")
    assert store.cleanup_tmp() == 1
    assert mine.exists() and not dead.exists()
