"""The documentation stays a front page plus pages that hold together: README.md is short, every relative link in
README.md and docs/*.md reaches an existing file (and heading), and no machine path or tracker reference appears in
the docs, the code, the tests or the configs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

README_MAX_LINES = 250
DOC_FILES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
SCANNED = ("README.md", "docs", "lm", "tools", "tests", "configs")
TEXT_SUFFIXES = {".md", ".py", ".sh", ".yaml", ".yml", ".json", ".toml", ".txt", ".cfg", ".ini"}

# Built from pieces so that this file does not match its own patterns.
MACHINE_PATHS = ["/" + "work" + "/", "/" + "tmp" + "/" + "pytest", "/" + "home" + "/"]
TRACKER = re.compile(r"(?<![a-z])issues?[\s_#-]*\d+|(?<![a-z])issue" + "'" + r"s\b", re.IGNORECASE)

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (word characters, spaces and hyphens
    kept), spaces to hyphens; link markup keeps its text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeated headings numbered as GitHub does (``x``, ``x-1``, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    """Targets of the Markdown links and images of a file that are not URLs (code blocks and spans skipped)."""
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not SCHEME.match(target):
                targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    return problems


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        root = REPO / name
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files += [p for p in candidates if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def test_readme_is_a_front_page_of_at_most_250_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into a page under docs/")


def test_heading_anchors_follow_github_slugs():
    assert github_slug("Perplexity: `tools/eval_ppl.py`") == "perplexity-toolseval_pplpy"
    assert github_slug("Long context: sequence parallelism") == "long-context-sequence-parallelism"
    assert github_slug("Quality: three attention kinds, three seeds") == "quality-three-attention-kinds-three-seeds"
    assert github_slug("See [the op](docs/op.md) first") == "see-the-op-first"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(doc):
    assert not broken_links(doc), f"{doc.relative_to(REPO)}: broken links:\n" + "\n".join(broken_links(doc))


def test_no_machine_paths_or_tracker_references_in_docs_code_tests_or_configs():
    found = []
    for path in scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            hits = [p for p in MACHINE_PATHS if p in line] + TRACKER.findall(line)
            if hits:
                found.append(f"{path.relative_to(REPO)}:{number}: {', '.join(hits)}: {line.strip()[:120]}")
    assert not found, ("machine paths or tracker references (write for users: no local paths, no issue "
                       "numbers):\n" + "\n".join(found))


def test_no_message_suggests_installing_the_index_project_named_lm():
    """The package index's ``lm`` is an unrelated project: nothing here may tell a user to install it by that name."""
    pattern = re.compile(r"pip install\s+(-U\s+)?lm(?![\w.-])")
    found = [f"{p.relative_to(REPO)}:{n}" for p in scanned_files() + [REPO / "pyproject.toml"]
             for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if pattern.search(line)]
    assert not found, found


def test_what_the_documented_commands_write_into_the_repository_is_ignored_by_git(tmp_path):
    """Run from the repository, the docs' commands write runs/, cache/, hf/ (exports), task folders and reports:
    git ignores them, so a user's `git status` stays clean."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["runs/smoke/config.yaml", "cache/tokens/x", "hf/smoke/model.safetensors", "hf/smoke-bf16/config.json",
               "harness_tasks/sample_rolling.yaml", "tasks/mine_rolling.yaml", "bench_results/train.json",
               "shards/train-00000.jsonl.gz", "sample/wiki.train.tokens", "harness.json", "ppl_128.json",
               ".torch_extensions/x", ".venv/bin/python"]
    done = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *written], capture_output=True,
                          text=True)
    assert sorted(done.stdout.split()) == sorted(written), set(written) - set(done.stdout.split())
