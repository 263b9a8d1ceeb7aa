"""End-to-end training with the plain-torch engine on the smoke config (synthetic corpus, tiny model)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SMOKE_CONFIG, scalars, smoke_argv, write_meta
from lm import checkpoint
from lm.cli.train import EXIT_DIVERGED, main
from lm.config import load_config
from lm.training.loop import train



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One corpus cache for the module: the tokenizer is trained once."""
    return tmp_path_factory.mktemp("cache")


def weights(run_dir):
    return torch.load(checkpoint.find_checkpoint(run_dir) / "model.pt", weights_only=True)


def test_tiny_model_loss_falls_and_run_dir_is_complete(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    assert main(smoke_argv(run, cache_dir, "max_steps=40", "eval_every=20", "eval_batches=2", "save_every=10",
                     "keep_checkpoints=2")) == 0
    loss = scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, 41))
    assert sum(loss[s] for s in range(36, 41)) / 5 < sum(loss[s] for s in range(1, 6)) / 5 - 1.0
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "system/memory_gb", "valid/loss", "valid/ppl"):
        assert scalars(run, tag), tag
    valid = scalars(run, "valid/loss")
    assert sorted(valid) == [20, 40] and valid[40] < valid[20]
    assert scalars(run, "valid/ppl")[40] == pytest.approx(math.exp(valid[40]), rel=1e-5)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000030", "step_00000040"]
    cfg = load_config([run / "config.yaml"])
    assert cfg.model.vocab_size > 0 and (run / "tokenizer").is_dir()
    out = capsys.readouterr().out
    assert "step 40/40 | loss" in out and "tok/s | ETA" in out and "valid ppl" in out


@pytest.mark.parametrize("kind, rpe", [("kernelized_rpe", "per_offset"), ("kernelized", "none"),
                                       ("softmax", "per_offset"), ("softmax", "none")])
def test_every_attention_kind_trains(tmp_path, cache_dir, kind, rpe):
    run = tmp_path / kind
    assert main(smoke_argv(run, cache_dir, "max_steps=12", "optim.warmup_steps=4", f"model.attention.kind={kind}",
                     f"model.attention.rpe={rpe}")) == 0
    loss = scalars(run, "train/loss")
    assert all(math.isfinite(v) for v in loss.values())
    assert loss[12] < loss[1] - 0.5


def test_resume_after_stop_equals_uninterrupted(tmp_path, cache_dir):
    common = ["max_steps=16", "save_every=100", "model.dropout=0.1", "model.attention.redraw_every=3"]
    assert main(smoke_argv(tmp_path / "full", cache_dir, *common)) == 0
    assert main(smoke_argv(tmp_path / "split", cache_dir, *common, "stop_at=7")) == 0
    assert checkpoint.read_meta(checkpoint.find_checkpoint(tmp_path / "split"))["step"] == 7
    assert main(smoke_argv(tmp_path / "split", cache_dir, *common)) == 0  # the same command again continues
    full, split = scalars(tmp_path / "full", "train/loss"), scalars(tmp_path / "split", "train/loss")
    assert sorted(split) == list(range(1, 17))
    assert [split[s] for s in range(1, 17)] == [full[s] for s in range(1, 17)]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path, cache_dir):
    common = ["max_steps=40", "save_every=4", "model.dropout=0.1"]
    # Both runs in subprocesses with the same thread count: bit equality holds for the same floating-point
    # reduction order, which depends on the number of threads.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = [sys.executable, str(REPO / "tools/train.py"), *smoke_argv(tmp_path / "full", cache_dir, *common)]
    assert subprocess.run(full, env=env, capture_output=True).returncode == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "tools/train.py"), *smoke_argv(run, cache_dir, *common)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.list_checkpoints(run):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.read_meta(checkpoint.find_checkpoint(run))["step"]
    assert killed_at < 40, "the kill came too late to test anything"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    a, b = weights(tmp_path / "full"), weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_too_many_nonfinite_steps_stop_with_a_message(tmp_path, cache_dir, capsys):
    # lr=1e9 blows the weights up at once; later steps have non-finite loss and are skipped
    assert main(smoke_argv(tmp_path / "run", cache_dir, "max_steps=30", "optim.lr=1e9", "optim.warmup_steps=0",
                     "optim.grad_clip=0", "divergence.max_bad_steps=3", "divergence.spike_factor=0")) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "3 bad steps in a row" in err and "non-finite loss" in err and "training diverged at step" in err


def test_unknown_config_key_is_a_clear_error(tmp_path, cache_dir, capsys):
    assert main(smoke_argv(tmp_path / "run", cache_dir, "optim.learning_rate=1")) == 1
    assert "optim.learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_without_resume_is_refused(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    assert main(smoke_argv(run, cache_dir, "max_steps=2")) == 0
    before = (checkpoint.find_checkpoint(run) / "model.pt").read_bytes()
    assert main(smoke_argv(run, cache_dir, "max_steps=4", "resume=false")) == 1
    assert "resume=true" in capsys.readouterr().err
    assert (checkpoint.find_checkpoint(run) / "model.pt").read_bytes() == before


def test_resuming_with_another_tokenizer_is_an_error(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    assert main(smoke_argv(run, cache_dir, "max_steps=2")) == 0
    meta_path = checkpoint.find_checkpoint(run) / checkpoint.META
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_hash"] = "0" * 64  # as if trained with another tokenizer
    write_meta(meta_path.parent, meta)
    assert main(smoke_argv(run, cache_dir, "max_steps=4")) == 1
    assert "another tokenizer" in capsys.readouterr().err


def test_resuming_with_another_model_is_an_error(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    assert main(smoke_argv(run, cache_dir, "max_steps=2")) == 0
    assert main(smoke_argv(run, cache_dir, "max_steps=4", "model.d_model=32")) == 1
    assert "model.d_model" in capsys.readouterr().err


def test_train_returns_last_step_and_uses_the_configs_cpu_threads(tmp_path, cache_dir):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = load_config([SMOKE_CONFIG], smoke_argv(tmp_path / "run", cache_dir, "max_steps=3")[1:])
        assert train(cfg) == 3
        assert torch.get_num_threads() == 1  # compute.cpu_threads, by default 1
    finally:
        torch.set_num_threads(before)


def test_resuming_with_the_other_engine_is_a_clear_error(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    assert main(smoke_argv(run, cache_dir, "max_steps=2")) == 0
    meta_path = checkpoint.find_checkpoint(run) / checkpoint.META
    meta = json.loads(meta_path.read_text())
    meta["engine"] = "deepspeed"  # as if written by launch.sh
    write_meta(meta_path.parent, meta)
    assert main(smoke_argv(run, cache_dir, "max_steps=4")) == 1
    assert "launch.sh" in capsys.readouterr().err
