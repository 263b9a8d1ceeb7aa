"""The README's quickstart, run as written (into a temporary folder), prints the numbers the README and
docs/evaluation.md show: the training lines, the first step's loss, the perplexity table, the greedy sample, and the
perplexities at longer contexts. Only speeds and times may differ."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex

import pytest

from conftest import REPO
from lm.cli.eval_ppl import main as eval_ppl_main
from lm.cli.generate import main as generate_main
from lm.cli.train import main as train_main

README = (REPO / "README.md").read_text(encoding="utf-8")
EVALUATION = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
RUN = "runs/smoke"  # where the README's commands put the smoke run


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a Markdown text, indented ones included, in order."""
    return [(m["lang"], re.sub(rf"(?m)^{m['indent']}", "", m["body"]))
            for m in re.finditer(r"(?ms)^(?P<indent>[ ]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", text)]


def quickstart() -> dict:
    """The README's quickstart: its commands (``{tool: argv}``) and the output blocks after them."""
    section = README[README.index("## Quickstart"):README.index("Next steps:")]
    blocks = code_blocks(section)
    commands = {}
    for line in blocks[0][1].splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["python"]:
            commands[words[1].removeprefix("tools/").removesuffix(".py")] = words[2:]
    outputs = [body for lang, body in blocks if not lang]
    return {"commands": commands, "train": outputs[0], "eval": outputs[1], "generate": outputs[2]}


def fields(line: str) -> dict[str, str]:
    """``step 20/300 | loss 5.1183 | lr ... | 33,675 tok/s | ETA ...`` -> {"step": "20/300", "loss": "5.1183", ...}."""
    out = {}
    for part in line.split(" | "):
        name, _, value = part.strip().rpartition(" ")
        out[name or value] = value
    return out


def table_row(text: str, context: int) -> list[str]:
    """The cells of the ``test`` row at ``context`` of an eval_ppl table, tok/s left out."""
    for line in text.splitlines():
        cells = line.split()
        if cells[:2] == ["test", str(context)]:
            return cells[:-1]
    raise AssertionError(f"no test row at context {context} in:\n{text}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The quickstart's commands, run in process with runs/ and cache/ in a temporary folder: their outputs."""
    root = tmp_path_factory.mktemp("quickstart")
    qs = quickstart()
    where = lambda argv: [a.replace(RUN, str(root / RUN)) for a in argv]  # noqa: E731
    def run(main, argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(argv) == 0, err.getvalue()[-2000:]
        return out.getvalue(), err.getvalue()

    train_argv = qs["commands"]["train"]
    assert train_argv[0] == "configs/smoke.yaml"
    trained, _ = run(train_main, [str(REPO / train_argv[0]), *where(train_argv[1:]), f"run_dir={root / RUN}",
                                  f"data.cache_dir={root / 'cache'}", "data.progress=false"])
    scored, _ = run(eval_ppl_main, where(qs["commands"]["eval_ppl"]))
    sampled, stats = run(generate_main, where(qs["commands"]["generate"]))
    longer, _ = run(eval_ppl_main, [str(root / RUN), "--split", "test", "--contexts", "512,1024,2048"])
    return {"train": trained, "eval": scored, "generate": sampled + stats, "longer": longer, "run": root / RUN}


@pytest.mark.slow
def test_training_prints_the_readmes_numbers(smoke):
    qs = quickstart()
    printed = {fields(line)["step"]: fields(line) for line in smoke["train"].splitlines() if "/300 |" in line}
    shown = [fields(line) for line in qs["train"].splitlines() if "/300 |" in line]
    assert len(shown) >= 2
    for want in shown:
        got = printed[want["step"]]
        keys = ("loss", "lr", "grad norm")
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, want
    valid = [line for line in qs["train"].splitlines() if "valid loss" in line]
    assert valid and all(line in smoke["train"].splitlines() for line in valid)
    first = json.loads((smoke["run"] / "steps.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    assert f"{first['loss']:.2f}" == re.search(r"step 1 alone: ([\d.]+) nats", README)[1]


@pytest.mark.slow
def test_evaluation_and_sampling_print_the_readmes_and_the_evaluation_pages_numbers(smoke):
    qs = quickstart()
    (evaluation_page,) = [body for _, body in code_blocks(EVALUATION) if "token ppl" in body and " 128 " in body]
    for shown in (qs["eval"], evaluation_page):
        assert table_row(smoke["eval"], 128) == table_row(shown, 128)
        note = shown.strip().splitlines()[-1]
        assert note.startswith("word ppl =") and note in smoke["eval"].splitlines()
    (sample_page,) = [body for _, body in code_blocks(EVALUATION) if "[sample 1:" in body]
    for shown in (qs["generate"], sample_page):
        text, stats = shown.strip().splitlines()
        assert text in smoke["generate"].splitlines()
        assert stats.split(" in ")[0] in smoke["generate"]  # "[sample 1: 60 new tokens (token budget); prefill 8 tokens"


@pytest.mark.slow
def test_longer_contexts_print_the_readmes_numbers(smoke):
    said = re.search(r"gives token ppl ([\d.]+), ([\d.]+) and ([\d.]+) \(([\d.]+) at 128\)", README)
    assert said, "README's sentence on perplexity at longer contexts changed: update this test"
    got = [table_row(smoke["longer"], c)[5] for c in (512, 1024, 2048)] + [table_row(smoke["eval"], 128)[5]]
    assert got == list(said.groups())
