"""Safe extraction of uploaded adapter archives (tar, tar.gz, zip) for POST /adapters.

Every entry is checked before anything is written: absolute paths, ``..``
components, symbolic or hard links and device files are refused, as are
archives that expand past a size limit. The adapter folder is the archive root
or its single top-level folder.
"""
from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from loradex.hub.errors import InvalidAdapter

MAX_ENTRIES = 1000


def _check_name(name: str) -> PurePosixPath:
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InvalidAdapter(f"archive entry {name!r} has an absolute path; refused")
    p = PurePosixPath(name.replace("\\", "/"))
    if ".." in p.parts:
        raise InvalidAdapter(f"archive entry {name!r} contains '..'; refused")
    return p


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Extract ``archive`` into ``dest`` after checking every entry; return the adapter folder."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, max_bytes)
    else:
        try:
            tf = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise InvalidAdapter(f"the upload is neither a zip nor a tar archive ({exc})") from None
        with tf:
            _extract_tar(tf, dest, max_bytes)
    if (dest / "adapter_config.json").is_file():
        return dest
    children = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "adapter_config.json").is_file():
        return children[0]
    raise InvalidAdapter("the archive has no adapter_config.json at its root or in a single top-level folder")


def _extract_tar(tf: tarfile.TarFile, dest: Path, max_bytes: int) -> None:
    members = tf.getmembers()
    if len(members) > MAX_ENTRIES:
        raise InvalidAdapter(f"the archive has {len(members)} entries (at most {MAX_ENTRIES})")
    total = 0
    for m in members:
        _check_name(m.name)
        if m.issym() or m.islnk():
            raise InvalidAdapter(f"archive entry {m.name!r} is a link; refused")
        if not (m.isfile() or m.isdir()):
            raise InvalidAdapter(f"archive entry {m.name!r} is not a regular file or folder; refused")
        total += m.size
        if total > max_bytes:
            raise InvalidAdapter(f"the archive expands past {max_bytes} bytes; refused")
    for m in members:
        target = dest / _check_name(m.name)
        if m.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tf.extractfile(m)
        if src is None:
            raise InvalidAdapter(f"archive entry {m.name!r} cannot be read")
        with src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES:
            raise InvalidAdapter(f"the archive has {len(infos)} entries (at most {MAX_ENTRIES})")
        total = 0
        for info in infos:
            _check_name(info.filename)
            mode = info.external_attr >> 16
            if mode and stat.S_ISLNK(mode):
                raise InvalidAdapter(f"archive entry {info.filename!r} is a link; refused")
            total += info.file_size
            if total > max_bytes:
                raise InvalidAdapter(f"the archive expands past {max_bytes} bytes; refused")
        for info in infos:
            target = dest / _check_name(info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
