"""The layering of docs/ARCHITECTURE.md holds: no import in lm/ runs upward, and the command-line tools are thin."""
import ast
import re

import pytest

from conftest import REPO

LM = REPO / "lm"


def layer_table() -> dict[str, int]:
    """Module prefix -> layer, from the table in docs/ARCHITECTURE.md (lines ``<layer>  lm.a  lm.b  <text>``)."""
    layers = {}
    for line in (REPO / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"\s*(\d+)\s+((?:lm\.[\w.]+\s*)+)", line)
        if m:
            for name in m.group(2).split():
                layers[name] = int(m.group(1))
    return layers


def module_name(path, root=REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str, layers: dict[str, int]) -> tuple[str, int] | None:
    """(the table entry, its layer) of ``module``: the longest entry that is the module or a package of it."""
    for prefix in sorted(layers, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, layers[prefix]
    return None


def lm_imports(path) -> list[tuple[int, str]]:
    """(line, module) of every import of an lm module in ``path``, at any depth (lazy imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lm":
            if node.module == "lm":  # from lm import checkpoint
                out += [(node.lineno, f"lm.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def layering_violations(root, layers: dict[str, int]) -> list[str]:
    """Imports under ``root/lm`` of a module not below the importer (other than within its own package), and
    modules missing from the table."""
    found = []
    for path in sorted((root / "lm").rglob("*.py")):
        if module_name(path, root) == "lm":  # the empty top-level package
            continue
        mine = layer_of(module_name(path, root), layers)
        if mine is None:
            found.append(f"{module_name(path, root)} is not in the layer table")
            continue
        for line, target in lm_imports(path):
            theirs = layer_of(target, layers)
            if theirs is None:
                found.append(f"{module_name(path, root)}:{line} imports {target}, which is not in the layer table")
            elif theirs[0] != mine[0] and theirs[1] >= mine[1]:
                found.append(f"{module_name(path, root)} (layer {mine[1]}) imports {target} (layer {theirs[1]}) "
                             f"at line {line}")
    return found


def test_the_layer_table_is_read():
    layers = layer_table()
    assert layers["lm.config"] == 1 and layers["lm.data"] == layers["lm.model"] == 4
    assert layers["lm.cli"] == max(layers.values())


def test_no_import_runs_upward():
    problems = layering_violations(REPO, layer_table())
    assert not problems, "fix these imports, or the table in docs/ARCHITECTURE.md:\n" + "\n".join(problems)


def test_the_check_reports_upward_sideways_and_unknown_imports(tmp_path):
    (tmp_path / "lm" / "data").mkdir(parents=True)
    (tmp_path / "lm" / "config.py").write_text("def f():\n    from lm.train import train\n")  # lazy, still upward
    (tmp_path / "lm" / "model.py").write_text("from lm import data\n")  # sideways: the same layer
    (tmp_path / "lm" / "data" / "batches.py").write_text("import lm.data.source\nimport lm.config\n")  # fine
    (tmp_path / "lm" / "newthing.py").write_text("")
    problems = layering_violations(tmp_path, layer_table())
    assert len(problems) == 3, problems
    assert "lm.config (layer 1) imports lm.train" in problems[0] and "lm.model (layer 4) imports lm.data" in problems[1]
    assert "lm.newthing is not in the layer table" in problems[2]


COMMANDS = sorted(p.stem for p in (LM / "cli").glob("*.py") if p.stem not in ("__init__", "common"))
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py") if not p.stem.startswith("bench_"))


def test_every_command_has_a_tool_and_every_tool_a_command():
    assert "harness" in COMMANDS and "train" in COMMANDS
    assert TOOLS == COMMANDS, "tools/<name>.py (other than the bench_*.py scripts) and lm/cli/<name>.py go in pairs"


@pytest.mark.parametrize("tool", TOOLS)
def test_command_line_tools_are_thin_entry_points(tool):
    tree = ast.parse((REPO / "tools" / f"{tool}.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], \
        f"tools/{tool}.py defines functions: command-line logic belongs in lm/cli/{tool}.py"
    assert any(isinstance(n, ast.ImportFrom) and n.module == f"lm.cli.{tool}" for n in ast.walk(tree))
