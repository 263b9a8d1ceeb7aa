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
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Optional

log = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(f)`` (given a binary file) so that readers see either the old file or the
    complete new one: a temporary file beside it, flushed to disk, renamed over it. If anything fails (a full
    disk), the temporary file goes and the old file stays as it was; the error is raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _clear_dead_writers(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself to disk (some file systems refuse a directory fsync)
        fsync_dir(path.parent)


def _clear_dead_writers(path: Path) -> None:
    """Remove ``.NAME.tmpPID`` files beside ``path`` left by writers of this host that died mid-write."""
    prefix = f".{path.name}.tmp"
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    except OSError:
        return
    for p in siblings:
        pid = int(p.name[len(prefix):])
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError):
                p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


class _RecordingWriter:
    """A binary file whose first OSError is kept (``error``), for :func:`open_for_writing`."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


@contextlib.contextmanager
def open_for_writing(path: str | Path):
    """``open(path, "wb")`` whose write errors come out as the OSError the OS gave (errno and path), even through a
    writer that reports them as something else (torch.save's zip writer turns a full disk into ``RuntimeError:
    unexpected pos``)."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            recorder = _RecordingWriter(f)
            try:
                yield recorder
            except Exception as e:
                if recorder.error is None or recorder.error is e:
                    raise
                raise recorder.error from None
    except OSError as e:
        if e.filename is None and e.errno is not None:  # the OS's own error: name the file
            e.filename = str(path)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def remove_path(path: str | Path) -> None:
    """Delete ``path`` whatever it is: a symbolic link is unlinked (never what it points to), a directory removed
    with its contents, a file unlinked; nothing there is fine."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def free_bytes(path: str | Path) -> Optional[int]:
    """Bytes an unprivileged process may still write on the file system of ``path`` (its nearest existing
    ancestor); None when it cannot be told."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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

    def acquire(self, before_writing: Optional[Callable[[], None]] = None) -> Optional[dict]:
        """Take the lock without waiting. Returns what a previous holder that died left in the file (None when
        the lock was released cleanly); raises :class:`LockHeld` naming the live holder. ``before_writing`` runs
        once the lock is held and before the holder's name is written into the file (e.g. to clear a crash's
        debris from a full disk first); if it raises, the lock is dropped."""
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
        try:
            previous = _read_holder(f)
            if before_writing is not None:
                before_writing()
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300]}
            f.seek(0)
            f.truncate()
            f.write(json.dumps(me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()  # drops the flock
            raise
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


def lock_holder(path: str | Path) -> Optional[dict]:
    """Who holds the :class:`OwnerLock` file ``path`` now: what the holder wrote about itself (maybe ``{}`` when
    it is just starting), or None when no live process holds it (or there is no such file). Reads only; the
    probe never blocks, and is made only when the file names a holder (a holder writes its name at once), so it
    cannot get in the way of a trainer starting."""
    path = Path(path)
    try:
        f = open(path, "r")
    except OSError:
        return None
    with f:
        holder = _read_holder(f)
        if not holder:
            return None
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder
        except OSError:  # a file system without locks: trust the content, which a clean release empties
            return holder
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


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
