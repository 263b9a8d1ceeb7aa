"""The one base class of the errors a user can fix: a bad config, data, path, device or command-line request, or a
disk that refuses a write.

Every such error says what to change in one line; the command lines print it as ``error: ...`` and exit with a
status instead of a traceback (:func:`lm.cli.common.report_error`). Anything that is not a :class:`UserError`
is a bug and shows its traceback.
"""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["UserError", "DiskError", "disk_problem", "disk_errors"]


class UserError(Exception):
    """Base of ``ConfigError``, ``DataError``, ``TokenizerError``, ``CheckpointError``, ``DeviceError``,
    ``CommandError``, ``HarnessError`` and ``DiskError``; each also derives from the built-in error it used to be
    (ValueError, FileNotFoundError, OSError), so existing ``except`` clauses keep working."""


DISK_PROBLEMS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}
"""errno -> what the user is told: the refusals of a file system that the user, not the program, must fix."""


class DiskError(UserError, OSError):
    """A write the file system refused (full, over quota, read-only, not permitted); the message names the problem
    and the path, and says what was kept."""


def disk_problem(error: BaseException) -> Optional[str]:
    """What :data:`DISK_PROBLEMS` says of ``error`` (an OSError with one of those errno values), else None."""
    return DISK_PROBLEMS.get(getattr(error, "errno", None)) if isinstance(error, OSError) else None


@contextlib.contextmanager
def disk_errors(path: str | Path, advice: str) -> Iterator[None]:
    """Turn an OSError of :data:`DISK_PROBLEMS` raised inside the block into a one-line :class:`DiskError`:
    ``<problem>: <the path the OS named, else path>; <advice>``. Other errors pass unchanged."""
    try:
        yield
    except DiskError:
        raise
    except OSError as e:
        problem = disk_problem(e)
        if problem is None:
            raise
        raise DiskError(f"{problem}: {e.filename or path}; {advice}") from None
