"""Crash-safe files: atomic replacement, fsync, an inter-process lock, and a lock that says who holds it.

Nothing already written is ever lost: a new file is written under a temporary name beside its target, flushed
to disk and renamed over it, so a reader (or a process started after a crash) sees either the old file or the
complete new one, never a truncated mix.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


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


class LockHeld(RuntimeError):
    """An :class:`OwnerLock` is held by a live process; ``holder`` is what that process wrote about itself."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {describe_holder(holder)}")


def describe_holder(holder: dict) -> str:
    """``pid 123 on host h (started 2026-01-02 10:00:00 +0000: python tools/train.py ...)``, from the lock file."""
    if not holder:
        return "a process that has not written its name yet (it is just starting)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}"
            f"{': ' + holder['command'] if holder.get('command') else ''})")


class OwnerLock:
    """An exclusive lock on ``path`` held until :meth:`release` or the death of the process, whose file names
    the holder.

    The lock is a kernel ``flock`` on the open file, so it cannot outlive its holder: the kernel drops it when
    the process dies, however it dies (on NFS, Linux maps ``flock`` to the server's byte-range locks, which work
    across hosts). The file's content (JSON: pid, host, start time, command) only serves messages: the holder
    writes it after taking the lock and empties it on release, so content found with the lock free was left by
    a holder that died; :meth:`acquire` returns it and takes over. Never delete the file while a holder may run:
    a new file would be a second, independent lock.
    """

    UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = None
        self.enforced = True
        """False when the file system does not support locks (the content is written all the same)."""

    def acquire(self) -> Optional[dict]:
        """Take the lock without waiting. Returns what a previous holder that died left in the file (None when
        the lock was released cleanly); raises :class:`LockHeld` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(f)
            f.close()
            raise LockHeld(self.path, holder) from None
        except OSError as e:
            if e.errno not in self.UNSUPPORTED:
                f.close()
                raise
            self.enforced = False
        previous = _read_holder(f)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300]}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self.file = f
        return previous or None

    def release(self) -> None:
        """Empty the file (a clean release) and drop the lock; a no-op when not held."""
        if self.file is None:
            return
        f, self.file = self.file, None
        try:
            f.seek(0)
            f.truncate()
            f.flush()
        finally:
            f.close()  # closing drops the flock


def _read_holder(f) -> dict:
    f.seek(0)
    text = f.read().strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {"command": text[:200]}
    return holder if isinstance(holder, dict) else {}
