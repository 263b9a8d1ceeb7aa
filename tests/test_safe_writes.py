"""Nothing a user owns is deleted or torn: an export never replaces what it did not write, a full or read-only disk
is one line that names the problem and the path (and leaves the previous state intact, and the next run can start),
meta.json is covered by integrity, loading beside a pruning trainer never reports false damage, pruning handles
symbolic links, and bad requests are one line before anything is written.

A full disk is a real one where the test may mount a small tmpfs (root); elsewhere those tests are skipped, and an
OSError(ENOSPC) injected at the write stands in where one can be."""
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMOKE_CONFIG, ckpt, copy_run, cpu_info, smoke_argv
from lm import checkpoint
from lm.checkpoint import damage
from lm.cli import eval_passkey, eval_ppl, generate, prepare_data
from lm.cli.train import main
from lm.config import load_config
from lm.fileio import OwnerLock
from lm.inference.loading import load_for_inference
from lm.training.steplog import read_steps


def one_line(capsys) -> str:
    """The command's stderr, which must be one ``error: ...`` line and no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder`` (symbolic links as their targets)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def mount_tmpfs(where: Path, options: str) -> Path:
    """A tmpfs mounted at ``where`` (skips the test where that is not allowed: it needs root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    return where


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a real 8 MiB file system (tmpfs), unmounted after the test."""
    disk = mount_tmpfs(tmp_path / "disk", "size=8m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill the file system of ``disk`` until about ``leave`` bytes are free."""
    with open(disk / f"filler{len(list(disk.glob('filler*')))}", "wb") as f:
        try:
            f.write(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))
            f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------ 1. exports
def test_an_export_never_replaces_a_run_a_folder_of_runs_or_a_run_in_training(run, tmp_path, capsys):
    pytest.importorskip("transformers")
    from lm.cli.export_hf import main as export_main

    other_runs = tmp_path / "other"
    copy_run(run, other_runs)
    before, others = snapshot(run), snapshot(other_runs)
    for out in (run, run.parent, other_runs, ckpt(run, 6)):  # the run, folders holding runs, the source itself
        assert export_main([str(run), str(out), "--force"]) == 2
        err = one_line(capsys)
        assert ("never replaces" in err or "checkpoints/ folder" in err) and "--force" not in err, err
    assert snapshot(run) == before and snapshot(other_runs) == others
    # a folder of the user's is refused with or without --force, and --force is never suggested for it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert export_main([str(run), str(mine)]) == 2 and "--force" not in one_line(capsys)
    assert export_main([str(run), str(mine), "--force"]) == 2 and "only an earlier export" in one_line(capsys)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    # an earlier export is recognised by its marker: refused without --force (which the refusal suggests) ...
    hf = run / "hf"
    assert export_main([str(run), str(hf)]) == 0 and (hf / "lm_export.json").is_file()
    capsys.readouterr()
    assert export_main([str(run), str(hf)]) == 2 and "pass --force to replace it" in one_line(capsys)
    # ... and never replaced while a trainer holds the run's lock
    lock = OwnerLock(run / "train.lock")
    lock.acquire()
    try:
        assert export_main([str(run), str(hf), "--force"]) == 2 and "in use by a trainer" in one_line(capsys)
    finally:
        lock.release()
    exported = snapshot(hf)
    (hf / "extra.txt").write_text("added by the user")  # files the export did not write: never deleted
    assert export_main([str(run), str(hf), "--force"]) == 2 and "did not write (extra.txt)" in one_line(capsys)
    (hf / "extra.txt").unlink()
    assert snapshot(hf) == exported and snapshot(run) == {**before, **{f"hf/{k}": v for k, v in exported.items()}}
    assert export_main([str(run), str(hf), "--force"]) == 0


def test_an_export_into_a_read_only_folder_is_one_line(run, tmp_path, capsys):
    pytest.importorskip("transformers")
    from lm.cli.export_hf import main as export_main

    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        mount_tmpfs(folder, "ro,size=1m")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        assert export_main([str(run), str(folder / "hf")]) == 2
        assert "read-only or not writable" in one_line(capsys) and not (folder / "hf").exists()
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True) if os.geteuid() == 0 else \
            folder.chmod(0o755)


def test_an_export_on_a_full_disk_is_one_line_and_keeps_the_earlier_export(run, small_disk, capsys):
    pytest.importorskip("transformers")
    from lm.cli.export_hf import main as export_main

    hf = small_disk / "hf"
    assert export_main([str(run), str(hf)]) == 0
    earlier = snapshot(hf)
    capsys.readouterr()
    fill(small_disk, leave=64 << 10)
    assert export_main([str(run), str(hf), "--force"]) == 2
    err = one_line(capsys)
    assert "no space left on the device" in err and f"nothing was written to {hf}" in err
    assert snapshot(hf) == earlier and sorted(p.name for p in small_disk.iterdir()) == ["filler0", "hf"]


# ------------------------------------------------------------------ 2. a full disk while training
def _engine(trained_run, run_dir):
    from lm.training.engine import TorchEngine
    inf = load_for_inference(trained_run)
    cfg = load_config([trained_run / "config.yaml"], [f"run_dir={run_dir}"])
    return TorchEngine(cfg, inf.model.train(), cpu_info()), cfg, inf.tokenizer


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_a_save_on_a_full_disk_is_one_line_and_frees_its_space(trained_run, tmp_path, disk, monkeypatch, request):
    from lm.errors import DiskError
    from lm.training.checkpointing import save_checkpoint

    run_dir = request.getfixturevalue("small_disk") / "run" if disk == "tmpfs" else tmp_path / "run"
    engine, cfg, tokenizer = _engine(trained_run, run_dir)
    first = save_checkpoint(run_dir, engine, 10, cfg, tokenizer, {}, keep=3)
    kept = snapshot(first)
    if disk == "tmpfs":
        fill(run_dir.parent, leave=200 << 10)  # less than a checkpoint
    else:
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: no_space() if str(getattr(f, "name", f)).endswith(
            "model.pt") else real_save(obj, f, *a, **k))
    with pytest.raises(DiskError) as e:
        save_checkpoint(run_dir, engine, 20, cfg, tokenizer, {}, keep=1)
    message = str(e.value)
    assert message.startswith("no space left on the device: ") and ".tmp-step_00000020/" in message
    assert "\n" not in message and "the checkpoint of step 20 was not saved" in message
    assert os.listdir(run_dir / "checkpoints") == ["step_00000010"]  # its partial files went at once
    assert snapshot(first) == kept and damage(first, "training") is None


def test_a_run_restarts_on_a_disk_a_killed_save_left_full(run, small_disk, cache_dir, capsys):
    on_disk = shutil.copytree(run, small_disk / "run")
    (on_disk / "train.lock").write_text("")  # released by the trainer, which stopped on the error
    debris = on_disk / "checkpoints" / ".tmp-step_00000008"  # what its save wrote before the disk was full
    debris.mkdir()
    fill(debris)
    assert main(smoke_argv(on_disk, cache_dir, "max_steps=8", "save_every=8", "keep_checkpoints=3")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [p.name for p in sorted((on_disk / "checkpoints").iterdir())] == [f"step_0000000{s}" for s in (4, 6, 8)]


def test_a_disk_filling_up_during_training_is_one_line(small_disk, cache_dir, capsys):
    fill(small_disk, leave=24 << 10)  # room for the config and the tokenizer, not for a run's logs
    assert main(smoke_argv(small_disk / "run", cache_dir, "max_steps=300", "save_every=1000")) == 1
    err = one_line(capsys)
    assert err.startswith(f"error: no space left on the device: {small_disk / 'run'}")
    assert "run the same command again" in err


def test_a_full_cache_dir_is_one_line_and_leaves_no_debris(small_disk, capsys):
    fill(small_disk, leave=160 << 10)  # room for the tokenizer, not for the token caches
    cache = small_disk / "cache"
    assert prepare_data.main([str(SMOKE_CONFIG), f"data.cache_dir={cache}", "data.progress=false"]) == 2
    err = one_line(capsys)
    assert err.startswith(f"error: no space left on the device: {cache}") and "data.cache_dir" in err
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------ 3. reports
REPORTS = {  # each command that writes a report, asked for a small one
    "eval_ppl": (eval_ppl.main, ["--context", "32"]),
    "eval_ppl --by-position": (eval_ppl.main, ["--by-position", "--contexts", "32", "--max-windows", "2"]),
    "eval_passkey": (eval_passkey.main, ["--contexts", "64", "--depths", "0", "--trials", "1"]),
}


@pytest.mark.parametrize("command", REPORTS)
@pytest.mark.parametrize("disk", ["tmpfs", "injected fsync"])
def test_a_report_on_a_full_disk_keeps_the_earlier_one(trained_run, tmp_path, disk, command, monkeypatch, request,
                                                        capsys):
    main, flags = REPORTS[command]
    folder = request.getfixturevalue("small_disk") if disk == "tmpfs" else tmp_path
    report = folder / "report.json"
    report.write_text(json.dumps({"an": "earlier report"}) + "\n")
    if disk == "tmpfs":
        fill(folder)
    else:  # a file system that reports the lost write at fsync (delayed allocation)
        monkeypatch.setattr(os, "fsync", no_space)
    assert main([str(trained_run), "--json", str(report), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no space left on the device: ") and str(folder) in err
    assert json.loads(report.read_text()) == {"an": "earlier report"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    first = folder / "first.json"
    assert main([str(trained_run), "--json", str(first), *flags, "--no-progress"]) == 2
    assert not first.exists()  # never a 0-byte report


@pytest.mark.parametrize("command", [c for c in REPORTS if c != "eval_ppl"])  # one context: eval_ppl draws no plot
def test_a_plot_on_a_full_disk_keeps_the_earlier_one(trained_run, tmp_path, small_disk, command, capsys):
    main, flags = REPORTS[command]
    plot = small_disk / "plot.png"
    plot.write_bytes(b"an earlier plot")
    fill(small_disk)
    args = [str(trained_run), "--json", str(tmp_path / "report.json"), "--plot", str(plot), *flags, "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no space left on the device: ") and str(small_disk) in err
    assert json.loads((tmp_path / "report.json").read_text())["step"] > 0  # the report before it is whole
    assert plot.read_bytes() == b"an earlier plot"
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".")]


WRITES_IN_PLACE = re.compile(r"""\.write_(text|bytes)\(|\bopen\([^)]*["'][wax]b?["']|\.savefig\((?!f\b)""")
NOT_ATOMIC_ON_PURPOSE = {  # file -> why it may write a file in place
    "lm/training/steplog.py": "steps.jsonl is appended to, one whole line per write (a torn last line is skipped)",
    "lm/stability/runner.py": "appends to a variant's log",
    "lm/data/document_cache.py": "writes a temporary file, renamed once complete",
    "lm/hf/export.py": "writes into the export's temporary directory, renamed once complete",
    "lm/hf/remote_code.py": "writes into the export's temporary directory",
    "tools/bench_attention.py": "/proc/self/clear_refs",
    "tools/bench_data.py": "a benchmark's scratch corpus, whose marker is written last",
    "tools/mutants.py": "plants mutants in a scratch copy of the repository",
}


def test_every_file_the_code_writes_goes_through_an_atomic_write():
    """A report, plot, cache or config written in place is torn by a full disk or a kill: lm.fileio's atomic
    writes are the way to write one. Where the code writes in place on purpose, the list says why."""
    found = {}
    for path in sorted([*(REPO / "lm").rglob("*.py"), *(REPO / "tools").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if rel == "lm/fileio.py":
            continue
        lines = [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                 if WRITES_IN_PLACE.search(line)]
        if lines:
            found[rel] = lines
    unexplained = [line for rel, lines in found.items() if rel not in NOT_ATOMIC_ON_PURPOSE for line in lines]
    assert not unexplained, "write these through lm.fileio.atomic_write*:\n" + "\n".join(unexplained)
    stale = set(NOT_ATOMIC_ON_PURPOSE) - set(found)
    assert not stale, f"no longer writing in place (drop them from the list): {stale}"


# ------------------------------------------------------------------ 4. meta.json's integrity
def test_a_changed_byte_in_meta_json_is_damage_and_falls_back(run, cache_dir, capsys):
    meta = ckpt(run, 6) / checkpoint.META
    meta.write_text(meta.read_text().replace('"step": 6,', '"step": 7,', 1))
    assert "meta.json does not match the sha256 recorded in meta.json.sha256" in damage(ckpt(run, 6))
    assert load_for_inference(run).step == 4
    assert f"skipping checkpoint {ckpt(run, 6)}: meta.json" in capsys.readouterr().err
    # without its hash (as a version before it wrote one), the step still has to agree with the directory's name
    (ckpt(run, 6) / "meta.json.sha256").unlink()
    text = json.loads(meta.read_text())
    del text["meta_sha256"]
    meta.write_text(json.dumps(text))
    assert damage(ckpt(run, 6)) == "meta.json says step 7 but the directory is named step_00000006"
    assert main(smoke_argv(run, cache_dir, "max_steps=5", "save_every=100")) == 0
    assert f"resumed from {ckpt(run, 4)} at step 4" in capsys.readouterr().out


# ------------------------------------------------------------------ 5-6. pruning
def test_loading_beside_a_pruning_trainer_reports_no_false_damage(trained_run, tmp_path, monkeypatch, capsys):
    from lm.tokenizer import Tokenizer
    from lm.training.checkpointing import save_checkpoint

    run_dir = tmp_path / "run"
    engine, cfg, tokenizer = _engine(trained_run, run_dir)
    save_checkpoint(run_dir, engine, 10, cfg, tokenizer, {}, keep=1)
    real_load = Tokenizer.load.__func__
    pruned = []

    def trainer_saves_meanwhile(cls, directory):  # the trainer saves steps 11 and 12, pruning step 10, mid-read
        if not pruned:
            pruned.extend(save_checkpoint(run_dir, engine, step, cfg, tokenizer, {}, keep=1) for step in (11, 12))
        return real_load(cls, directory)

    monkeypatch.setattr(Tokenizer, "load", classmethod(trainer_saves_meanwhile))
    inference = load_for_inference(run_dir)
    assert pruned and inference.step == 12 and not ckpt(run_dir, 10).exists()
    assert "damaged" not in capsys.readouterr().err


def test_pruning_a_checkpoint_that_is_a_symbolic_link_unlinks_the_link_only(run, tmp_path, cache_dir):
    from lm.training.checkpointing import clean_debris

    archive = tmp_path / "archive"
    archive.mkdir()
    for step in (2, 4):
        shutil.move(ckpt(run, step), archive / ckpt(run, step).name)
        ckpt(run, step).symlink_to(archive / ckpt(run, step).name, target_is_directory=True)
    archived = snapshot(archive)
    (run / "checkpoints" / ".pruned-step_00000001").symlink_to(archive, target_is_directory=True)  # old debris
    assert main(smoke_argv(run, cache_dir, "max_steps=8", "save_every=1", "keep_checkpoints=1")) == 0
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000007", "step_00000008"]
    assert snapshot(archive) == archived  # the links went, never what they point to
    (run / "checkpoints" / ".pruned-step_00000002").symlink_to(archive, target_is_directory=True)
    clean_debris(run)
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000007", "step_00000008"]
    assert snapshot(archive) == archived


# ------------------------------------------------------------------ 7. one line, before anything is written
def _too_big_for_memory() -> list[str]:
    """data.seq_len=300000 and model.d_model=1048576 (the smoke config), larger where memory would hold them."""
    from lm.training import memory

    have = memory.device_memory(torch.device("cpu"))
    cfg = load_config([SMOKE_CONFIG], [])
    per_token = cfg.micro_batch_size * memory.activation_floats_per_token(cfg) * 4
    return [f"data.seq_len={max(300_000, 2 * have // per_token)}", "model.d_model=1048576"]


@pytest.mark.parametrize("override", ["seed=-1", "seed=99999999999999999999", *_too_big_for_memory()])
def test_impossible_settings_are_one_line_before_anything_is_written(override, tmp_path, cache_dir, capsys):
    assert main(smoke_argv(tmp_path / "run", cache_dir, override)) == 1
    err = one_line(capsys)
    assert override.split("=")[0] in err and not (tmp_path / "run").exists()


def test_generate_into_a_pipe_closed_early_stops_quietly(trained_run):
    done = subprocess.run(f"{sys.executable} tools/generate.py {trained_run} --stream --max-new-tokens 500 "
                          f"--num-samples 20 --device cpu | head -c 300", shell=True, cwd=REPO, capture_output=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert len(done.stdout) == 300 and "Traceback" not in done.stderr.decode()
    assert "Error" not in done.stderr.decode(), done.stderr.decode()


CTRL_C = r"""
import os, signal, sys
import lm.data.token_cache as token_cache
from lm.cli import prepare_data
token_cache.PARALLEL_MIN_BYTES = 0  # tokenize the small corpus with worker processes
submit = token_cache.ProcessPoolExecutor.submit
def submit_then_ctrl_c(self, *args, **kwargs):  # Ctrl-C reaches the whole group while the workers start
    future = submit(self, *args, **kwargs)
    os.killpg(0, signal.SIGINT)
    token_cache.ProcessPoolExecutor.submit = submit
    return future
token_cache.ProcessPoolExecutor.submit = submit_then_ctrl_c
sys.exit(prepare_data.main(sys.argv[1:]))
"""


def test_ctrl_c_while_workers_tokenize_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", CTRL_C, str(SMOKE_CONFIG), f"data.cache_dir={tmp_path}",
                           "data.num_proc=2", "data.progress=false"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 130 and "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: interrupted: what was complete is kept")


# ------------------------------------------------------------------ 8. nothing silent
def test_a_run_dir_holding_the_users_files_is_refused(tmp_path, cache_dir, capsys, monkeypatch):
    (tmp_path / "config.yaml").write_text("my own config\n")
    monkeypatch.chdir(tmp_path)
    assert main(smoke_argv(Path("."), cache_dir)) == 1
    assert "holds files that are not a training run's (config.yaml)" in one_line(capsys)
    assert os.listdir(tmp_path) == ["config.yaml"] and (tmp_path / "config.yaml").read_text() == "my own config\n"


def test_a_resume_that_changes_seed_or_batch_size_says_so_and_records_it(run, cache_dir, capsys):
    assert main(smoke_argv(run, cache_dir, "max_steps=7", "save_every=100", "seed=99", "batch_size=8")) == 0
    out = capsys.readouterr().out
    assert "note: resuming with seed=99 (the run so far: 1234), batch_size=8 (the run so far: 16)" in out
    record = read_steps(run / "steps.jsonl")[-1]
    assert record["step"] == 7 and record["resumed"] == {"from_step": 6, "changed": {"seed": [1234, 99],
                                                                                    "batch_size": [16, 8]}}


def test_requests_that_used_to_be_silent_are_one_line(trained_run, tmp_path, capsys):
    assert eval_ppl.main([str(trained_run), "--contexts", "1000000000", "--json", str(tmp_path / "r.json"),
                          "--no-progress"]) == 2
    assert "context 1,000,000,000 is longer than the valid split" in one_line(capsys)
    assert main([str(trained_run)]) == 1
    assert f"config file '{trained_run}' is a directory; give a YAML file, e.g." in one_line(capsys)
    assert generate.main([str(trained_run), "--prompt", "the", "--max-new-tokens", "0", "--device", "cpu"]) == 0
    stats = capsys.readouterr().err
    assert "nan" not in stats and "0 new tokens" in stats and "no decoding steps" in stats


def test_a_jsonl_line_holding_a_lone_surrogate_is_named(tmp_path, capsys):
    rows = [json.dumps({"text": f"document {i} " + "words " * 20}) for i in range(50)]
    rows[36] = json.dumps({"text": "broken \ud800 text"})
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    assert prepare_data.main([str(SMOKE_CONFIG), "data.source=files", f"data.files.train={tmp_path / 'train.jsonl'}",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer.vocab_size=300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'train.jsonl'}: line 37 holds the escape \\ud800 at column")
