"""The one base class of the errors a user can fix: a bad config, data, path, device or command-line request.

Every such error says what to change in one line; the command lines print it as ``error: ...`` and exit with a
status instead of a traceback (:func:`lm.cli.common.report_error`). Anything that is not a :class:`UserError`
is a bug and shows its traceback.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Base of ``ConfigError``, ``DataError``, ``TokenizerError``, ``CheckpointError``, ``DeviceError``,
    ``CommandError`` and ``HarnessError``; each also derives from the built-in error it used to be (ValueError,
    FileNotFoundError), so existing ``except`` clauses keep working."""
