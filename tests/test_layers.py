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
    assert layers["lm.ops"] == 0 and layers["lm.config"] == 1 and layers["lm.data"] == layers["lm.inference"] == 4
    assert layers["lm.training"] > layers["lm.eval"] > layers["lm.inference"] > layers["lm.model"]
    assert layers["lm.cli"] == max(layers.values())


def test_at_most_six_modules_stay_at_the_top_level():
    top = sorted(p.stem for p in LM.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 6, f"lm/ holds {top}: group modules by concern into a package"


def test_no_import_runs_upward():
    problems = layering_violations(REPO, layer_table())
    assert not problems, "fix these imports, or the table in docs/ARCHITECTURE.md:\n" + "\n".join(problems)


def test_the_check_reports_upward_sideways_and_unknown_imports(tmp_path):
    (tmp_path / "lm" / "data").mkdir(parents=True)
    (tmp_path / "lm" / "config.py").write_text("def f():\n    from lm.training.loop import train\n")  # lazy, upward
    (tmp_path / "lm" / "inference.py").write_text("from lm import data\n")  # sideways: the same layer
    (tmp_path / "lm" / "data" / "batches.py").write_text("import lm.data.source\nimport lm.config\n")  # fine
    (tmp_path / "lm" / "newthing.py").write_text("")
    problems = layering_violations(tmp_path, layer_table())
    assert len(problems) == 3, problems
    assert "lm.config (layer 1) imports lm.training.loop" in problems[0]
    assert "lm.inference (layer 4) imports lm.data" in problems[1]
    assert "lm.newthing is not in the layer table" in problems[2]


COMMANDS = sorted(p.stem for p in (LM / "cli").glob("*.py") if p.stem not in ("__init__", "common"))
DEV_SCRIPTS = ("mutants",)
"""Scripts of the project's own development (docs/testing.md), not commands of the library."""
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py")
               if not p.stem.startswith("bench_") and p.stem not in DEV_SCRIPTS)


def test_every_command_has_a_tool_and_every_tool_a_command():
    assert "harness" in COMMANDS and "train" in COMMANDS
    assert TOOLS == COMMANDS, ("tools/<name>.py (other than the bench_*.py scripts and tools/mutants.py) and "
                               "lm/cli/<name>.py go in pairs")


@pytest.mark.parametrize("tool", TOOLS)
def test_command_line_tools_are_thin_entry_points(tool):
    tree = ast.parse((REPO / "tools" / f"{tool}.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))], \
        f"tools/{tool}.py defines functions: command-line logic belongs in lm/cli/{tool}.py"
    assert any(isinstance(n, ast.ImportFrom) and n.module == f"lm.cli.{tool}" for n in ast.walk(tree))


# ------------------------------------------------------------------ inference never loads training
MODULES_AFTER = """
import json, runpy, sys
code, sys.argv = 0, sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else exec(sys.argv[0])
except SystemExit as e:
    code = e.code
import torch.distributed as dist
print("MODULES " + json.dumps({"status": code, "process_group": dist.is_initialized(),
                               "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed"
                                                or m.startswith("lm.training"))}))
"""


def modules_after(*argv: str) -> dict:
    """Run ``argv`` (a tool and its arguments, or a Python statement) in a fresh interpreter; what it left loaded."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MODULES_AFTER, *argv], capture_output=True, text=True, cwd=REPO)
    line = [x for x in done.stdout.splitlines() if x.startswith("MODULES ")]
    assert line, done.stderr[-3000:]
    return json.loads(line[-1][len("MODULES "):])


@pytest.mark.parametrize("tool, extra", [("eval_ppl", ["--no-progress", "--context", "32"]),
                                         ("generate", ["--max-new-tokens", "5", "--prompt", "the"])])
def test_evaluating_and_generating_import_no_training(trained_run, tool, extra, tmp_path):
    if tool == "eval_ppl":
        extra = [*extra, "--json", str(tmp_path / "out.json")]
    seen = modules_after(str(REPO / "tools" / f"{tool}.py"), str(trained_run), *extra)
    assert seen["status"] == 0
    assert seen["loaded"] == [] and not seen["process_group"], f"tools/{tool}.py loaded {seen['loaded']}"


def test_the_harness_model_imports_no_training(trained_run):
    pytest.importorskip("lm_eval")
    seen = modules_after(f"from lm.eval.harness import HarnessLM; HarnessLM({str(trained_run)!r}).loglikelihood([])")
    assert seen["status"] == 0 and seen["loaded"] == [] and not seen["process_group"], seen


def test_every_command_is_a_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {target: name for name, target in scripts.items()} == {
        f"lm.cli.{command}:main": "lm-" + command.replace("_", "-") for command in COMMANDS}
