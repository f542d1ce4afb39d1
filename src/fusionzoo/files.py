"""Durable files: atomic writes, fsync of folders, sha256 of a file. Standard library only.

The bottom of the package (see docs/design.md, "Layers"): the model layer (``weights``,
``hub``, ``models/convert.py``), ``data`` (download checksums) and ``engine`` (training
checkpoints, resolved configs) all write or check files, and ``data`` may not import the model
layer, so these primitives live below both.

Atomicity: a file is written as a hidden temporary sibling ``.<name>.<random>.tmp`` (same
folder, so ``os.replace`` stays on one file system), fsynced, renamed into place, and the folder
fsynced. Temporaries are created private (``mkstemp`` 0600, ``mkdtemp`` 0700) and given the
process umask's permissions before the rename (:func:`umask_mode`), so files land as 0644 /
folders as 0755 under the common umask 022, as every other tool's files do.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir", "sha256_file", "umask_mode"]


def fsync_dir(path: str | Path) -> None:
    """Make renames inside ``path`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def umask_mode(mode: int) -> int:
    """``mode`` (0o666 for files, 0o777 for folders) less the process umask: what ``open`` /
    ``mkdir`` would have created, for temporaries that ``mkstemp`` / ``mkdtemp`` made private."""
    return mode & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The temporary file lives in the same folder (``os.replace`` is atomic only within one file
    system), is fsynced before the rename, and the folder is fsynced after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX: mkstemp's 0600 -> what open() would have created
            os.fchmod(fd, umask_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks (memory stays bounded for large weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
