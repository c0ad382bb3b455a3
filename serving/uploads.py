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
import zlib
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
    """Extract ``archive`` into ``dest`` after checking every entry; return the adapter folder.

    Whatever goes wrong inside the archive (truncated, corrupt, sizes that lie, two entries
    with one name) is an :class:`InvalidAdapter` (HTTP 400), never an unexpected error.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, max_bytes)
        else:
            _extract_tar(archive, dest, max_bytes)
    except InvalidAdapter:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
            NotImplementedError) as exc:
        raise InvalidAdapter(f"the archive cannot be extracted: {type(exc).__name__}: {exc}") from None
    if (dest / "adapter_config.json").is_file():
        return dest
    children = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "adapter_config.json").is_file():
        return children[0]
    raise InvalidAdapter("the archive has no adapter_config.json at its root or in a single top-level folder")


def _copy_limited(src, target: Path, total: int, max_bytes: int) -> int:
    """Copy ``src`` to a new file ``target``, counting the bytes really written against ``max_bytes``."""
    with open(target, "xb") as out:  # "x": a second entry with the same name is refused, not merged
        while chunk := src.read(1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise InvalidAdapter(f"the archive expands past {max_bytes} bytes; refused")
            out.write(chunk)
    return total


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    # Stream mode ("r|*"): one pass, entries checked and written as they come, decompression stops at
    # the limit (a tar.gz is never inflated whole first).
    try:
        tf = tarfile.open(archive, "r|*")
    except (tarfile.TarError, OSError) as exc:
        raise InvalidAdapter(f"the upload is neither a zip nor a tar archive ({exc})") from None
    total = 0
    with tf:
        for n, m in enumerate(tf, 1):
            if n > MAX_ENTRIES:
                raise InvalidAdapter(f"the archive has more than {MAX_ENTRIES} entries")
            target = dest / _check_name(m.name)
            if m.issym() or m.islnk():
                raise InvalidAdapter(f"archive entry {m.name!r} is a link; refused")
            if not (m.isfile() or m.isdir()):
                raise InvalidAdapter(f"archive entry {m.name!r} is not a regular file or folder; refused")
            if total + m.size > max_bytes:
                raise InvalidAdapter(f"the archive expands past {max_bytes} bytes; refused")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:
                raise InvalidAdapter(f"archive entry {m.name!r} cannot be read")
            total = _copy_limited(src, target, total, max_bytes)


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
        written = 0
        for info in infos:
            target = dest / _check_name(info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:  # headers may under-declare sizes: count what is really written
                written = _copy_limited(src, target, written, max_bytes)
