"""What happens when things go wrong: divergence with frequent saves, two trainers on one run directory, a
stale lock, damaged checkpoints, crash debris, and bad input that must be a one-line error."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMOKE_CONFIG, ckpt, smoke_argv, write_meta
from lm import checkpoint
from lm.checkpoint import CheckpointError, damage, find_checkpoint
from lm.inference.loading import load_for_inference
from lm.cli import eval_ppl, generate
from lm.cli.train import EXIT_DIVERGED, main
from lm.config import load_config
from lm.fileio import LockHeld, OwnerLock, sha256_file
from lm.training.steplog import read_steps
from lm.training.loop import TrainingStopped, train


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# ------------------------------------------------------------------ divergence
@pytest.mark.slow
def test_a_diverging_run_with_frequent_saves_keeps_a_usable_checkpoint_and_resumes_from_it(tmp_path, cache_dir,
                                                                                           capsys):
    # lr 1 explodes within a few steps of warmup; a checkpoint after every step, only one kept
    run = tmp_path / "run"
    argv = smoke_argv(run, cache_dir, "max_steps=40", "optim.lr=1", "optim.warmup_steps=20", "save_every=1",
                      "keep_checkpoints=1")
    assert main(argv) == EXIT_DIVERGED
    err = capsys.readouterr()
    message = err.err.strip().splitlines()[-1]
    assert message.startswith("error: training diverged at step") and "bad steps in a row" in message
    assert "bad step (loss spike" in err.out  # each bad step is reported as it happens
    records = read_steps(run / "steps.jsonl")
    first_bad = next(r["step"] for r in records if r["bad"])
    assert all(r["bad"] for r in records[first_bad - 1:]) and len(records) == first_bad + 4  # 5 in a row stop it
    # no checkpoint was written in the streak; the weights of the last update are set aside; the last good one stays
    good = re.search(r"Last good checkpoint: (\S+) \(step (\d+)\)", message)
    assert good and int(good.group(2)) == first_bad - 2
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [checkpoint.checkpoint_name(first_bad - 2), checkpoint.checkpoint_name(first_bad - 1) + ".diverged"]
    # the last good checkpoint is usable: tools pick it from the run directory, and its loss is the run's early one
    inference = load_for_inference(run)
    assert inference.path == Path(good.group(1)) and inference.step == first_bad - 2
    out = tmp_path / "eval.json"
    assert eval_ppl.main([str(run), "--json", str(out), "--no-progress"]) == 0
    valid_loss = math.log(json.loads(out.read_text())["results"][0]["token_perplexity"])
    assert valid_loss < records[0]["loss"]  # better than the freshly initialised model
    # resuming from it with a lower learning rate (the override the message names) starts a fresh streak
    suggested = float(re.search(r"optim\.lr=([0-9.e-]+)", message).group(1))
    assert suggested < 1
    assert main(smoke_argv(run, cache_dir, "max_steps=40", f"optim.lr={suggested / 10}", "optim.warmup_steps=20",
                           "save_every=1", "keep_checkpoints=1", f"stop_at={first_bad + 3}")) == 0
    assert f"resumed from {good.group(1)} at step {first_bad - 2}" in capsys.readouterr().out
    records = read_steps(run / "steps.jsonl")
    assert [r["step"] for r in records] == list(range(1, first_bad + 4))  # the failed attempt's lines are gone
    assert not any(r["bad"] for r in records[first_bad - 2:])
    assert find_checkpoint(run).name == checkpoint.checkpoint_name(first_bad + 3)


def test_nonfinite_steps_are_never_checkpointed_and_the_stop_is_an_error(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    # lr=1e9 blows the weights up at the first update; every later loss is non-finite
    assert main(smoke_argv(run, cache_dir, "max_steps=30", "optim.lr=1e9", "optim.warmup_steps=0", "optim.grad_clip=0",
                           "save_every=1", "divergence.max_bad_steps=3",
                           "divergence.spike_factor=0")) == EXIT_DIVERGED
    message = capsys.readouterr().err
    assert "3 bad steps in a row" in message and "3 x non-finite loss" in message
    assert "The weights of step 1 failed on all of them" in message and "No checkpoint was written before" in message
    assert checkpoint.list_checkpoints(run) == [] and (run / "checkpoints" / "step_00000001.diverged").is_dir()
    assert [r["bad"] for r in read_steps(run / "steps.jsonl")] == ["", "loss", "loss", "loss"]


def test_a_run_that_ends_inside_a_streak_of_bad_steps_fails_without_checkpointing_them(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"  # lr 1 spikes from step 4 on (see the divergence test); the run ends at step 5
    assert main(smoke_argv(run, cache_dir, "max_steps=5", "optim.lr=1", "optim.warmup_steps=20",
                           "save_every=1")) == EXIT_DIVERGED
    message = capsys.readouterr().err
    assert "the run reached step 5 in a streak of bad steps, so its last checkpoint was not written" in message
    assert f"Last good checkpoint: {ckpt(run, 3)} (step 3)" in message
    assert [checkpoint.checkpoint_step(c) for c in checkpoint.list_checkpoints(run)] == [2, 3]


def test_a_run_ending_far_above_its_first_loss_fails(run, cache_dir, capsys):
    meta_path = ckpt(run, 6) / checkpoint.META
    meta = json.loads(meta_path.read_text())
    meta["counters"]["first_loss"] = 0.5  # as if the run had started far lower than it ends
    write_meta(meta_path.parent, meta)
    with pytest.raises(TrainingStopped) as stopped:  # what an in-process caller (e.g. a study) sees
        train(load_config([SMOKE_CONFIG], smoke_argv(run, cache_dir, "max_steps=8", "save_every=2")[1:]))
    assert stopped.value.kind == "ended_far_above_start" and stopped.value.step == 8
    message = str(stopped.value)
    assert "the run ended with a training loss of" in message and "its first step's 0.5" in message
    assert main(smoke_argv(run, cache_dir, "max_steps=10", "save_every=2")) == EXIT_DIVERGED  # again fails
    assert "the run ended with a training loss of" in capsys.readouterr().err
    assert main(smoke_argv(run, cache_dir, "max_steps=10", "save_every=2", "divergence.final_loss_factor=0")) == 0


# ------------------------------------------------------------------ one trainer per run directory
LOCK_HOLDER = """
import sys, time
from lm.fileio import OwnerLock
lock = OwnerLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "run" / "train.lock"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as e:
            OwnerLock(path).acquire()
        assert e.value.holder["pid"] == holder.pid and e.value.holder["host"] == socket.gethostname()
        assert f"pid {holder.pid} on host {socket.gethostname()} (started " in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = OwnerLock(path)
    previous = lock.acquire()  # the kernel dropped the dead holder's lock; its note is what is left
    assert previous["pid"] == holder.pid
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(LockHeld):  # held now, also against this same process opening it again
        OwnerLock(path).acquire()
    lock.release()
    assert path.read_text() == "" and OwnerLock(path).acquire() is None  # a clean release leaves no note


@pytest.mark.slow
def test_a_second_trainer_on_a_run_directory_is_refused_and_a_killed_ones_lock_taken_over(tmp_path, cache_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools" / "train.py"),
           *smoke_argv(run, cache_dir, "max_steps=100000", "save_every=5", "log_every=1000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while not checkpoint.list_checkpoints(run):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "the first trainer wrote no checkpoint"
            time.sleep(0.2)
        start = time.time()
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: run_dir={run} is in use by pid {first.pid} on host {socket.gethostname()}"
                                  f" (started ")
        assert "choose another run_dir" in message and time.time() - start < 60
        assert first.poll() is None, "the refused trainer disturbed the running one"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()
    killed_at = checkpoint.checkpoint_step(find_checkpoint(run))
    third = subprocess.run([*cmd, f"stop_at={killed_at + 1}"], env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"taking over {run / 'train.lock'} from pid {first.pid}" in third.stdout
    assert checkpoint.checkpoint_step(find_checkpoint(run)) == killed_at + 1
    assert (run / "train.lock").read_text() == ""  # released at the end


# ------------------------------------------------------------------ damaged checkpoints
def flip_a_byte(path):
    """Change one byte in the middle (tensor data: torch.load would read it without complaint)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated model.pt": lambda c: truncate(c / "model.pt"),
    "missing model.pt": lambda c: (c / "model.pt").unlink(),
    "truncated meta.json": lambda c: truncate(c / "meta.json"),
    "changed byte in model.pt": lambda c: flip_a_byte(c / "model.pt"),
    "no meta.json": lambda c: (c / "meta.json").unlink(),
    "truncated tokenizer": lambda c: truncate(c / "tokenizer" / "tokenizer.model"),
}


@pytest.mark.parametrize("how", list(DAMAGES))
def test_eval_and_generate_fall_back_to_the_newest_intact_checkpoint(run, how, tmp_path, capsys):
    DAMAGES[how](ckpt(run, 6))
    out = tmp_path / "e.json"
    assert eval_ppl.main([str(run), "--json", str(out), "--no-progress", "--context", "32"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {ckpt(run, 6)}: " in err and json.loads(out.read_text())["step"] == 4
    assert generate.main([str(run), "--prompt", "the", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {ckpt(run, 6)}" in err and "step 4" in err
    # named explicitly, the damaged checkpoint is a one-line error that points at the intact one
    assert eval_ppl.main([str(ckpt(run, 6)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {ckpt(run, 6)} is damaged: ") and err.count("\n") == 1
    assert f"the newest intact one of that run is {ckpt(run, 4)}" in err
    assert generate.main([str(ckpt(run, 6)), "--prompt", "the"]) == 2 and "is damaged" in capsys.readouterr().err


def test_what_is_damaged_is_named(run):
    truncate(ckpt(run, 6) / "model.pt")
    assert re.fullmatch(r"model\.pt is [\d,]+ bytes but [\d,]+ were written", damage(ckpt(run, 6)))
    truncate(ckpt(run, 4) / "optimizer.pt")
    assert damage(ckpt(run, 4)) is None  # inference does not need the optimizer state ...
    assert "optimizer.pt is" in damage(ckpt(run, 4), "training")  # ... a resume does
    (ckpt(run, 2) / "meta.json").unlink()
    assert "no meta.json" in damage(ckpt(run, 2))


def test_checkpoints_written_before_integrity_records_are_checked_by_their_archives(run):
    for step in (4, 6):
        meta = json.loads((ckpt(run, step) / checkpoint.META).read_text())
        del meta["files"], meta["sha256"]
        write_meta(ckpt(run, step), meta, older_version=True)
    assert damage(ckpt(run, 6), "training") is None
    truncate(ckpt(run, 6) / "model.pt", keep=0.9)
    assert "model.pt is truncated or damaged" in damage(ckpt(run, 6))
    assert find_checkpoint(run) == ckpt(run, 4)
    truncate(ckpt(run, 4) / "optimizer.pt", keep=0.9)
    assert damage(ckpt(run, 4)) is None and "optimizer.pt is truncated" in damage(ckpt(run, 4), "training")


def test_deepspeed_state_is_part_of_what_a_resume_checks(run):
    c = ckpt(run, 6)
    (c / "optimizer.pt").unlink()
    (c / "deepspeed").mkdir()
    (c / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    meta = json.loads((c / checkpoint.META).read_text())
    meta["engine"] = "deepspeed"
    meta["files"] = {k: v for k, v in meta["files"].items() if k != "optimizer.pt"}
    meta["files"]["deepspeed/mp_rank_00_model_states.pt"] = 1000
    write_meta(c, meta)
    assert damage(c, "training") is None
    truncate(c / "deepspeed" / "mp_rank_00_model_states.pt")
    assert damage(c, "training") == "deepspeed/mp_rank_00_model_states.pt is 500 bytes but 1,000 were written"
    assert damage(c) is None


@pytest.mark.parametrize("how", ["truncated model.pt", "truncated optimizer.pt", "changed byte in optimizer.pt",
                                 "no meta.json"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, cache_dir, how, capsys):
    c = ckpt(run, 6)
    if how == "truncated optimizer.pt":
        truncate(c / "optimizer.pt")
    elif how == "changed byte in optimizer.pt":
        flip_a_byte(c / "optimizer.pt")
    else:
        DAMAGES[how](c)
    assert main(smoke_argv(run, cache_dir, "max_steps=8", "save_every=2", "keep_checkpoints=3")) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping checkpoint {c}: " in err and f"resumed from {ckpt(run, 4)} at step 4" in out
    assert [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(run)] == [4, 6, 8]
    assert damage(c, "training") is None  # step 6 was written again, whole


def test_no_intact_checkpoint_to_resume_is_a_one_line_error(run, cache_dir, capsys):
    for step in (2, 4, 6):
        truncate(ckpt(run, step) / "model.pt")
    assert main(smoke_argv(run, cache_dir, "max_steps=8")) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: no checkpoint of {run} is intact")
    assert eval_ppl.main([str(run)]) == 2 and "holds no intact checkpoint" in capsys.readouterr().err


def test_resuming_with_weights_of_another_shape_is_a_one_line_error(run, cache_dir, capsys):
    c = ckpt(run, 6)
    state = torch.load(c / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    torch.save(state, c / "model.pt")  # a consistent checkpoint whose weights do not fit its config
    meta = json.loads((c / checkpoint.META).read_text())
    meta["files"]["model.pt"] = (c / "model.pt").stat().st_size
    meta["sha256"]["model.pt"] = sha256_file(c / "model.pt")
    write_meta(c, meta)
    assert main(smoke_argv(run, cache_dir, "max_steps=8")) == 1
    err = capsys.readouterr().err
    assert f"weights of another shape than the model: {name}" in err and "Traceback" not in err


def test_a_damaged_checkpoint_tokenizer_is_not_advised_to_be_rebuilt(run):
    c = ckpt(run, 6)
    meta = json.loads((c / checkpoint.META).read_text())
    del meta["files"], meta["sha256"]  # written before checkpoints listed their files: only loading finds out
    write_meta(c, meta, older_version=True)
    (c / "tokenizer" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError) as e:
        load_for_inference(c)
    assert "it cannot be rebuilt" in str(e.value) and "delete" not in str(e.value)


# ------------------------------------------------------------------ restarts
def test_debris_of_a_crash_is_cleared_at_the_next_start_and_a_swapped_checkpoint_restored(run, cache_dir):
    root = run / "checkpoints"
    (root / ".tmp-step_00000008").mkdir()  # a save killed midway
    (root / ".tmp-step_00000008" / "model.pt").write_bytes(b"partial")
    os.replace(ckpt(run, 2), root / ".pruned-step_00000002")  # a pruning killed midway
    os.replace(ckpt(run, 6), root / ".old-step_00000006")  # killed while step 6 was being saved again
    assert main(smoke_argv(run, cache_dir, "max_steps=6", "save_every=2", "data.progress=true")) == 0
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]
    assert damage(ckpt(run, 6), "training") is None


def test_display_settings_do_not_block_a_resume(run, cache_dir, capsys):
    assert main(smoke_argv(run, cache_dir, "max_steps=7", "save_every=7", "data.progress=true")) == 0
    assert f"resumed from {ckpt(run, 6)}" in capsys.readouterr().out


def test_a_yaml_syntax_error_is_a_one_line_error_of_the_command(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [3e-4\n")
    assert main([str(bad), f"run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: YAML syntax error at line 3") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
