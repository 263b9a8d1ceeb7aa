"""What every command line shares: its parser (help from the module docstring; a checkpoint and config
overrides), which errors are the user's to fix (reported as one ``error: ...`` line and an exit status, never a
traceback), the ``--device`` flag and how it is resolved, loading a checkpoint with its compute settings, where a
checkpoint's reports go and how they are written (whole or not at all), and the list of config keys that
``--help`` prints (read from the config's source, so that ``--help`` answers without importing torch)."""
from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable

from lm.device import resolve_device, set_cpu_threads, set_tf32
from lm.errors import UserError, disk_errors, disk_problem
from lm.fileio import atomic_write_text

__all__ = ["command_parser", "add_checkpoint_arguments", "add_device_argument", "CommandError", "USER_ERRORS",
           "report_error", "resolve_device", "load_checkpoint", "eval_dir", "check_writable", "write_report",
           "reports_disk_errors", "tell_deepspeed_the_accelerator", "config_keys", "format_config_keys", "number_list"]


def command_parser(doc: str, epilog: str = "") -> argparse.ArgumentParser:
    """The parser of a command whose module docstring is ``doc``: ``--help`` shows its first line, the
    arguments, then the rest of the docstring (each once), then ``epilog``."""
    first, _, rest = doc.strip().partition("\n")
    return argparse.ArgumentParser(description=first, epilog="\n\n".join(x for x in (rest.strip(), epilog) if x),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, override_example: str) -> None:
    """The positional arguments of a command over a checkpoint: ``path`` and ``key=value`` config overrides."""
    parser.add_argument("path", help="run directory (its newest checkpoint) or one checkpoints/step_* directory")
    parser.add_argument("overrides", nargs="*", help=f"config overrides key=value, e.g. {override_example}")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (:func:`lm.device.resolve_device` checks it)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


class CommandError(UserError, ValueError):
    """A command-line request that cannot be served; the message says what to change."""


def number_list(text: str, flag: str, kind=float, example: str = "1,2,3") -> list:
    """``"a,b,c"`` given to ``flag`` -> ``[kind(a), kind(b), kind(c)]``; a one-line CommandError when it is empty
    or holds something else (e.g. ``--contexts=512,x``)."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise CommandError(f"{flag}={text!r}: give comma-separated {noun}, e.g. {example}") from None
    if not values:
        raise CommandError(f"{flag} is empty")
    return values


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


def tell_deepspeed_the_accelerator() -> None:
    """Set ``DS_ACCELERATOR=cpu`` on a machine without CUDA, unless the user set it: transformers and lm-eval import
    accelerate, which imports DeepSpeed when it is installed, and DeepSpeed then warns "Setting accelerator to CPU.
    If you have GPU or other accelerator, we were unable to detect it." (launch.sh sets the same for CPU training).
    Called by the commands that load transformers or lm-eval, when they start."""
    import os

    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def load_checkpoint(path: str | Path, overrides, device: str):
    """:func:`lm.inference.loading.load_for_inference`, then the run's compute settings applied as every command
    applies them: ``compute.tf32`` on CUDA, ``compute.cpu_threads`` intra-op threads on the CPU."""
    from lm.inference.loading import load_for_inference  # imports torch: after parsing, for a fast --help

    inference = load_for_inference(path, overrides, device=device)
    set_tf32(inference.cfg.compute.tf32, device)
    set_cpu_threads(inference.cfg.compute.cpu_threads)
    return inference


def eval_dir(checkpoint: Path) -> Path:
    """Where evaluation reports of ``checkpoint`` go: ``RUN_DIR/eval`` for ``RUN_DIR/checkpoints/<name>``, else
    ``<checkpoint>/eval``."""
    root = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    return root / "eval"


def check_writable(path: Path, flag: str) -> None:
    """A CommandError now, before the work, if ``path`` could not be written (creating its folders is allowed)."""
    if path.is_dir():
        raise CommandError(f"{flag}={path} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CommandError(f"{flag}={path} is not writable; give another path")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag}={path} cannot be written ({parent} is not a writable directory); give another "
                           f"path")


def write_report(json_path: Path, report: dict, plot: Callable[[Path], object] | None = None,
                 plot_path: Path | None = None) -> None:
    """An evaluation's report as JSON at ``json_path``, then ``plot(plot_path)`` when given, each whole or not at
    all (:mod:`lm.fileio`; plots through :func:`lm.fileio.atomic_write` as well). A disk that refuses a write
    (full, read-only) is one :class:`lm.errors.DiskError` line, and an earlier report there is left as it was; the
    figures were printed before."""
    def advice(flag: str) -> str:
        return (f"the figures are printed above; free space there (or give {flag} on another disk) and run again (an "
                f"earlier file there is unchanged)")
    with disk_errors(json_path, advice("--json")):
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path}", file=sys.stderr)
    if plot is not None:
        with disk_errors(plot_path, advice("--plot")):
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            plot(plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ config keys for --help
CONFIG_SOURCES = [Path(__file__).resolve().parents[1] / "config" / name for name in ("model.py", "__init__.py")]
CONFIG_ROOT = "TrainConfig"


def _classes() -> dict[str, list[tuple[str, ast.expr | None, str]]]:
    """Dataclass name -> its fields as (name, default expression, docstring) in source order."""
    out = {}
    for path in CONFIG_SOURCES:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            fields, body = [], node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    after = body[i + 1] if i + 1 < len(body) else None
                    doc = (after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                           and isinstance(after.value.value, str) else "")
                    fields.append((stmt.target.id, stmt.value, " ".join(doc.split())))
            if fields:
                out[node.name] = fields
    return out


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, float) and "e" in repr(value) and "." not in repr(value):
        return repr(value).replace("e", ".0e")  # 1.0e-08: YAML reads 1e-08 as a string
    return str(value)


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, help text) of every leaf of the config tree, in source order."""
    classes = _classes()
    out = []

    def walk(name: str, prefix: str) -> None:
        for field, default, doc in classes[name]:
            if isinstance(default, ast.Call) and getattr(default.func, "id", "") == "field":
                factory = next(k.value for k in default.keywords if k.arg == "default_factory")
                if isinstance(factory, ast.Name) and factory.id in classes:
                    walk(factory.id, f"{prefix}{field}.")
                    continue
                default = factory.body if isinstance(factory, ast.Lambda) else factory
            value = ast.literal_eval(default) if default is not None else None
            out.append((f"{prefix}{field}", _yaml(value), doc))

    walk(CONFIG_ROOT, "")
    return out


def format_config_keys(width: int = 100) -> str:
    """The keys as ``--help`` prints them: ``key = default`` and the help text below it."""
    lines = ["config keys (key=value on the command line, or in a YAML file; docs/training.md#configs):"]
    for key, default, doc in config_keys():
        lines.append(f"  {key} = {default}")
        if doc:
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
