"""Stopping early and cleanly: real signals sent to real trainer processes (plain torch, and 2 DeepSpeed CPU ranks
started by launch.sh, torchrun and SLURM's variables) at several points (mid-step, during a save, during
validation, before the first step), time limits, and exact resumes; plus the pieces (handlers, SLURM mapping).

Runs that are compared bit for bit all run with one thread per process (``same_threads_env``)."""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import (REPO, TRAIN_PY, TrainerProcess, assert_same_weights, launch_env, same_threads_env, scalars,
                      smoke_argv, train_command)
from lm import checkpoint
from lm.checkpoint import damage, find_checkpoint, read_meta
from lm.cli.train import EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED, main
from lm.config import ConfigError, load_config
from lm.fileio import exclusive_lock
from lm.training.distributed import SLURM_PORTS, first_host, free_port, slurm_environment
from lm.training.loop import VALIDATION_PENDING
from lm.training.preemption import Decision, Interrupted, StopControl, StopSignals, TrainingPreempted
from lm.training.steplog import read_steps

PLAIN = ("max_steps=8", "save_every=4", "keep_checkpoints=10", "eval_every=6", "eval_batches=0", "eval_stride=8",
         "model.dropout=0.1", "model.attention.redraw_every=3")
"""The plain-torch runs: validation at steps 6 and 8 over the whole valid split with a short stride (about 2 s
each, long enough to be signalled during), dropout and feature redraws (RNG streams a resume must restore)."""
DS = ("max_steps=8", "save_every=4", "keep_checkpoints=10", "deepspeed.zero_stage=1", "deepspeed.torch_adam=true")
"""The DeepSpeed runs: 2 CPU ranks, ZeRO stage 1."""
STOP_LINE = re.compile(r"stopped by (\S+) at step (\d+): checkpoint (\S+); re-run the same command to resume")
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def ds_env(**env) -> dict:
    return same_threads_env(TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(REPO / ".torch_extensions")), **env)


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory, cache) -> Path:
    """An uninterrupted plain-torch run of :data:`PLAIN`."""
    run = tmp_path_factory.mktemp("plain") / "run"
    with TrainerProcess(train_command(*smoke_argv(run, cache, *PLAIN)), same_threads_env()) as p:
        assert p.finish() == EXIT_OK, p.output[-3000:]
    return run


def torchrun(run: Path, cache: Path, *overrides: str) -> list[str]:
    """``torchrun --nproc_per_node 2 tools/train.py`` of :data:`DS` (on a free port)."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [exe, "--nproc_per_node", "2", "--master_port", str(free_port()), str(TRAIN_PY),
            *smoke_argv(run, cache, *DS, *overrides)]


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory, cache) -> Path:
    """An uninterrupted DeepSpeed run of :data:`DS`, started by ``torchrun --nproc_per_node 2``."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    with TrainerProcess(torchrun(run, cache), ds_env()) as p:
        assert p.finish() == EXIT_OK, p.output[-3000:]
    return run


def stop_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.startswith("stopped by")]


def stopped_at(output: str, run: Path, reason: str) -> int:
    """The step of the one "stopped by" line in ``output``; checks that it names ``reason`` and the run's newest
    checkpoint, which is intact and of that step, and that steps.jsonl ends there."""
    lines = stop_lines(output)
    assert len(lines) == 1, output[-3000:]
    m = STOP_LINE.fullmatch(lines[0])
    assert m and m.group(1) == reason, lines[0]
    step = int(m.group(2))
    assert Path(m.group(3)) == find_checkpoint(run) and read_meta(find_checkpoint(run))["step"] == step
    assert damage(find_checkpoint(run), "training") is None
    assert [r["step"] for r in read_steps(run / "steps.jsonl")] == list(range(1, step + 1))
    return step


def tokenizer_locks(cache: Path) -> list[Path]:
    """The lock files a trainer takes first while preparing its data (the cache holds a prepared corpus)."""
    locks = sorted((cache / "locks").glob("tokenizer-*.lock"))
    assert locks
    return locks


def holds_run_lock(run: Path, pid: int) -> bool:
    lock = run / "train.lock"
    return lock.is_file() and f'"pid": {pid}' in lock.read_text()


# ------------------------------------------------------------------------------------------------ the pieces
def test_stop_signals_record_raise_only_where_asked_and_restore_the_previous_handlers():
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    with StopSignals(["SIGUSR1", "SIGTERM"]) as signals:
        os.kill(os.getpid(), signal.SIGUSR1)  # outside an interruptible block: recorded, nothing raised
        deadline = time.monotonic() + 10
        while not signals.received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert signals.received == [signal.SIGUSR1]
        with pytest.raises(Interrupted):  # the work of an interruptible block is dropped once a stop was asked
            with signals.interruptible():
                pass
    with StopSignals(["SIGTERM"]) as signals:
        with pytest.raises(Interrupted):
            with signals.interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # interrupted at once
        assert signals.received == [signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in SIGNALS} == previous


@pytest.mark.parametrize("override, needle", [
    ("preemption.signals=[SIGKILL]", "preemption.signals: 'SIGKILL' is not one of"),
    ("preemption.signals=[SIGTERM,SIGTERM]", "names a signal twice"),
    ("time_limit_minutes=-1", "time_limit_minutes=-1.0 must be a finite number >= 0"),
    ("save_every_minutes=inf", "save_every_minutes=inf must be a finite number >= 0"),
])
def test_bad_preemption_settings_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_slurm_variables_give_the_ranks_and_the_rendezvous():
    task = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8",
            "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[007-009,012],x1",
            "SLURM_STEP_NODELIST": "gpu[008-009]"}
    assert slurm_environment(task) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu008",
                                       "MASTER_PORT": str(SLURM_PORTS[0] + 123456 % SLURM_PORTS[1])}
    assert slurm_environment({**task, "CUDA_VISIBLE_DEVICES": "5"})["LOCAL_RANK"] == "0"  # one GPU bound per task
    assert slurm_environment({**task, "MASTER_ADDR": "head", "MASTER_PORT": "7"})["MASTER_ADDR"] == "head"
    batch_script = {k: v for k, v in task.items() if k != "SLURM_STEP_ID"}  # not a task of srun
    assert slurm_environment(batch_script) == {} and slurm_environment({**task, "RANK": "0"}) == {}
    assert [first_host(n) for n in ("a,b", "node[1-2]-ib", "r[1-2]-n[01-04],z")] == ["a", "node1-ib", "r1-n01"]


def test_time_limit_shorter_than_a_step_stops_after_one_saved_step_and_clock_saves(tmp_path, cache, plain_reference,
                                                                                   capsys):
    """In-process runs (the same command each time): a limit shorter than a step stops after one step, saved, and
    the next command trains one more; ``save_every_minutes`` saves every step; the signal handlers are those of
    before after every run, also after an error."""
    run = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    for step in (1, 2):
        assert main(smoke_argv(run, cache, "max_steps=4", "time_limit_minutes=0.0001")) == EXIT_PREEMPTED
        assert stopped_at(capsys.readouterr().out, run, "time_limit_minutes=0.0001") == step
        assert {s: signal.getsignal(s) for s in SIGNALS} == handlers
    assert main(smoke_argv(run, cache, "max_steps=4", "resume=false")) == EXIT_ERROR  # an error inside train
    assert {s: signal.getsignal(s) for s in SIGNALS} == handlers
    assert main(smoke_argv(run, cache, "max_steps=4", "save_every=1000", "save_every_minutes=0.0001",
                           "keep_checkpoints=10")) == EXIT_OK
    assert [checkpoint.checkpoint_step(c) for c in checkpoint.list_checkpoints(run)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_steps(run / "steps.jsonl")] == [1, 2, 3, 4]
    assert {s: signal.getsignal(s) for s in SIGNALS} == handlers


# ------------------------------------------------------------------------------------------------ plain torch
def test_a_signal_before_the_first_step_writes_nothing_and_a_second_trainer_is_refused(tmp_path, cache,
                                                                                      plain_reference):
    """The trainer waits for its data (the test holds the data cache's lock, as another process preparing it
    would) when SIGTERM comes: it stops at once, with nothing written. Meanwhile a second trainer on the same run
    directory only reports the lock."""
    run = tmp_path / "run"
    cmd = train_command(*smoke_argv(run, cache, *PLAIN))
    with ExitStack() as held:
        for lock in tokenizer_locks(cache):
            held.enter_context(exclusive_lock(lock))
        with TrainerProcess(cmd, same_threads_env()) as first:
            first.wait_until(lambda: holds_run_lock(run, first.proc.pid), "the run directory locked")
            second = subprocess.run(cmd, env=same_threads_env(), capture_output=True, text=True, timeout=300)
            assert second.returncode == EXIT_ERROR and f"is in use by pid {first.proc.pid}" in second.stderr
            assert "stopped by" not in second.stdout
            first.send(signal.SIGTERM)
            assert first.finish(timeout=120) == EXIT_PREEMPTED, first.output[-3000:]
    assert stop_lines(first.output) == ["stopped by SIGTERM before the first step: nothing to save; re-run the same "
                                        "command to start"]
    assert "Traceback" not in first.output
    assert not (run / "checkpoints").exists() and not (run / "steps.jsonl").exists()
    assert not (run / "config.yaml").exists() and (run / "train.lock").read_text() == ""


@pytest.mark.slow
def test_signals_mid_step_and_during_validation_stop_saved_and_the_rerun_ends_bit_for_bit(tmp_path, cache,
                                                                                          plain_reference):
    run = tmp_path / "run"
    cmd = train_command(*smoke_argv(run, cache, *PLAIN))
    with TrainerProcess(cmd, same_threads_env()) as p:  # SIGTERM while step 2 runs
        p.wait_for("step 1/8 |")
        p.send(signal.SIGTERM)
        assert p.finish() == EXIT_PREEMPTED, p.output[-3000:]
    first = stopped_at(p.output, run, "SIGTERM")
    assert 2 <= first < 6, "the signal came too late to test the validation at step 6"
    assert sorted(scalars(run, "train/loss")) == list(range(1, first + 1))  # TensorBoard flushed

    with TrainerProcess(cmd, same_threads_env()) as p:  # SIGINT during the validation of step 6 (about 2 s)
        p.wait_for("step 6/8 |")
        p.send(signal.SIGINT)
        assert p.finish() == EXIT_PREEMPTED, p.output[-3000:]
    assert f"resumed from {find_checkpoint(run).parent / checkpoint.checkpoint_name(first)}" in p.output
    assert stopped_at(p.output, run, "SIGINT") == 6 and "valid loss" not in p.output
    assert read_meta(find_checkpoint(run))["counters"][VALIDATION_PENDING] is True

    with TrainerProcess(cmd, same_threads_env()) as p:
        assert p.finish() == EXIT_OK, p.output[-3000:]
    out = p.output
    assert out.index("step 6 | valid loss") < out.index("step 7/8 |")  # the pending validation comes first
    assert_same_weights(run, plain_reference)
    assert read_steps(run / "steps.jsonl") == read_steps(plain_reference / "steps.jsonl")
    for tag in ("train/loss", "valid/loss"):
        assert scalars(run, tag) == scalars(plain_reference, tag), tag


@pytest.mark.slow
def test_signals_during_saves_never_break_a_checkpoint(tmp_path, cache, plain_reference):
    """A wider model, so that a save takes a while: SIGINT during a regular save stops at that step without
    another one; a second signal during the save of a stop is only recorded; SIGKILL during a save leaves the
    previous checkpoint intact."""
    run = tmp_path / "run"
    cmd = train_command(*smoke_argv(run, cache, "max_steps=8", "save_every=2", "keep_checkpoints=10",
                                    "model.d_model=512", "model.d_ff=2048", "batch_size=2", "micro_batch_size=2",
                                    "data.seq_len=32"))
    root = run / "checkpoints"

    def saving(after: int):
        return lambda: any(int(p.name.split("_")[-1]) > after for p in root.glob(".tmp-step_*"))

    with TrainerProcess(cmd, same_threads_env()) as p:
        p.wait_until(saving(0), "a save")
        p.send(signal.SIGINT)
        assert p.finish() == EXIT_PREEMPTED, p.output[-3000:]
    assert stopped_at(p.output, run, "SIGINT") == 2  # the step being saved: no step more

    with TrainerProcess(cmd, same_threads_env()) as p:
        p.wait_for("step 3/8 |")
        p.send(signal.SIGTERM)  # stops after step 4 (saved) ...
        p.wait_until(saving(2), "the save of the stop")
        p.send(signal.SIGTERM)  # ... and neither of these breaks its save
        p.send(signal.SIGUSR1)
        assert p.finish() == EXIT_PREEMPTED, p.output[-3000:]
    stopped = stopped_at(p.output, run, "SIGTERM")
    assert stopped >= 4

    with TrainerProcess(cmd, same_threads_env()) as p:
        p.wait_until(saving(stopped), "a save")
        p.send(signal.SIGKILL)
        p.finish()
    assert find_checkpoint(run).name == checkpoint.checkpoint_name(stopped)
    assert all(damage(c, "training") is None for c in checkpoint.list_checkpoints(run))


# ------------------------------------------------------------------------------------------------ DeepSpeed
@pytest.mark.slow
@pytest.mark.long
def test_torchrun_starts_two_deepspeed_ranks(ds_reference):
    meta = read_meta(find_checkpoint(ds_reference))
    assert meta["step"] == 8 and meta["engine"] == "deepspeed" and meta["world_size"] == 2


@pytest.mark.slow
@pytest.mark.long
def test_ctrl_c_to_launch_sh_reaches_every_rank_and_the_resume_ends_bit_for_bit(tmp_path, cache, ds_reference):
    """SIGINT to launch.sh's process group, as Ctrl-C in a terminal: the script alone gets it (the launcher has
    a process group of its own) and passes it on to both ranks, waits for their save and exits with their
    status. Resumed (here by torchrun: resuming through launch.sh is test_launch's), the run ends where the
    uninterrupted torchrun run ends."""
    run = tmp_path / "run"
    argv = smoke_argv(run, cache, *DS)
    cmd = ["bash", str(REPO / "launch.sh"), *argv]
    env = launch_env(NGPU="2", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=ds_env()["TORCH_EXTENSIONS_DIR"])
    with TrainerProcess(cmd, env) as p:
        p.wait_for("step 3/8 |")
        p.send_group(signal.SIGINT)
        assert p.finish() == EXIT_PREEMPTED, p.output[-3000:]
    assert stopped_at(p.output, run, "SIGINT") >= 4
    with TrainerProcess(torchrun(run, cache), ds_env()) as p:
        assert p.finish() == EXIT_OK, p.output[-3000:]
    assert "resumed from" in p.output
    assert_same_weights(run, ds_reference)
    assert read_steps(run / "steps.jsonl") == read_steps(ds_reference / "steps.jsonl")


def slurm_job_id() -> str:
    """A job id whose derived MASTER_PORT is free here now."""
    for _ in range(100):
        job = random.randrange(10 ** 5, 10 ** 6)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", SLURM_PORTS[0] + job % SLURM_PORTS[1]))
                return str(job)
            except OSError:
                continue
    raise AssertionError("no free port for a stand-in SLURM job")


def srun(argv, job: str, bin_dir: Path, tasks: int = 2) -> list[TrainerProcess]:
    """What ``srun --ntasks 2 python tools/train.py ARGV`` starts on one node: one process per task with SLURM's
    variables (and none of torch.distributed's), ``bin_dir`` (a stand-in ``scontrol``) first on PATH."""
    base = {k: v for k, v in ds_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    base.update(SLURM_JOB_ID=job, SLURM_STEP_ID="0", SLURM_NTASKS=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks),
                SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost",
                PATH=os.pathsep.join([str(bin_dir), base.get("PATH", "")]))
    return [TrainerProcess(train_command(*argv), {**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
            for i in range(tasks)]


@pytest.mark.slow
@pytest.mark.long
def test_slurm_tasks_map_themselves_stop_together_requeue_and_the_rerun_ends_bit_for_bit(tmp_path, cache,
                                                                                         ds_reference):
    """Two tasks with SLURM's variables only: they map themselves to DeepSpeed ranks. SIGUSR1 (sbatch
    --signal=USR1@120) to both before the first step writes nothing; SIGUSR1 to rank 1 alone mid-run stops both
    at the same step (agreed in the step's reduction); each stop requeues the job (preemption.requeue=true, a
    stand-in scontrol records the call); the re-run ends where the torchrun run ends."""
    run, bin_dir, calls = tmp_path / "run", tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    argv, job = smoke_argv(run, cache, *DS, "preemption.requeue=true"), slurm_job_id()

    with ExitStack() as stack:
        for lock in tokenizer_locks(cache):
            stack.enter_context(exclusive_lock(lock))
        tasks = [stack.enter_context(t) for t in srun(argv, job, bin_dir)]
        tasks[0].wait_until(lambda: holds_run_lock(run, tasks[0].proc.pid), "the run directory locked")
        for t in tasks:
            t.send(signal.SIGUSR1)
        assert [t.finish(timeout=120) for t in tasks] == [EXIT_PREEMPTED] * 2, tasks[0].output[-3000:]
    assert stop_lines(tasks[0].output) == ["stopped by SIGUSR1 before the first step: nothing to save; re-run the "
                                           "same command to start"]
    assert not stop_lines(tasks[1].output) and not (run / "checkpoints").exists()
    assert calls.read_text() == f"requeue {job}\n"

    with ExitStack() as stack:
        tasks = [stack.enter_context(t) for t in srun(argv, job, bin_dir)]
        tasks[0].wait_for("step 5/8 |")
        tasks[1].send(signal.SIGUSR1)
        assert [t.finish() for t in tasks] == [EXIT_PREEMPTED] * 2, tasks[0].output[-3000:]
    assert stopped_at(tasks[0].output, run, "SIGUSR1") >= 6 and not stop_lines(tasks[1].output)
    assert f"requeued SLURM job {job}" in tasks[0].output and calls.read_text() == f"requeue {job}\n" * 2

    with ExitStack() as stack:
        tasks = [stack.enter_context(t) for t in srun(argv, job, bin_dir)]
        assert [t.finish() for t in tasks] == [EXIT_OK] * 2, tasks[0].output[-3000:]
    assert_same_weights(run, ds_reference)
    assert read_steps(run / "steps.jsonl") == read_steps(ds_reference / "steps.jsonl")
    assert read_meta(find_checkpoint(run))["world_size"] == 2


# ------------------------------------------------------------------------------------------------ the decisions
class SteppingClock:
    """A clock the test controls, for :class:`StopControl` and ``train(cfg, clock=...)``: ``now`` seconds (far from
    0, so that no difference of readings can pass for an absolute time), set by the test or advanced by ``tick``
    at every reading; ``signal_at``: raise ``sig`` in this process at that reading (1 = the first), as a signal
    that lands while the step's reduction reads the clock."""

    def __init__(self, tick: float = 0.0, signal_at: int = 0, sig: signal.Signals = signal.SIGTERM):
        self.now, self.tick, self.readings, self.signal_at, self.sig = 1e6, tick, 0, signal_at, sig

    def at(self, seconds: float) -> "SteppingClock":
        self.now = 1e6 + seconds
        return self

    def __call__(self) -> float:
        self.readings += 1
        if self.readings == self.signal_at:
            signal.raise_signal(self.sig)
        self.now += self.tick
        return self.now


def stand_in_scontrol(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """A SLURM job for this process: SLURM_JOB_ID set, and a stand-in ``scontrol`` first on PATH that records its
    arguments in the returned file. Returns (the job id, that file)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
    monkeypatch.setenv("SLURM_JOB_ID", "424242")
    return "424242", calls


@pytest.mark.parametrize("reason, requeued", [("SIGTERM", False), ("SIGINT", False), ("SIGUSR1", True),
                                              ("time_limit_minutes=30", True)])
def test_requeue_follows_time_limits_and_sigusr1_never_sigterm_or_sigint(reason, requeued, tmp_path, monkeypatch):
    """scancel (SIGTERM) and Ctrl-C (SIGINT) mean stop: a requeued job would come back forever. Only the signs that
    the job's time is up (SIGUSR1 from sbatch --signal, time_limit_minutes) run scontrol requeue."""
    from lm.training.preemption import requeue_slurm_job

    job, calls = stand_in_scontrol(tmp_path, monkeypatch)
    assert requeue_slurm_job(load_config([], []), reason) is None and not calls.exists()  # requeue=false: never
    note = requeue_slurm_job(load_config([], ["preemption.requeue=true"]), reason)
    if requeued:
        assert calls.read_text() == f"requeue {job}\n"
        assert note == f"requeued SLURM job {job}: it resumes from this checkpoint when it starts again"
    else:
        assert not calls.exists()
        assert note == f"note: SLURM job {job} not requeued: {reason} means stop (requeue follows time limits only)"


@pytest.mark.parametrize("sig, requeued", [(signal.SIGTERM, False), (signal.SIGUSR1, True)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_mid_run_requeues_only_for_sigusr1(sig, requeued, tmp_path, monkeypatch, cache, capsys):
    """In-process training with preemption.requeue=true in a SLURM job: the signal lands while a step's reduction
    reads the clock (after the first step); the run stops saved at that step, and only SIGUSR1 requeues the job."""
    from lm.training.loop import train

    job, calls = stand_in_scontrol(tmp_path, monkeypatch)
    run = tmp_path / "run"
    argv = smoke_argv(run, cache, "max_steps=6", "save_every=100", "preemption.requeue=true")
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    with pytest.raises(TrainingPreempted) as stopped:
        train(load_config(argv[:1], argv[1:]), clock=SteppingClock(signal_at=6, sig=sig))
    out = capsys.readouterr().out
    assert stopped.value.reason == sig.name and 1 <= stopped_at(out, run, sig.name) < 6
    assert {s: signal.getsignal(s) for s in SIGNALS} == handlers
    if requeued:
        assert calls.read_text() == f"requeue {job}\n" and f"requeued SLURM job {job}" in out
    else:
        assert not calls.exists() and f"SLURM job {job} not requeued: SIGTERM means stop" in out


def test_a_second_signal_while_an_interrupted_block_unwinds_is_only_recorded():
    """Ctrl-C during data preparation or validation ends the block; a second Ctrl-C while it unwinds (its finally
    blocks release locks and remove temporary files) must not raise inside that cleanup."""
    cleaned = []
    with StopSignals(["SIGTERM", "SIGINT"]) as signals:
        with pytest.raises(Interrupted) as e:
            with signals.interruptible():
                try:
                    signal.raise_signal(signal.SIGTERM)  # the handler raises here, at once
                    cleaned.append("not interrupted")
                finally:
                    signal.raise_signal(signal.SIGINT)  # the second signal, while unwinding
                    cleaned.append("cleaned up")
        assert str(e.value) == "SIGTERM" and cleaned == ["cleaned up"]
        assert signals.received == [signal.SIGTERM, signal.SIGINT]
        with pytest.raises(Interrupted):  # and the next interruptible block ends at once, as asked
            with signals.interruptible():
                cleaned.append("ran")
        assert cleaned == ["cleaned up"]


def flags_at(stop: StopControl, clock: SteppingClock, seconds: float) -> tuple[bool, bool]:
    """(save due by the clock, time limit near) from the step whose reduction reads the clock at ``seconds``."""
    clock.at(seconds)
    return stop.flags()[:2]


def test_save_every_minutes_counts_minutes_from_the_last_save():
    clock = SteppingClock().at(0)
    stop = StopControl(load_config([], ["save_every_minutes=2"]), StopSignals(["SIGTERM"]), clock)
    clock.at(10)
    stop.loop_starts()
    assert flags_at(stop, clock, 100) == (False, False)  # 100 s: not yet 2 minutes
    assert flags_at(stop, clock, 119.5) == (False, False)
    assert flags_at(stop, clock, 120) == (True, False)  # 2 minutes since the start, to the second
    clock.at(125)
    stop.saved()
    assert flags_at(stop, clock, 240) == (False, False)  # 115 s since that save
    assert flags_at(stop, clock, 245) == (True, False)
    assert stop.decide((True, False, False)) == Decision("", True)


def test_time_limit_stops_when_the_next_step_would_not_fit():
    """The limit is near when the time used plus the last step's duration (reduction to reduction, not counting
    data preparation before the loop) reaches it."""
    clock = SteppingClock().at(0)
    stop = StopControl(load_config([], ["time_limit_minutes=10"]), StopSignals(["SIGTERM"]), clock)
    clock.at(400)  # 400 s of data preparation
    stop.loop_starts()
    assert flags_at(stop, clock, 430) == (False, False)  # 430 + 30 < 600
    assert flags_at(stop, clock, 500) == (False, False)  # 500 + 70 < 600
    assert flags_at(stop, clock, 550) == (False, True)  # 550 + 50 = 600: the next step would end past the limit
    assert stop.step_seconds == 50
    assert stop.decide((False, True, False)) == Decision("time_limit_minutes=10", False)
    clock.at(10_000)
    assert stop.agree(first_step_done=False) == Decision()  # the clock never stops a command before a step
    assert stop.agree() == Decision("time_limit_minutes=10", False)


def test_a_signal_wins_over_the_clock_and_the_first_configured_signal_names_the_stop():
    clock = SteppingClock().at(0)
    signals = StopSignals(["SIGTERM", "SIGINT", "SIGUSR1"])
    stop = StopControl(load_config([], ["time_limit_minutes=1", "save_every_minutes=1"]), signals, clock)
    signals.received += [signal.SIGUSR1]
    clock.at(90)  # past the limit too
    assert stop.decide(stop.flags()) == Decision("SIGUSR1", True)
    signals.received += [signal.SIGTERM]
    flags = stop.flags()
    assert flags == (True, True, True, False, True) and stop.decide(flags) == Decision("SIGTERM", True)


def test_training_by_a_controlled_clock_saves_every_few_minutes_counted_from_the_last_save(tmp_path, cache):
    """In-process training whose clock advances a minute at every reading (every step reads it at least once):
    with save_every_minutes=2.5 a step saves when 2.5 minutes have passed since the last save, so never two steps
    in a row, and several times before the end."""
    from lm.training.loop import train

    run = tmp_path / "run"
    argv = smoke_argv(run, cache, "max_steps=10", "save_every=1000", "keep_checkpoints=100",
                      "save_every_minutes=2.5")
    assert train(load_config(argv[:1], argv[1:]), clock=SteppingClock(tick=60)) == 10
    saved = [checkpoint.checkpoint_step(c) for c in checkpoint.list_checkpoints(run)]
    by_clock = saved[:-1]
    assert saved[-1] == 10 and len(by_clock) >= 2, saved  # the last step is always saved
    assert all(b - a >= 2 for a, b in zip(by_clock, by_clock[1:])), saved
