"""tools/eval_ppl.py and tools/generate.py end to end on a tiny checkpoint trained here, and their errors."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO as ROOT
from conftest import train_run
from lm.inference.loading import load_for_inference
from lm.data import prepare_corpus
from lm.data.synthetic import split_text



def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_ppl, generate = load_tool("eval_ppl"), load_tool("generate")


@pytest.fixture
def run_dir(trained_run) -> Path:
    return trained_run


def logged_valid(run: Path, tag: str = "valid/ppl") -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events.Scalars(tag)[-1].value


# ----------------------------------------------------------------------------------------------- eval_ppl
def test_eval_ppl_matches_training_validation_and_counts_the_split(run_dir, tmp_path, capsys):
    out = tmp_path / "valid.json"
    assert eval_ppl.main([str(run_dir), "--json", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert report["step"] == 6 and row["context"] == row["stride"] == 128  # the training context by default
    # the same weights and windows as training's full validation: the same perplexity
    assert row["token_perplexity"] == pytest.approx(logged_valid(run_dir), rel=1e-5)
    assert row["word_perplexity"] == pytest.approx(logged_valid(run_dir, "valid/word_ppl"), rel=1e-5)
    cfg = load_for_inference(run_dir).cfg
    split = prepare_corpus(cfg.data, splits=("valid",)).split("valid")
    text = split_text(cfg.data.synthetic, "valid")
    assert row["num_tokens"] == split.num_tokens and row["num_words"] == split.num_words == len(text.split())
    assert row["num_line_ends"] == text.count("\n") > 0 and text.endswith("\n")
    words_and_lines = len(text.split()) + text.count("\n")
    assert row["num_word_level_tokens"] == words_and_lines
    assert row["word_perplexity"] == pytest.approx(math.exp(row["nll_sum"] / words_and_lines))
    assert row["whitespace_word_perplexity"] == pytest.approx(math.exp(row["nll_sum"] / len(text.split())))
    assert row["bits_per_byte"] == pytest.approx(row["nll_sum"] / math.log(2) / split.num_bytes)
    assert f"{row['token_perplexity']:.3f}" in table


def test_eval_ppl_context_curve_writes_json_and_plot(run_dir, tmp_path):
    out = tmp_path / "curve.json"
    assert eval_ppl.main([str(run_dir), "--split", "test", "--contexts", "64,128,300", "--stride", "32",
                          "--batch-size", "3", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["context"] for r in rows] == [64, 128, 300]  # 300 > the training context: RPE offsets clamp
    assert all(r["split"] == "test" and r["stride"] == 32 and math.isfinite(r["token_perplexity"]) for r in rows)
    assert len({r["num_tokens"] for r in rows}) == 1
    assert out.with_suffix(".png").stat().st_size > 1000


def test_eval_ppl_default_json_goes_into_the_run_directory_named_by_context(run_dir):
    checkpoint_dir = run_dir / "checkpoints" / "step_00000006"
    assert eval_ppl.main([str(checkpoint_dir), "--context", "32", "--no-progress"]) == 0
    assert eval_ppl.main([str(checkpoint_dir), "--context", "48", "--stride", "16", "--no-progress"]) == 0
    first = json.loads((run_dir / "eval" / "step_00000006_valid_ctx32.json").read_text())
    second = json.loads((run_dir / "eval" / "step_00000006_valid_ctx48_stride16.json").read_text())
    assert first["results"][0]["context"] == 32 and second["results"][0]["context"] == 48  # neither overwritten


@pytest.mark.parametrize("extra, message", [
    (["--stride", "200"], "--stride=200"),
    (["--stride", "0"], "--stride=0 must be >= 1"),
    (["--stride", "-5"], "--stride=-5 must be >= 1"),
    (["--batch-size", "0"], "--batch-size=0 must be >= 1"),
    (["--batch-size", "-2", "--context", "64"], "--batch-size=-2 must be >= 1"),
    (["--contexts", "64,abc"], "comma-separated"),
    (["--context", "0"], ">= 1"),
    (["model.nlayers=3"], "model.nlayers"),
])
def test_eval_ppl_bad_requests_are_clear_errors(run_dir, extra, message, capsys):
    assert eval_ppl.main([str(run_dir), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_ppl_unwritable_json_fails_before_the_work(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target, message in [(blocker / "out.json", "cannot be written"), (tmp_path, "is a directory")]:
        assert eval_ppl.main([str(run_dir), "--json", str(target), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "tokens" not in err  # refused before the split was read and scored


def test_eval_table_keeps_columns_apart_and_prints_huge_perplexities_short():
    from lm.eval.perplexity import SplitPerplexity
    def row(split, context, stride, tokens, words, token_ppl, word_ppl, bits, seconds):
        return SplitPerplexity(split, context, stride, 1.0, tokens, words - 1, 1, words, 1_000_000, token_ppl,
                               word_ppl, word_ppl, bits, seconds)
    big = row("test", 4096, 64, 245_566, 217_646, 123_456_789.0, math.exp(700), 1.5, 2.0)
    diverged = row("test", 4096, 64, 245_566, 217_646, math.inf, math.inf, 99.0, 2.0)
    small = row("valid", 128, 128, 10, 9, 12.3456, 45.6789, 1.2345, 2.0)
    from lm.cli.eval_ppl import format_table
    table = format_table([small, big, diverged]).splitlines()[:5]
    assert table[2].split() == ["valid", "128", "128", "10", "9", "12.346", "45.679", "1.2345", "5"]
    assert table[3].split()[5:7] == ["1.235e+08", "1.014e+304"] and table[4].split()[5:7] == ["inf", "inf"]
    assert max(map(len, table)) < 100  # a 304-digit number would not fit


def test_eval_ppl_scores_with_the_checkpoints_tokenizer_whatever_the_data_settings_say(run_dir, tmp_path):
    """Settings that would now train another tokenizer (e.g. changed since training) do not change the result."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert eval_ppl.main([str(run_dir), "--context", "40", "--json", str(a), "--no-progress"]) == 0
    assert eval_ppl.main([str(run_dir), "--context", "40", "--json", str(b), "--no-progress",
                          "data.tokenizer.vocab_size=300"]) == 0
    (ra,), (rb,) = json.loads(a.read_text())["results"], json.loads(b.read_text())["results"]
    ra.pop("seconds"), rb.pop("seconds")
    assert ra == rb


def test_eval_ppl_missing_checkpoint_and_missing_split(run_dir, tmp_path, capsys):
    assert eval_ppl.main([str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_ppl.main([str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    local = tmp_path / "local"
    local.mkdir()
    for split in ("train", "valid"):  # no test file
        (local / f"wiki.{split}.tokens").write_text(" = A = \n some text here \n")
    assert eval_ppl.main([str(run_dir), "--split", "test", "data.source=local", f"data.path={local}"]) == 2
    assert "no test split" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- generate
def test_generate_greedy_is_deterministic_and_stops_at_the_budget(run_dir, capsys):
    args = [str(run_dir), "--prompt", "The ", "--temperature", "0", "--max-new-tokens", "12"]
    assert generate.main(args) == 0
    first = capsys.readouterr()
    assert generate.main(args + ["--stream"]) == 0
    second = capsys.readouterr()
    assert first.out == second.out and len(first.out) > 1  # streamed text equals the text printed at the end
    assert "tokens/s" in first.err and "12 new tokens (token budget)" in first.err


def test_generate_seeds_samples_and_empty_prompt(run_dir, capsys):
    def sample(seed, n=1):
        assert generate.main([str(run_dir), "--prompt", "", "--seed", str(seed), "--num-samples", str(n),
                              "--max-new-tokens", "40", "--top-k", "50", "--top-p", "0.95"]) == 0
        return capsys.readouterr().out

    two = sample(5, n=2)
    assert "sample 1 (seed 5)" in two and "sample 2 (seed 6)" in two
    assert sample(5) == sample(5) != sample(6)
    assert sample(6).rstrip("\n") in two  # sample i of seed S is sample 0 of seed S + i


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-2"], "top_k"),
    (["--max-new-tokens", "-1"], "max-new-tokens"),
    (["--num-samples", "0"], "num-samples"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt-file"),
])
def test_generate_invalid_parameters_are_clear_errors(run_dir, extra, message, capsys):
    assert generate.main([str(run_dir), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["eval_ppl", "eval_passkey", "generate", "harness"])
def test_every_device_flag_takes_cuda_n_and_names_a_device_this_machine_lacks(tool, run_dir, capsys):
    """``--device cuda:N`` is accepted as docs/evaluation.md says, and a device that is not there is a one-line
    error naming it (checked before any work), on a machine with or without CUDA."""
    import torch

    main = load_tool(tool).main
    for device in ("cuda:0", f"cuda:{torch.cuda.device_count()}"):
        if device == "cuda:0" and torch.cuda.is_available():
            continue
        argv = [str(run_dir), "--device", device] + (["--tasks", "x"] if tool == "harness" else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device={device} but ") and err.count("\n") == 1, err
        assert "CUDA is not available" in err or "CUDA device(s)" in err, err


def test_commands_use_the_configs_cpu_threads(run_dir, capsys):
    """compute.cpu_threads is applied when a command starts: 1 by default (a run stored without the key gets it
    too), N when given on the command line, and torch's own choice for 0."""
    import torch

    before = torch.get_num_threads()
    try:
        for overrides, want in (([], 1), (["compute.cpu_threads=3"], 3)):
            torch.set_num_threads(2)
            assert generate.main([str(run_dir), "--max-new-tokens", "2", "--prompt", "a", *overrides]) == 0
            assert torch.get_num_threads() == want, overrides
            assert eval_ppl.main([str(run_dir), "--no-progress", "--json", str(run_dir.parent / "t.json"),
                                  *overrides]) == 0
            assert torch.get_num_threads() == want, overrides
            torch.set_num_threads(2)
            assert load_tool("eval_passkey").main([str(run_dir), "--no-progress", "--contexts", "64", "--depths", "0",
                                                   "--trials", "1", "--json", str(run_dir.parent / "p.json"),
                                                   *overrides]) == 0
            assert torch.get_num_threads() == want, overrides
        torch.set_num_threads(2)
        assert generate.main([str(run_dir), "--max-new-tokens", "1", "--prompt", "a", "compute.cpu_threads=0"]) == 0
        assert torch.get_num_threads() == 2
        assert generate.main([str(run_dir), "--prompt", "a", "compute.cpu_threads=-1"]) == 2
        assert "compute.cpu_threads=-1 must be >= 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_progress_bars_leave_no_carriage_returns_in_a_log_file(run_dir, tmp_path, capfd):
    """Progress bars (data preparation, scoring) are drawn on a terminal only: stderr captured to a file holds no
    carriage-return runs."""
    from lm.cli.prepare_data import main as prepare_main

    assert prepare_main([str(ROOT / "configs" / "smoke.yaml"), f"data.cache_dir={tmp_path / 'cache'}",
                         "data.synthetic.train_tokens=20000", "data.progress=true"]) == 0
    assert eval_ppl.main([str(run_dir), "--json", str(tmp_path / "ppl.json")]) == 0
    err = capfd.readouterr().err
    assert "wrote" in err and "\r" not in err, err[-1000:]


def test_generate_command_line_reads_the_prompt_from_stdin(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), str(run_dir), "--temperature", "0",
                           "--max-new-tokens", "8", "--stream"], input="The key", capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    prompt_tokens = len(load_for_inference(run_dir).tokenizer.encode("The key"))
    assert f"prompt {prompt_tokens} tokens" in done.stderr and "8 new tokens" in done.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "tools/generate.py"), str(run_dir / "nope")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# ----------------------------------------------------------------------------------------------- real text
@pytest.mark.slow
def test_word_and_token_counts_on_the_wikitext_sample(tmp_path, sample_dir):
    run = train_run(tmp_path, "data.source=local", f"data.path={sample_dir}", "data.tokenizer.vocab_size=400",
                     "data.tokenizer.train_max_bytes=300000", "model.n_layers=1", "model.d_model=32",
                     "model.n_heads=2", "model.d_ff=64", "max_steps=2", "save_every=2", "eval_every=0")
    out = tmp_path / "test.json"
    assert eval_ppl.main([str(run), "--split", "test", "--context", "512", "--batch-size", "16", "--json", str(out),
                          "--no-progress"]) == 0
    (row,) = json.loads(out.read_text())["results"]
    text = (sample_dir / "wiki.test.tokens").read_text(encoding="utf-8")
    assert row["num_words"] == len(text.split()) == 241_211  # docs/evaluation.md's count
    assert row["num_line_ends"] == text.count("\n") == 4_358
    assert row["num_word_level_tokens"] == 245_569  # WikiText-103's test token count, as in the literature
    assert row["word_perplexity"] == pytest.approx(math.exp(row["nll_sum"] / 245_569))
    assert row["num_bytes"] == len(text.encode())
    tokenizer = load_for_inference(run).tokenizer
    assert row["num_tokens"] == len(tokenizer.encode(text))  # every token of the split scored once


# ----------------------------------------------------------------------------------------------- bench_generate
@pytest.mark.slow  # six fresh processes
def test_bench_generate_reports_constant_clipped_state_and_growing_caches(tmp_path, capsys):
    bench = load_tool("bench_generate")
    out = tmp_path / "bench.json"
    assert bench.main(["--contexts", "600,1500", "--rounds", "2", "--block", "2", "--softmax-max-prefill", "64",
                       "--json", str(out)]) == 0
    rows = {(r["model"], r["context"]): r for r in json.loads(out.read_text())["results"]}
    # contexts beyond the 512 clipped offsets: the ring is full, the state stops growing
    assert rows["clipped", 600]["cache_bytes"] == rows["clipped", 1500]["cache_bytes"]
    assert rows["general", 1500]["cache_bytes"] > rows["general", 600]["cache_bytes"]
    assert rows["softmax", 1500]["cache_bytes"] > rows["softmax", 600]["cache_bytes"]
    assert rows["softmax", 1500]["prefilled_tokens"] == 64  # the rest of the KV cache is repeated entries
    assert all(r["tokens_per_second"] > 0 and r["rss_bytes"] > 0 for r in rows.values())
    assert "clipped" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- bench_train
def test_bench_train_builds_every_variant_and_reports_throughput(tmp_path, capsys):
    bench = load_tool("bench_train")
    out = tmp_path / "bench.json"
    assert bench.main(["--contexts", "32", "--tokens-per-step", "64", "--steps", "1", "--repeats", "1",
                       "--layers", "1", "--d-model", "32", "--features", "8", "--vocab", "64",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == list(bench.VARIANTS)
    assert all(r["batch"] == 2 and r["tokens_per_s"] > 0 for r in report["results"])
    assert "kernelized_rpe_clip128" in capsys.readouterr().out


def test_every_mutant_of_tools_mutants_applies_to_todays_code():
    """tools/mutants.py plants each listed bug by replacing a snippet that must occur exactly once in its file, and
    names tests that exist: when the code moves on, this says which mutant to update (the round itself is run by
    hand: docs/testing.md)."""
    mutants = load_tool("mutants")
    assert len(mutants.MUTANTS) >= 18 and mutants.check(mutants.MUTANTS) == []
    for m in mutants.MUTANTS:
        for test in m.tests:
            path, _, name = test.partition("::")  # a test file, or one test function of it
            assert (ROOT / path).is_file(), (m.name, test)
            assert not name or f"def {name}(" in (ROOT / path).read_text(), (m.name, test)
    broken = mutants.Mutant("x", "lm/training/preemption.py", "no such snippet", "y", ("tests",), "")
    assert mutants.check([broken]) == ["x: the original snippet occurs 0 times in lm/training/preemption.py "
                                       "(expected once)"]


# ----------------------------------------------------------------------------------------------- --help
HELP = r"""
import contextlib, importlib, io, json, sys
heavy = ("torch", "omegaconf", "deepspeed", "transformers", "lm_eval", "sentencepiece", "datasets")
out = {}
for name in sys.argv[1:]:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            importlib.import_module(f"lm.cli.{name}").main(["--help"])
        except SystemExit:
            pass
    out[name] = {"text": text.getvalue(), "imported": [m for m in heavy if m in sys.modules]}
print(json.dumps(out))
"""
FAST_HELP = sorted(p.stem for p in (ROOT / "lm" / "cli").glob("*.py") if p.stem not in ("__init__", "common"))


def test_help_is_fast_says_each_thing_once_and_train_lists_every_config_key():
    """``--help`` of every command answers without importing torch (or any other heavy library), prints its
    description once, and train.py's lists every config key with its default."""
    import dataclasses
    import importlib

    import yaml

    from lm.config import TrainConfig

    done = subprocess.run([sys.executable, "-c", HELP, *FAST_HELP], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    helps = json.loads(done.stdout)
    for name, got in helps.items():
        assert got["imported"] == [], (name, got["imported"])
        first = importlib.import_module(f"lm.cli.{name}").__doc__.strip().splitlines()[0]
        assert got["text"].count(first) == 1, (name, got["text"][:400])

    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from (leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value)
                        else [(f"{prefix}{f.name}", value)])

    listed = dict(re.findall(r"^  (\S+) = (.*)$", helps["train"]["text"], re.MULTILINE))
    want = dict(leaves(TrainConfig()))
    assert listed.keys() == want.keys()
    assert {k: yaml.safe_load(v) for k, v in listed.items()} == want  # the defaults as YAML would give them
    assert "Signals that stop training after the step in flight" in helps["train"]["text"]  # the help text
