"""launch.sh: the generated DeepSpeed command, and a real 2-rank DeepSpeed run on CPU (slow).

Every launch here runs with ``LM_SKIP_SETUP=1`` and this interpreter's directory first on PATH, so launch.sh
never runs tools/setup.sh: the tests install nothing (checked by the last test of this file)."""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, launch_env
from lm import checkpoint
from lm.cli.train import main
from lm.training.distributed import free_port

LAUNCH = str(REPO / "launch.sh")


def environment_snapshot() -> tuple[str, str]:
    """(the venv's install stamp written by tools/setup.sh, ``pip freeze``) of the interpreter running the tests."""
    stamp = Path(sys.prefix) / ".lm-installed"
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True).stdout
    return (stamp.read_text() if stamp.is_file() else "<no stamp>"), freeze


@pytest.fixture(scope="module", autouse=True)
def launch_tests_leave_the_environment_unchanged():
    """After this file's tests (whatever their order): the venv's install stamp and ``pip freeze`` are what they
    were before them, so no launch test re-ran tools/setup.sh or changed the installed packages."""
    stamp, freeze = environment_snapshot()
    yield
    after = environment_snapshot()
    assert after[0] == stamp, "a launch test re-ran tools/setup.sh (the install stamp changed)"
    assert after[1] == freeze, "a launch test changed the installed packages"


def dry_run(*argv, path_prepend=None, **env):
    return subprocess.run(["bash", LAUNCH, *argv], env=launch_env(path_prepend, DRY_RUN="1", **env),
                          capture_output=True, text=True)


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
@pytest.mark.long
def test_two_rank_deepspeed_run_then_resume_matches_one_process(tmp_path):
    """A real DeepSpeed run: 2 CPU ranks (gloo), ZeRO stage 1, stopped at step 3 and resumed to step 6.

    Its weights equal a one-process plain-torch run of the same 6 steps: the global-token loss normalisation makes
    the split of the batch irrelevant, and resume is exact. Every checkpoint also checks that ranks agree."""
    common = ["configs/smoke.yaml", f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false",
              "data.synthetic.train_tokens=60000", "max_steps=6", "eval_every=3", "eval_batches=1", "log_every=1",
              "deepspeed.zero_stage=1", "deepspeed.torch_adam=true"]
    ds_run = tmp_path / "ds"
    for extra in (["stop_at=3"], []):
        port = free_port()
        env = launch_env(NGPU="2", OMP_NUM_THREADS="1", MASTER_PORT=str(port),
                         TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
        r = subprocess.run(["bash", LAUNCH, *common, f"run_dir={ds_run}", *extra], env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        # DeepSpeed's CPU all-reduce buffers (one per rank, in /dev/shm) are gone with the run
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert "resumed from" in r.stdout and "step 6/6 | loss" in r.stdout and "valid ppl" in r.stdout
    # a quiet log: none of the launcher's INFO lines, DeepSpeed's op notice or accelerator guess, nor bars
    log = r.stdout + r.stderr
    for noise in ("[INFO]", "built successfully", "Setting accelerator", "CUDA_VISIBLE_DEVICES", "hostfile", "\r"):
        assert noise not in log, (noise, log[-3000:])
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


def test_skip_setup_never_runs_the_installer(tmp_path):
    """A copy of launch.sh beside a stand-in tools/setup.sh that only leaves a mark, and a ``python`` without lm's
    dependencies: with LM_SKIP_SETUP the launch stops with a one-line error and the installer never runs;
    without it, the installer is what runs."""
    root = tmp_path / "checkout"
    (root / "tools").mkdir(parents=True)
    shutil.copy(LAUNCH, root / "launch.sh")
    mark = tmp_path / "setup-ran"
    (root / "tools" / "setup.sh").write_text(f"touch {mark}\nexit 3\n")
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").write_text("#!/usr/bin/env bash\nexit 1\n")  # no deepspeed, no anything
    (bare / "python").chmod(0o755)
    env = {"PATH": f"{bare}:/usr/bin:/bin", "DRY_RUN": "1", "HOME": str(tmp_path)}
    r = subprocess.run(["bash", str(root / "launch.sh")], env={**env, "LM_SKIP_SETUP": "1"}, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "LM_SKIP_SETUP" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not mark.exists()
    r = subprocess.run(["bash", str(root / "launch.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 3 and mark.exists()
