"""launch.sh: the generated DeepSpeed command, and a real 2-rank DeepSpeed run on CPU (slow)."""
import os
import shlex
import subprocess

import pytest
import torch

from conftest import REPO
from lm import checkpoint
from lm.cli.train import main

LAUNCH = str(REPO / "launch.sh")


def dry_run(*argv, path_prepend=None, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("NGPU", "HOSTFILE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(DRY_RUN="1", **env)
    if path_prepend:
        e["PATH"] = f"{path_prepend}:{e['PATH']}"
    return subprocess.run(["bash", LAUNCH, *argv], env=e, capture_output=True, text=True)


def fake_nvidia_smi(tmp_path, gpus):
    """An ``nvidia-smi`` that lists ``gpus`` GPUs, to check the GPU branch on a machine without one."""
    tool = tmp_path / "nvidia-smi"
    lines = "\\n".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})" for i in range(gpus))
    tool.write_text(f"#!/usr/bin/env bash\nprintf '{lines}\\n'\n")
    tool.chmod(0o755)
    return tmp_path


def test_default_config_and_overrides_are_passed_through():
    r = dry_run("model.attention.kind=softmax", "run_dir=runs/a b", NGPU="2", MASTER_PORT="29999")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert cmd[:2] == ["deepspeed", "--no_local_rank"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "29999"
    assert cmd[-4:] == ["tools/train.py", "configs/wikitext103.yaml", "model.attention.kind=softmax", "run_dir=runs/a b"]


def test_config_argument_and_gpu_count(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path, 4)
    cmd = shlex.split(dry_run("configs/smoke.yaml", "max_steps=3", path_prepend=bin_dir).stdout)
    assert cmd[cmd.index("--num_gpus") + 1] == "4" and cmd[-3:] == ["tools/train.py", "configs/smoke.yaml", "max_steps=3"]
    cmd = shlex.split(dry_run("configs/smoke.yaml", path_prepend=bin_dir, NGPU="3").stdout)
    assert cmd[cmd.index("--num_gpus") + 1] == "3"
    r = dry_run("configs/smoke.yaml", path_prepend=bin_dir, NGPU="5")
    assert r.returncode != 0 and "only 4 GPU(s)" in r.stderr


def test_hostfile_gives_a_multi_node_command(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    r = dry_run("configs/smoke.yaml", HOSTFILE=str(hostfile), MASTER_ADDR="node1")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout)
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile) and cmd[cmd.index("--master_addr") + 1] == "node1"
    assert "--num_gpus" not in cmd  # every slot of every host


@pytest.mark.parametrize("argv, env, needle", [
    (["configs/nope.yaml"], {}, "does not exist"),
    (["configs/smoke.yaml"], {"HOSTFILE": "/nonexistent/hosts"}, "HOSTFILE"),
    (["configs/smoke.yaml"], {"NGPU": "two"}, "NGPU must be a positive integer"),
])
def test_bad_launch_arguments_are_clear_errors(argv, env, needle):
    r = dry_run(*argv, **env)
    assert r.returncode != 0 and needle in r.stderr


@pytest.mark.slow
def test_two_rank_deepspeed_run_then_resume_matches_one_process(tmp_path):
    """A real DeepSpeed run: 2 CPU ranks (gloo), ZeRO stage 1, stopped at step 3 and resumed to step 6.

    Its weights equal a one-process plain-torch run of the same 6 steps: the global-token loss normalisation makes
    the split of the batch irrelevant, and resume is exact. Every checkpoint also checks that ranks agree."""
    common = ["configs/smoke.yaml", f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false",
              "data.synthetic.train_tokens=60000", "max_steps=6", "eval_every=3", "eval_batches=1", "log_every=1",
              "deepspeed.zero_stage=1", "deepspeed.torch_adam=true"]
    ds_run = tmp_path / "ds"
    env = {**os.environ, "NGPU": "2", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))}
    for extra in (["stop_at=3"], []):
        r = subprocess.run(["bash", LAUNCH, *common, f"run_dir={ds_run}", *extra], env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 6/6 | loss" in r.stdout and "valid ppl" in r.stdout
    meta = checkpoint.read_meta(checkpoint.find_checkpoint(ds_run))
    assert meta["step"] == 6 and meta["engine"] == "deepspeed" and meta["world_size"] == 2
    assert (checkpoint.find_checkpoint(ds_run) / "deepspeed").is_dir()

    plain_run = tmp_path / "plain"
    assert main([str(REPO / common[0]), *common[1:], f"run_dir={plain_run}", "deepspeed.zero_stage=0"]) == 0
    a = torch.load(checkpoint.find_checkpoint(ds_run) / "model.pt", weights_only=True)
    b = torch.load(checkpoint.find_checkpoint(plain_run) / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"DeepSpeed 2 ranks != plain in {k}")
