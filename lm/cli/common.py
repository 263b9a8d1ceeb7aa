"""What every command line shares: its parser (help from the module docstring; a checkpoint and config
overrides), which errors are the user's to fix (reported as one ``error: ...`` line and an exit status, never a
traceback), how ``--device`` is resolved, and where a checkpoint's reports go."""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from lm.device import resolve_device
from lm.errors import UserError, disk_problem

__all__ = ["command_parser", "add_checkpoint_arguments", "CommandError", "USER_ERRORS", "report_error",
           "resolve_device", "eval_dir", "reports_disk_errors"]


def command_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a command whose module docstring is ``doc``: ``--help`` shows its first line, the
    arguments, then the whole docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, override_example: str) -> None:
    """The positional arguments of a command over a checkpoint: ``path`` and ``key=value`` config overrides."""
    parser.add_argument("path", help="run directory (its newest checkpoint) or one checkpoints/step_* directory")
    parser.add_argument("overrides", nargs="*", help=f"config overrides key=value, e.g. {override_example}")


class CommandError(UserError, ValueError):
    """A command-line request that cannot be served; the message says what to change."""


USER_ERRORS = UserError
"""Errors caused by what the user gave (flags, config, data, paths, device): every :class:`lm.errors.UserError`.
Anything else is a bug: a traceback."""


def report_error(error: BaseException, status: int) -> int:
    """Print ``error: <message>`` to stderr; return ``status`` (the process exit status)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return status


def reports_disk_errors(status: int):
    """Decorator of a command's ``main``: a disk that refuses a write the command makes (full, read-only, ...) is
    one ``error: <problem>: <path>; ...`` line and ``status``, not a traceback. (Files are written atomically,
    :mod:`lm.fileio`: what was there before is unchanged.)"""
    def decorate(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except OSError as e:
                problem = disk_problem(e)
                if problem is None or isinstance(e, UserError):
                    raise
                return report_error(f"{problem}: {e.filename or 'a file this command writes'}; free space there (or "
                                    f"make it writable) and run again (what was there before is unchanged)", status)
        return run
    return decorate


def eval_dir(checkpoint: Path) -> Path:
    """Where evaluation reports of ``checkpoint`` go: ``RUN_DIR/eval`` for ``RUN_DIR/checkpoints/<name>``, else
    ``<checkpoint>/eval``."""
    root = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    return root / "eval"
