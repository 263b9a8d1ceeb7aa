"""The code an export carries: the modules of this package that the Hugging Face model needs, copied into the
export directory so that ``from_pretrained(DIR, trust_remote_code=True)`` needs only ``torch`` and
``transformers``, wherever ``lm`` is (not) installed and whatever the working directory.

The model is written once, here in ``lm/``; an export holds copies made by :func:`write_remote_code`, never a
second hand-kept version:

- which modules: the import closure of :data:`ENTRY_MODULES`, found by following every ``lm`` import (at any
  depth, lazy ones included) in the source, so a module added to ``lm/ops`` or ``lm/model`` travels as soon as
  the model imports it;
- how: each module becomes one flat file (``lm.ops.fft`` -> ``lm_kernelized_ops_fft.py``; the two entry modules
  take the names transformers expects, ``modeling_lm_kernelized.py`` and ``configuration_lm_kernelized.py``),
  its ``from lm.x import name`` lines rewritten as ``from .lm_kernelized_x import name``: transformers copies
  the relative imports it finds, and the files import nothing named ``lm``, so a user's own ``lm`` (or a folder
  of that name in the working directory) is never picked up;
- the op's ``torch.library`` namespace ``lm`` becomes ``lm_kernelized_<hash of the copied sources>``, so loading
  an export in a process that also imports ``lm`` (or another export of other code) replaces no op of theirs;
- the written files are checked the way transformers checks them: every import it requires (those outside a
  ``try`` block) is ``torch``, ``transformers`` or the standard library. An optional accelerator (Triton) is
  imported inside ``try`` / ``except ImportError`` by the module that uses it.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import re
import sys
from pathlib import Path

from lm.errors import UserError

__all__ = ["MODELING_FILE", "CONFIGURATION_FILE", "ENTRY_MODULES", "MODULE_PREFIX", "REQUIRED_PACKAGES",
           "RemoteCodeError", "closure", "file_name", "lm_imports", "remote_sources", "required_imports",
           "check_required_imports", "write_remote_code", "remote_module"]

MODELING_FILE, CONFIGURATION_FILE = "modeling_lm_kernelized", "configuration_lm_kernelized"
ENTRY_MODULES = {MODELING_FILE: "lm.hf.modeling", CONFIGURATION_FILE: "lm.hf.configuration"}
"""File name (without ``.py``) -> the module it is a copy of: what ``config.json``'s ``auto_map`` names."""
MODULE_PREFIX = "lm_kernelized_"
REQUIRED_PACKAGES = frozenset({"torch", "transformers"})
"""What loading an export may require besides the standard library."""
OP_NAMESPACE = "lm"
"""The ``torch.library`` namespace of the op in ``lm/`` (``lm::kernelized_mix``)."""

_ROOT = Path(__file__).resolve().parents[1]  # the lm package


class RemoteCodeError(UserError, RuntimeError):
    """A module the Hugging Face model needs cannot be carried into an export as it is written (a bug of this
    package, caught by its tests); the message names the file and line and what to write instead."""


def module_file(module: str) -> Path:
    """The source file of the ``lm`` module named ``module`` (``lm.ops`` -> ``lm/ops/__init__.py``)."""
    parts = module.split(".")
    if parts[0] != "lm":
        raise ValueError(f"{module} is not a module of lm")
    base = _ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise RemoteCodeError(f"the module {module} has no source file under {_ROOT}")


def _is_lm(name: str | None) -> bool:
    return name is not None and (name == "lm" or name.startswith("lm."))


def lm_imports(path: Path) -> list[tuple[ast.stmt, str]]:
    """(statement, module) of every import of an ``lm`` module in ``path``, at any depth; a RemoteCodeError for a
    form the copy cannot express (``import lm.x``, a submodule imported by name, a relative import)."""
    where = path.relative_to(_ROOT.parent) if path.is_relative_to(_ROOT.parent) else path
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_lm(alias.name):
                    raise RemoteCodeError(f"{where}:{node.lineno}: `import {alias.name}` cannot be carried into a "
                                          f"Hugging Face export; write `from {alias.name} import NAME`")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise RemoteCodeError(f"{where}:{node.lineno}: a relative import cannot be carried into a Hugging "
                                      f"Face export; write `from lm.PACKAGE.MODULE import NAME`")
            if not _is_lm(node.module):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if _ROOT.joinpath(*sub.split(".")[1:]).with_suffix(".py").is_file() or \
                        (_ROOT.joinpath(*sub.split(".")[1:]) / "__init__.py").is_file():
                    raise RemoteCodeError(f"{where}:{node.lineno}: `from {node.module} import {alias.name}` imports a "
                                          f"module, which cannot be carried into a Hugging Face export; write "
                                          f"`from {sub} import NAME`")
            out.append((node, node.module))
    return out


def closure(entries=tuple(ENTRY_MODULES.values())) -> list[str]:
    """Every ``lm`` module that ``entries`` import, directly or not, ``entries`` included (sorted)."""
    seen, todo = set(), list(entries)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [m for _, m in lm_imports(module_file(module)) if m not in seen]
    return sorted(seen)


def file_name(module: str) -> str:
    """The file (without ``.py``) that holds the copy of ``module`` in an export."""
    for name, entry in ENTRY_MODULES.items():
        if module == entry:
            return name
    return MODULE_PREFIX + "_".join(module.split(".")[1:]) if module != "lm" else MODULE_PREFIX + "package"


_FROM = re.compile(r"from\s+lm(?:\.\w+)*(?=\s+import\b)")


def _rewrite(module: str, source: str, namespace: str) -> str:
    """``source`` of ``module`` with its ``lm`` imports made relative and the op namespace renamed."""
    lines = source.splitlines(keepends=True)
    for node, imported in lm_imports(module_file(module)):
        i, col = node.lineno - 1, node.col_offset
        head, n = _FROM.subn(f"from .{file_name(imported)}", lines[i][col:], count=1)
        if n != 1:
            raise RemoteCodeError(f"{module}:{node.lineno}: cannot rewrite `{lines[i].strip()}` (write `from "
                                  f"{imported} import NAME` on one line)")
        lines[i] = lines[i][:col] + head
    text = "".join(lines)
    text = re.sub(rf"""(["']){OP_NAMESPACE}::""", rf"\g<1>{namespace}::", text)
    text = text.replace(f"torch.ops.{OP_NAMESPACE}.", f"torch.ops.{namespace}.")
    origin = module_file(module).relative_to(_ROOT.parent).as_posix()
    return (f"# Copied from {origin} of the lm package by its Hugging Face export, imports made relative.\n"
            f"# Needs only torch and transformers. Edit the original, not this copy.\n{text}")


def remote_sources() -> dict[str, str]:
    """File name (with ``.py``) -> content of every file of the remote code, checked (see the module docstring)."""
    modules = closure()
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.encode() + b"\0" + module_file(module).read_bytes() + b"\0")
    namespace = f"{OP_NAMESPACE}_kernelized_{digest.hexdigest()[:12]}"
    names = [file_name(m) for m in modules]
    if len(set(names)) != len(names):
        raise RemoteCodeError(f"two modules of the export would share a file name: {sorted(names)}")
    out = {f"{file_name(m)}.py": _rewrite(m, module_file(m).read_text(encoding="utf-8"), namespace)
           for m in modules}
    for name, text in out.items():
        check_required_imports(name, text)
    return out


def required_imports(text: str) -> set[str]:
    """The top-level packages transformers requires to be installed before it loads a file of this content: every
    absolute import outside a ``try`` block (as ``transformers.dynamic_module_utils.get_imports`` reads them)."""
    found = set()

    def visit(node) -> None:
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(text))
    return found


def check_required_imports(name: str, text: str) -> None:
    extra = sorted(required_imports(text) - REQUIRED_PACKAGES - set(sys.stdlib_module_names))
    if extra:
        raise RemoteCodeError(f"{name} of the Hugging Face export would require {', '.join(extra)} where the model "
                              f"is loaded: import optional packages inside try / except ImportError, and keep "
                              f"training-only code out of the modules the model imports")


def write_remote_code(directory: str | Path) -> list[str]:
    """Write the remote code into ``directory``; returns the file names written."""
    directory = Path(directory)
    sources = remote_sources()
    for name, text in sources.items():
        (directory / name).write_text(text, encoding="utf-8")
    return sorted(sources)


@contextlib.contextmanager
def remote_module(directory: str | Path, file: str):
    """The remote-code module ``file`` (without ``.py``) of ``directory``, imported as transformers imports it (in
    a package of its own, so its relative imports resolve) but without writing to transformers' module cache: to
    check an export with the code it carries. Its modules leave ``sys.modules`` on exit."""
    directory = Path(directory)
    package = f"_lm_export_check_{hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]}"
    parent = importlib.util.module_from_spec(importlib.util.spec_from_loader(package, loader=None, is_package=True))
    parent.__path__ = [str(directory)]
    sys.modules[package] = parent
    try:
        yield importlib.import_module(f"{package}.{file}")
    finally:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
