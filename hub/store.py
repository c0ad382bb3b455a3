"""Content-addressed, immutable artifact store.

Layout under the store root (``adapters/`` by default)::

    objects/ab/ab12...ef      one immutable blob per distinct file content (sha256)
    snapshots/<digest>/...    a loadable folder; its files are hard links to objects
    tmp/<pid>-<random>/       writes in progress (a crash leaves them here only)

A snapshot's ``digest`` is the sha256 of its manifest (sorted ``file -> sha256``),
so the same bytes always land in the same folder and registering twice is a
no-op. Every write goes to ``tmp/`` on the same filesystem, is fsynced, then
renamed into place: a reader never sees a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from loradex.hub.catalog import pid_alive
from loradex.hub.errors import IntegrityError

CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(files: dict[str, str]) -> str:
    blob = json.dumps(dict(sorted(files.items())), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Snapshot:
    digest: str
    relpath: str               # relative to the store root
    files: dict[str, str]      # relative file -> sha256
    size_bytes: int


_HASHED: dict[tuple, str] = {}
"""(device, inode, size, mtime, ctime) of a file this process hashed -> the sha256 it had (see Store.verify)"""
_HASHED_MAX = 4096


def _remember(key: tuple, sha: str) -> None:
    if len(_HASHED) >= _HASHED_MAX:
        _HASHED.pop(next(iter(_HASHED)))  # the oldest entry
    _HASHED[key] = sha


class Store:
    """The artifact store rooted at ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    # -- paths -----------------------------------------------------------------
    def object_path(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha

    def snapshot_dir(self, digest: str) -> Path:
        return self.root / "snapshots" / digest

    def resolve(self, relpath: str) -> Path:
        return self.root / relpath

    def new_tmp(self) -> Path:
        tmp = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        return tmp

    def owned_tmp(self, path: str | Path, what: str) -> Path:
        """``path`` if it is one of this store's temp dirs (``new_tmp``) or inside one, else InvalidConfig.

        Whatever a caller asks the store to move in or delete afterwards must come from here: a path
        given by a client (an op's argument) must never make the store delete or take other files.
        """
        from loradex.hub.errors import InvalidConfig

        tmp_root = (self.root / "tmp").resolve()
        real = Path(os.path.realpath(Path(path))) if str(path).strip() else None
        if real is None or real == tmp_root or not real.is_relative_to(tmp_root):
            raise InvalidConfig(f"{what} must be a temp folder of the store ({tmp_root}), got {str(path)!r}")
        return real

    # -- writing ---------------------------------------------------------------
    def put_folder(self, src: str | Path, files: list[str] | None = None, *, move: bool = False) -> Snapshot:
        """Store the given files of ``src`` (all regular files if None) as a snapshot.

        With ``move=True`` the source files are moved (they must be on the same
        filesystem, e.g. a folder made by :meth:`new_tmp`).
        """
        src = Path(src)
        if files is None:
            files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        tmp = self.new_tmp()
        try:
            shas: dict[str, str] = {}
            total = 0
            for rel in files:
                shas[rel] = self._put_object(src / rel, tmp, move=move)
                total += self.object_path(shas[rel]).stat().st_size
            digest = manifest_digest(shas)
            final = self.snapshot_dir(digest)
            if final.exists() and self.verify(str(final.relative_to(self.root)), shas):
                # a corrupted snapshot (its files are links to objects, or copies): move it aside and rebuild
                os.rename(final, tmp / "corrupted-snapshot")
            if not final.exists():
                staging = tmp / "snapshot"
                for rel, sha in shas.items():
                    dest = staging / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(self.object_path(sha), dest)
                (staging / ".loradex-manifest.json").write_text(json.dumps(shas, indent=1, sort_keys=True))
                _fsync_dir(staging)
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(staging, final)
                except OSError:
                    if not final.exists():  # lost a race to an identical writer: fine
                        raise
                _fsync_dir(final.parent)
            return Snapshot(digest, str(final.relative_to(self.root)), shas, total)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _put_object(self, path: Path, tmp: Path, *, move: bool) -> str:
        staged = tmp / ("obj-" + uuid.uuid4().hex)
        h = hashlib.sha256()
        if move:
            os.replace(path, staged)
            with open(staged, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        else:
            with open(path, "rb") as fin, open(staged, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
        sha = h.hexdigest()
        dest = self.object_path(sha)
        if dest.is_file() and file_sha256(dest) == sha:  # reuse only what still hashes right
            staged.unlink()
            return sha
        # absent, or a corrupted copy: the intact bytes just hashed replace it (heals the store)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(staged, dest)
        _fsync_dir(dest.parent)
        return sha

    # -- reading and checking ------------------------------------------------------
    def verify(self, relpath: str, files: dict[str, str], *, trust_unchanged: bool = False) -> list[str]:
        """Problems found re-hashing a snapshot (empty list: intact).

        ``trust_unchanged``: a file this process already hashed right, and whose inode, size, mtime and ctime
        are still the same (any write or chmod changes ctime, which no tool can set back), is not hashed
        again. Loads use it (an LRU of adapters reloads the same files over and over); ``loradex verify``
        does not."""
        problems = []
        folder = self.resolve(relpath)
        for rel, sha in sorted(files.items()):
            p = folder / rel
            try:
                st = p.stat()
            except OSError:
                st = None
            if st is None or not p.is_file():
                problems.append(f"{rel}: missing")
                continue
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if trust_unchanged and _HASHED.get(key) == sha:
                continue
            actual = file_sha256(p)
            if actual != sha:
                problems.append(f"{rel}: sha256 {actual[:12]} != recorded {sha[:12]}")
            else:
                _remember(key, sha)
        return problems

    def verified_path(self, relpath: str, files: dict[str, str], what: str) -> Path:
        problems = self.verify(relpath, files, trust_unchanged=True)
        if problems:
            raise IntegrityError(f"{what} failed its sha256 check: " + "; ".join(problems))
        return self.resolve(relpath)

    # -- housekeeping ------------------------------------------------------------
    def cleanup_tmp(self) -> int:
        """Remove temp folders left by processes that died; returns how many."""
        tmp_root = self.root / "tmp"
        if not tmp_root.exists():
            return 0
        removed = 0
        for entry in tmp_root.iterdir():
            pid_s = entry.name.split("-", 1)[0]
            if pid_s.isdigit() and pid_alive(int(pid_s)) and int(pid_s) != 0:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed

    def remove_snapshot(self, relpath: str, still_referenced: set[str]) -> None:
        """Delete a snapshot folder and any of its objects no other snapshot uses."""
        folder = self.resolve(relpath)
        if not folder.exists():
            return
        manifest = folder / ".loradex-manifest.json"
        shas = set(json.loads(manifest.read_text()).values()) if manifest.exists() else set()
        shutil.rmtree(folder)
        for sha in shas - still_referenced:
            p = self.object_path(sha)
            if p.exists():
                os.chmod(p, stat.S_IWUSR | stat.S_IRUSR)
                p.unlink()


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
