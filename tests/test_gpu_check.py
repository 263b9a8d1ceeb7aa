"""tools/gpu_check.sh: its CPU rehearsal (``LM_GPU_CHECK_CPU=1``) runs every stage at tiny sizes and writes every
section of the report (tools/bench_report.py) with the JSON behind it; a stage that fails or runs out of time is
reported, with why, and the next stages still run; bad usage, and a machine without CUDA when the rehearsal is
not asked for, stop it with a one-line error."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SAMPLE_DIR, launch_env
from lm.config import SyntheticConfig
from lm.data.synthetic import split_text
from test_tools_cli import load_tool

CHECK = str(REPO / "tools" / "gpu_check.sh")
report_tool = load_tool("bench_report")


def run_check(out, **env) -> subprocess.CompletedProcess:
    """``tools/gpu_check.sh OUT`` with this interpreter, no inherited ``LM_GPU_CHECK_*``, and ``env``."""
    base = {k: v for k, v in launch_env(PYTHON=sys.executable).items() if not k.startswith("LM_GPU_CHECK")}
    return subprocess.run(["bash", CHECK, str(out)], env={**base, **env}, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def wikitext_sample(tmp_path_factory):
    """The repository's real WikiText-103 sample (:data:`conftest.SAMPLE_DIR`) when present, else
    wiki.{train,valid,test}.tokens of a small synthetic corpus in its layout."""
    if SAMPLE_DIR.is_dir():
        return SAMPLE_DIR
    d = tmp_path_factory.mktemp("corpus")
    for split in ("train", "valid", "test"):
        (d / f"wiki.{split}.tokens").write_text(split_text(SyntheticConfig(train_tokens=20000), split))
    return d


@pytest.mark.slow
@pytest.mark.long
def test_cpu_rehearsal_runs_every_stage_and_writes_every_section(tmp_path, wikitext_sample):
    out = tmp_path / "out"
    r = run_check(out, LM_GPU_CHECK_CPU="1", LM_WIKITEXT_SAMPLE=str(wikitext_sample))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (out / "gpu_report.md").read_text()
    assert r.stdout.rstrip().endswith(text.rstrip())  # the report is printed last
    for title in report_tool.TITLES.values():
        assert f"## {title}" in text
    assert "CPU rehearsal" in text and "Nothing: every stage that ran passed." in text
    data = json.loads((out / "gpu_report.json").read_text())
    assert [(s["stage"], s["status"]) for s in data["stages"]] == [(s, "passed") for s in report_tool.STAGES]
    ceilings = data["machine"]["ceilings"]
    assert ceilings["copy_gbs"] > 0 and ceilings["bf16_tflops"] > 0 and ceilings["fp32_tflops"] > 0
    # tests: every CUDA test collected and skipped for the one reason
    tests = data["tests"]
    assert tests["selected"] == tests["reported"] > 100 and tests["skip_reasons"] == ["CUDA not available"]
    assert sum(c["skipped"] for c in tests["counts"].values()) == tests["selected"] and not tests["failures"]
    # attention: our op on fp32 and bf16 inputs beside SDPA, each timed and with its roofline
    rows = data["attention"]["rows"]
    assert {r["case"] for r in rows} == {"sdpa", "fft", "band", "prefix", "fft@bf16", "band@bf16", "prefix@bf16",
                                         "fused", "fused@bf16"}
    assert all(r["predicted_ms"] > 0 and r["measured_over_predicted"] > 0 for r in rows)
    assert set(data["attention"]["cost_model_fit"]) == {r["case"] for r in rows}
    assert all(r["time_s"] > 0 and r["bound_s"] > 0 and r["limit"] in ("compute", "memory") for r in rows)
    # training: every variant at both contexts, with its model FLOP utilisation
    train = data["train"]["results"]
    assert len(train) == 6 and all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in train)
    # the WikiText-layout run through launch.sh: DeepSpeed bf16, the loss falls, eval_ppl and generate on it
    wt = data["wikitext"]
    assert wt["steps"] == 20 and wt["loss_falls"] and wt["tokens_per_s"] > 0
    assert wt["checkpoint"]["engine"] == "deepspeed" and wt["checkpoint"]["precision"] == "bf16"
    assert math.isfinite(wt["eval"]["token_perplexity"]) and wt["generate"]["decode_tokens_per_s"] > 0
    gen = data["generate"]["results"]
    assert {(r["model"], r["context"]) for r in gen} == {(m, c) for m in ("clipped", "general", "softmax")
                                                         for c in (128, 256)}
    assert all(r["tokens_per_second"] > 0 and r["bound_s"] > 0 for r in gen)


def test_a_stage_that_fails_or_runs_out_of_time_is_reported_and_the_next_still_run(tmp_path):
    out = tmp_path / "out"
    r = run_check(out, LM_GPU_CHECK_CPU="1", LM_GPU_CHECK_STAGES="attention,wikitext,generate",
                  LM_GPU_CHECK_BUDGET_ATTENTION="0.1", LM_WIKITEXT_SAMPLE=str(tmp_path / "no-sample"))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((out / "gpu_report.json").read_text())
    stages = {s["stage"]: s for s in data["stages"]}
    assert stages["attention"]["status"] == "timed out" and "budget of 0.1 s" in stages["attention"]["reason"]
    assert stages["wikitext"]["status"] == "failed" and "set LM_WIKITEXT_SAMPLE" in stages["wikitext"]["reason"]
    assert stages["generate"]["status"] == "passed" and len(data["generate"]["results"]) == 6
    assert all(stages[s]["status"] == "not run" for s in ("machine", "tests", "train"))
    text = (out / "gpu_report.md").read_text()
    assert "### attention: timed out" in text and "### wikitext: failed" in text and "No machine record" in text
    assert r.stdout.rstrip().endswith(text.rstrip())


@pytest.mark.parametrize("args, env, needle", [
    ([], {}, "usage: tools/gpu_check.sh OUT_DIR"),
    (["OUT"], {"LM_GPU_CHECK_STAGES": "tests,bogus"}, "names 'bogus'"),
    (["OUT"], {"LM_GPU_CHECK_CPU": "1", "LM_WHEELS": "/nonexistent"}, "holds no *.whl"),
    (["DONE"], {"LM_GPU_CHECK_CPU": "1"}, "already holds the results of a check"),
])
def test_bad_usage_is_a_one_line_error_and_writes_nothing(tmp_path, args, env, needle):
    (tmp_path / "DONE").mkdir()
    (tmp_path / "DONE" / "gpu_report.md").write_text("an earlier report\n")
    argv = [str(tmp_path / a) for a in args]
    base = {k: v for k, v in launch_env(PYTHON=sys.executable).items() if not k.startswith("LM_GPU_CHECK")}
    r = subprocess.run(["bash", CHECK, *argv], env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "OUT" / "stages.jsonl").exists()
    assert os.listdir(tmp_path / "DONE") == ["gpu_report.md"]
    assert (tmp_path / "DONE" / "gpu_report.md").read_text() == "an earlier report\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_it_stops_unless_the_rehearsal_is_asked_for(tmp_path):
    r = run_check(tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "CUDA is not available" in r.stderr and "LM_GPU_CHECK_CPU=1" in r.stderr
    assert not (tmp_path / "out" / "stages.jsonl").exists() and not os.listdir(tmp_path / "out")
