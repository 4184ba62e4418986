"""Durable file replacement: write a temporary file, fsync it, rename it over the target (atomic
on POSIX, rename(2)), then fsync the folder so the rename itself survives a crash. Used by the
spool (never half a message) and the directory sync (never half a snapshot)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # a half-written file would hold the space a full disk needs back
        raise
    os.close(fd)
    os.replace(tmp, path)


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
