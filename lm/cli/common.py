"""What every command line shares: which errors are the user's to fix (reported as one ``error: ...`` line and
an exit status, never a traceback) and how ``--device`` is resolved."""
from __future__ import annotations

import sys

import torch

from lm.checkpoint import CheckpointError
from lm.config import ConfigError
from lm.data import DataError
from lm.tokenizer import TokenizerError


class CommandError(ValueError):
    """A command-line request that cannot be served; the message says what to change."""


USER_ERRORS = (CommandError, ConfigError, DataError, TokenizerError, CheckpointError)
"""Errors caused by what the user gave (flags, config, data, paths). Anything else is a bug: a traceback."""


def report_error(error: BaseException, status: int) -> int:
    """Print ``error: <message>`` to stderr; return ``status`` (the process exit status)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return status


def resolve_device(name: str) -> str:
    """``--device`` value -> device name: ``auto`` is ``cuda`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device=cuda but CUDA is not available; use --device=cpu")
    return name
