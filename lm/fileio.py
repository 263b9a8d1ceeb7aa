"""Crash-safe files: atomic replacement, fsync, and an inter-process lock.

Nothing already written is ever lost: a new file is written under a temporary name beside its target, flushed
to disk and renamed over it, so a reader (or a process started after a crash) sees either the old file or the
complete new one, never a truncated mix.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` to disk (before the directory is renamed into place)."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def exclusive_lock(path: str | Path):
    """Hold an exclusive fcntl lock on ``path`` (created if missing; released by the kernel if the process dies).

    Processes preparing the same file take turns: the first one builds it, the others wait, then reuse it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process is preparing the same data)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
