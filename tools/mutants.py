#!/usr/bin/env python
"""A mutation round over the test suite: plant small realistic bugs (mutants) one at a time in a temporary copy of
the repository, run the tests that should catch each, and report which were killed (a test failed) and which
survived (every test passed: a bug the suite would let through).

    python tools/mutants.py                 # every mutant; exit status 1 if one survived
    python tools/mutants.py --list          # the mutants and their tests, nothing run
    python tools/mutants.py --check         # only check that every mutant applies to today's code (seconds)
    python tools/mutants.py --only requeue-on-sigterm prune-newer-checkpoints

The working tree is never modified: the tracked and untracked (not ignored) files are copied into a temporary
directory, each mutant is planted there, the tests run there (``PYTHONPATH`` pointing at the copy), and the file is
restored before the next one. The listed tests first run once on the unmutated copy (the baseline), since a mutant
"killed" by a test that fails anyway proves nothing.

A mutant is (name, file, the exact original snippet, its replacement, the tests to run). The original must occur
exactly once in the file: when the code changes, ``--check`` (and the test suite's check of this list) says which
mutant to update. Add a mutant beside every new code path worth protecting, and a test that kills it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Mutant(NamedTuple):
    name: str
    file: str
    """Path relative to the repository root."""
    original: str
    """The exact snippet replaced (must occur once in ``file``)."""
    replacement: str
    tests: tuple[str, ...]
    """pytest node ids (or files) that must fail with the mutant planted."""
    why: str
    """The bug, as a user would meet it."""


PRE = "lm/training/preemption.py"
LOOP = "lm/training/loop.py"
CKPT = "lm/training/checkpointing.py"
DOCS = "lm/data/documents.py"
DOC_CACHE = "lm/data/document_cache.py"
PACKING = "lm/data/packing.py"
MODELING = "lm/hf/modeling.py"
CONFIGURATION = "lm/hf/configuration.py"
EXPORT = "lm/hf/export.py"
HF_TOKENIZER = "lm/hf/tokenizer.py"
RECURRENT = "lm/ops/recurrent.py"

T_PRE = "tests/test_preemption.py::"
T_CKPT = "tests/test_checkpoint.py::"
T_DOCS = "tests/test_data_documents.py::"
T_HF = "tests/test_hf.py::"
HF_EXPORT = T_HF + "test_the_export_writes_the_runs_ids_settings_tokenizer_and_weights"
HF_GENERATE = T_HF + "test_generate_with_our_cache_equals_generate_without_a_cache"

MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ preemption
    Mutant("requeue-on-sigterm", PRE, 'NEVER_REQUEUE = ("SIGTERM", "SIGINT")', 'NEVER_REQUEUE = ("SIGINT",)',
           (T_PRE + "test_requeue_follows_time_limits_and_sigusr1_never_sigterm_or_sigint",
            T_PRE + "test_a_signal_mid_run_requeues_only_for_sigusr1"),
           "scancel (SIGTERM) requeues the job with preemption.requeue=true: it comes back forever"),
    Mutant("second-signal-raises-while-unwinding", PRE,
           "self._armed = False  # once: the unwinding itself is never interrupted", "pass",
           (T_PRE + "test_a_second_signal_while_an_interrupted_block_unwinds_is_only_recorded",),
           "a second Ctrl-C during data preparation or validation raises inside the cleanup"),
    Mutant("time-limit-ignores-the-next-step", PRE,
           "now - self.start + self.step_seconds >= 60 * c.time_limit_minutes",
           "now - self.start >= 60 * c.time_limit_minutes",
           (T_PRE + "test_time_limit_stops_when_the_next_step_would_not_fit",),
           "time_limit_minutes stops only once the limit has passed: the job is killed mid-step, unsaved"),
    Mutant("save-every-minutes-in-seconds", PRE, "now - self.last_save >= 60 * c.save_every_minutes",
           "now - self.last_save >= c.save_every_minutes",
           (T_PRE + "test_save_every_minutes_counts_minutes_from_the_last_save",),
           "save_every_minutes=30 saves every 30 seconds"),
    Mutant("clock-stops-before-the-first-step", PRE, "self._flags(self.clock(), limit=first_step_done)",
           "self._flags(self.clock(), limit=True)",
           (T_PRE + "test_time_limit_stops_when_the_next_step_would_not_fit",
            T_PRE + "test_time_limit_shorter_than_a_step_stops_after_one_saved_step_and_clock_saves"),
           "a command started close to its time limit never trains a step"),
    Mutant("clock-saves-never-restart-the-count", LOOP, "                stop.saved()\n", "",
           (T_PRE + "test_training_by_a_controlled_clock_saves_every_few_minutes_counted_from_the_last_save",),
           "after the first save by the clock, every step saves"),
    # ------------------------------------------------------------------ checkpointing
    Mutant("prune-newer-checkpoints", CKPT, "if checkpoint_step(c) < step]", "if checkpoint_step(c) != step]",
           (T_CKPT + "test_pruning_after_resuming_from_an_older_checkpoint_keeps_the_newer_ones",),
           "after resuming from an older checkpoint the next save deletes the newer ones"),
    Mutant("prune-one-too-few", CKPT, "for stale in older[:-max(keep - 1, 1)]:", "for stale in older[:-max(keep, 1)]:",
           (T_CKPT + "test_crash_while_saving_keeps_the_previous_checkpoint",),
           "keep_checkpoints=N keeps N + 1"),
    # ------------------------------------------------------------------ the documents pipeline
    Mutant("txt-documents-skip-the-carve-out", DOCS,
           "if self.carved and not self._takes(digest_position(shard.fingerprint)):",
           "if False and not self._takes(digest_position(shard.fingerprint)):",
           (T_DOCS + "test_a_txt_corpus_without_valid_and_test_files_puts_every_document_in_exactly_one_split",),
           "a .txt corpus without valid/test files: every document in train, valid and test"),
    Mutant("token-part-hash-not-compared", DOC_CACHE,
           "return path.stat().st_size == num_tokens * dtype.itemsize and file_sha256(path, memo) == sha256",
           "return path.stat().st_size == num_tokens * dtype.itemsize",
           (T_DOCS + "test_a_token_file_of_the_right_size_with_changed_bytes_is_rebuilt",),
           "a token file of the right size with changed bytes is trained on"),
    Mutant("parallel-tokenization-out-of-order", DOC_CACHE,
           "            while pending:\n                g0, item = pending.popleft()",
           "            while pending:\n                g0, item = pending.pop()",
           (T_DOCS + "test_parallel_tokenization_of_documents_gives_the_documents_in_order",),
           "documents tokenized by worker processes land out of order"),
    Mutant("train-overlaps-the-carved-valid-split", DOCS,
           'ranges["train"] = (fraction if "valid" in missing else 0.0,', 'ranges["train"] = (0.0,',
           (T_DOCS + "test_carve_out_is_deterministic_disjoint_and_recorded",),
           "validation documents are also trained on"),
    Mutant("no-eos-after-documents", PACKING, "ids[positions[seen[ends] - 1]] = tok.eos_id",
           "ids[positions[seen[ends] - 1]] = tok.newline_id",
           (T_DOCS + "test_every_format_gives_its_documents_each_followed_by_eos",),
           "documents run into each other with no EOS between them"),
    # ------------------------------------------------------------------ the Hugging Face model and export
    Mutant("labels-loss-off-by-one", MODELING, "logits[:, -shifted.shape[1] - 1:-1]", "logits[:, -shifted.shape[1]:]",
           (T_HF + "test_labels_loss_is_the_mean_cross_entropy_of_each_position_with_the_next_token",),
           "model(ids, labels=ids).loss scores each position against the wrong token"),
    Mutant("beam-search-cache-not-reordered", MODELING, "        self.state.select(beam_idx.to(torch.long))",
           "        return None",
           (T_HF + "test_beam_search_with_our_cache_equals_beam_search_without_a_cache",),
           "beam search continues each beam from another beam's state"),
    Mutant("padding-mask-of-the-wrong-tokens", MODELING, "key_mask = attention_mask[:, -n:].to(torch.bool)",
           "key_mask = attention_mask[:, :n].to(torch.bool)",
           (HF_GENERATE,),
           "a left-padded batch masks the wrong tokens once decoding starts"),
    Mutant("position-ids-ignored", MODELING, "positions=position_ids,", "positions=None,",
           (HF_GENERATE,),
           "left-padded rows of absolute-position models are shifted by their padding"),
    Mutant("export-pad-id-is-bos", EXPORT, "pad_token_id=tok.eos_id)", "pad_token_id=tok.bos_id)",
           (HF_EXPORT,),
           "config.json and generation_config.json name the wrong pad token"),
    Mutant("export-eos-token-is-unk", HF_TOKENIZER, "eos_token=specials[2], pad_token",
           "eos_token=specials[0], pad_token",
           (HF_EXPORT,),
           "the exported tokenizer's eos_token_id is <unk>"),
    Mutant("export-tokenizer-without-bos", HF_TOKENIZER, 'single=f"{bos} $A"', 'single="$A"',
           (HF_EXPORT,),
           "the exported tokenizer puts no BOS first (the export refuses it)"),
    Mutant("export-n-positions-default", CONFIGURATION, "n_positions=train_context,", "n_positions=512,",
           (HF_EXPORT, T_HF + "test_export_directory_holds_what_transformers_and_a_reader_need"),
           "config.json states a training context the model was not trained at"),
    # ------------------------------------------------------------------ the recurrent op
    Mutant("recurrent-far-sum-one-key-early", RECURRENT, "n_far = max(0, n - window)", "n_far = max(0, n - window + 1)",
           ("tests/test_ops_recurrent.py",),
           "the state after a prompt weighs its newest key as a far one"),
    Mutant("recurrent-ring-key-joins-far-late", RECURRENT, "if t >= R:  # the key in this slot",
           "if t > R:  # the key in this slot",
           ("tests/test_ops_recurrent.py",),
           "decoding drops the key that leaves the ring from the far sums"),
)


def repository_files(root: Path) -> list[str]:
    """Tracked and untracked, not ignored, files of the repository at ``root`` (what a clean clone plus today's
    uncommitted work holds)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: tools/mutants.py copies a git checkout and could not list {root}'s files ({e})")
    return [name for name in out.decode().split("\0") if name]


def copy_repository(root: Path, target: Path) -> None:
    for name in repository_files(root):
        source = root / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def check(mutants, root: Path = REPO) -> list[str]:
    """Problems that stop ``mutants`` from applying to the code at ``root`` (empty: every original snippet occurs
    exactly once in its file and differs from its replacement; names are unique)."""
    problems = []
    names = [m.name for m in mutants]
    problems += [f"{n}: the name is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            problems.append(f"{m.name}: the original snippet occurs {count} times in {m.file} (expected once)")
        if m.original == m.replacement:
            problems.append(f"{m.name}: the replacement equals the original")
        if not m.tests:
            problems.append(f"{m.name}: no tests listed")
    return problems


def run_tests(copy: Path, tests, timeout: float) -> tuple[int | None, float, str]:
    """pytest over ``tests`` in the copy: (exit status or None on a timeout, seconds, the output's tail)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # the copy lives elsewhere: give the tests the real WikiText sample the checkout would find next to it
    env.setdefault("LM_WIKITEXT_SAMPLE", str(REPO.parent / "shared" / "data" / "wikitext-103-sample"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, time.monotonic() - start, output[-2000:]
    return done.returncode, time.monotonic() - start, (done.stdout + done.stderr)[-2000:]


def verdict(status: int | None) -> str:
    """pytest's exit status -> the mutant's fate: 1 (a test failed) kills it, 0 lets it survive; anything else (no
    test collected, a usage error, a timeout) is an error of the round, not a kill."""
    return {0: "survived", 1: "killed", None: "timeout"}.get(status, f"error ({status})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests; run nothing")
    parser.add_argument("--check", action="store_true", help="only check that every mutant applies to the code")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on unmutated code")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    args = parser.parse_args(argv)

    mutants = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in mutants})
        if unknown:
            parser.error(f"unknown mutant(s) {unknown}; --list shows them")
        mutants = [m for m in mutants if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}  ({m.file}): {m.why}\n    tests: {' '.join(m.tests)}")
        return 0
    problems = check(mutants)
    if problems:
        print("\n".join(["mutants that do not apply to the code (update them in tools/mutants.py):", *problems]))
        return 2
    if args.check:
        print(f"{len(mutants)} mutants apply to the code")
        return 0

    with tempfile.TemporaryDirectory(prefix="lm-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(REPO, copy)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            status, seconds, tail = run_tests(copy, tests, args.timeout * 3)
            print(f"baseline: {len(tests)} test selections on the unmutated copy: "
                  f"{'passed' if status == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
            if status != 0:
                print(tail)
                return 2
        rows = []
        for m in mutants:
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.original, m.replacement, 1))
            try:
                status, seconds, tail = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            rows.append((m, verdict(status), seconds))
            print(f"{verdict(status):>9}  {seconds:6.1f} s  {m.name}", flush=True)
            if status not in (0, 1):
                print(tail, flush=True)

    width = max(len(m.name) for m, _, _ in rows)
    print(f"\n| {'mutant':<{width}} | file | result | seconds |\n|{'-' * (width + 2)}|---|---|---|")
    for m, result, seconds in rows:
        print(f"| {m.name:<{width}} | {m.file} | {result} | {seconds:.0f} |")
    killed = sum(result == "killed" for _, result, _ in rows)
    survived = [m.name for m, result, _ in rows if result == "survived"]
    print(f"\nkilled {killed} of {len(rows)} mutants" + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
