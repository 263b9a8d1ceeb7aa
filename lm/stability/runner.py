"""Running a study's runs: each in its own process through the normal trainer (:func:`lm.training.loop.train`, the loop
``tools/train.py`` runs: same engine, same checks), ``jobs`` at a time, each with its thread count set explicitly.

A run is one child process (:func:`child_main`): it trains, catches :class:`lm.training.loop.TrainingStopped` (a run that
diverges is a result, not a failure), scores the splits its grid asks for when it did not stop, and writes
``RUN/result.json`` last. A child that crashes (a bug, a kill, memory) takes only its own run down; the study goes
on and lists it as failed. Re-running a study with the same ``--out`` reuses every run that has a
``result.json`` and resumes the others from their checkpoints (the trainer's resume: the same numbers as an
uninterrupted run), never overwriting a run of other settings (``RUN/spec.json`` must match).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional, Sequence

from lm.config import ConfigError
from lm.errors import UserError
from lm.fileio import atomic_write_text
from lm.stability.grid import RunSpec

SPEC = "spec.json"
RESULT = "result.json"
LOG = "log.txt"
_CHILD = "import sys; from lm.stability.runner import child_main; sys.exit(child_main(sys.argv[1:]))"


def thread_env(threads: int, base: Optional[dict] = None) -> dict:
    """The environment of a child with ``threads`` threads: OpenMP and MKL pools sized explicitly (torch's
    intra-op pool follows OMP_NUM_THREADS; the child also calls ``torch.set_num_threads``)."""
    env = dict(os.environ if base is None else base)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# ------------------------------------------------------------------------------------------------- the child
def evaluate_run(run_dir: Path, evaluate: Sequence, device: str) -> list[dict]:
    """Score the newest checkpoint of ``run_dir`` as ``evaluate`` asks (``[split, contexts or None]`` items;
    None = the training context): :class:`lm.eval.perplexity.SplitPerplexity` fields per (split, context)."""
    import dataclasses

    from lm.inference.loading import load_for_inference
    from lm.eval.perplexity import evaluate_split, tokenize_split

    inference = load_for_inference(run_dir, device=device)
    cfg, model, tokenizer = inference.cfg, inference.model, inference.tokenizer
    out, splits = [], {}
    for split_name, contexts in evaluate:
        if split_name not in splits:
            splits[split_name] = tokenize_split(cfg.data, tokenizer, split_name)
        rows = evaluate_split(model, splits[split_name], contexts or [cfg.data.seq_len], None, cfg.micro_batch_size,
                              tokenizer.bos_id, device)
        out += [{**dataclasses.asdict(row), "step": inference.step} for row in rows]
    return out


def child_main(argv: Sequence[str]) -> int:
    """One run: ``child_main([SPEC_JSON])``. Trains with the spec's overrides, evaluates, writes ``result.json``
    next to the spec. Exit status 0 when a result was written (diverged or not), 2 for a user error (also
    recorded in ``result.json``); anything else propagates as a traceback (status 1)."""
    import torch

    from lm.config import load_config
    from lm.device import resolve_device
    from lm.stability.verdict import Outcome
    from lm.training.loop import TrainingStopped, train

    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(int(spec["threads"]))
    run_dir = spec_path.parent
    t0 = time.perf_counter()
    evaluations: list[dict] = []
    try:
        cfg = load_config([], [*spec["overrides"], f"compute.cpu_threads={spec['threads']}"])
        if Path(cfg.run_dir).resolve() != run_dir.resolve():
            raise ConfigError(f"spec {spec_path} names run_dir={cfg.run_dir}, not its own folder")
        try:
            outcome = Outcome("completed", step=train(cfg))
        except TrainingStopped as e:
            outcome = Outcome("stopped", e.kind, e.step, str(e))
            print(f"stopped: {e}", flush=True)
        train_s = time.perf_counter() - t0
        if outcome.status == "completed":
            evaluations = evaluate_run(run_dir, spec["evaluate"], resolve_device(cfg.device))
    except UserError as e:
        atomic_write_text(run_dir / RESULT, json.dumps({"spec": spec, "error": str(e)}, indent=1) + "\n")
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    result = {"spec": spec, "outcome": outcome.as_dict(), "evaluations": evaluations,
              "seconds": {"train": train_s, "total": time.perf_counter() - t0}}
    atomic_write_text(run_dir / RESULT, json.dumps(result, indent=1) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------ the parent
def read_result(run_dir: Path) -> Optional[dict]:
    """The run's ``result.json`` (None when the run has not finished, or its result is unreadable)."""
    try:
        return json.loads((run_dir / RESULT).read_text())
    except (OSError, ValueError):
        return None


def _claim(spec: RunSpec, run_dir: Path, threads: int) -> dict:
    """Write (or check) ``RUN/spec.json``; a ConfigError when the folder holds a run of other settings."""
    mine = {**spec.as_dict(), "threads": threads}
    path = run_dir / SPEC
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = None
        comparable = {k: v for k, v in (stored or {}).items() if k != "threads"}
        if comparable != {k: v for k, v in mine.items() if k != "threads"}:
            raise ConfigError(f"{run_dir} holds a run of other settings (its {SPEC} differs from this study's); "
                              f"choose another --out (nothing was overwritten)")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(mine, indent=1) + "\n")
    return mine


def launch(spec: RunSpec, run_dir: Path, threads: int) -> tuple[int, float]:
    """Run one child to its end; its output goes to ``RUN/log.txt`` (appended: a resumed run keeps its history).
    Returns (exit status, seconds)."""
    start = time.perf_counter()
    with open(run_dir / LOG, "ab") as log:
        status = subprocess.run([sys.executable, "-c", _CHILD, str(run_dir / SPEC)], stdout=log,
                                stderr=subprocess.STDOUT, env=thread_env(threads), check=False).returncode
    return status, time.perf_counter() - start


def run_all(specs: Sequence[RunSpec], runs_dir: Path, jobs: int, threads: int,
            report: Callable[[str], None] = print, launched: Optional[list] = None) -> dict[str, dict]:
    """Run every spec not yet finished, ``jobs`` children at a time with ``threads`` threads each; returns
    ``{run name: result.json}`` of every spec that has one (a crashed run has none: see its ``log.txt``). The names
    of the runs started are appended to ``launched`` when given."""
    if jobs < 1 or threads < 1:
        raise ConfigError(f"--jobs={jobs} and --threads={threads} must be >= 1")
    for spec in specs:
        _claim(spec, runs_dir / spec.name, threads)
    todo = [s for s in specs if read_result(runs_dir / s.name) is None]
    if launched is not None:
        launched += [s.name for s in todo]
    if len(todo) < len(specs):
        report(f"{len(specs) - len(todo)} of {len(specs)} runs already have a result (kept)")
    done = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(launch, s, runs_dir / s.name, threads): s for s in todo}
        for future in as_completed(futures):
            spec = futures[future]
            status, seconds = future.result()
            done += 1
            result = read_result(runs_dir / spec.name)
            report(f"[{done}/{len(todo)}] {spec.name}: {describe(result, status)} ({seconds:.0f} s)")
    return {s.name: r for s in specs if (r := read_result(runs_dir / s.name)) is not None}


def describe(result: Optional[dict], status: int) -> str:
    """One phrase about a finished child."""
    if result is None:
        return f"FAILED (exit status {status}, no result.json; see its {LOG})"
    if "error" in result:
        return f"error: {result['error']}"
    outcome = result["outcome"]
    if outcome["status"] == "stopped":
        return f"stopped at step {outcome['step']} ({outcome['kind']})"
    ppl = [e["token_perplexity"] for e in result["evaluations"]]
    return f"completed {outcome['step']} steps" + (f", valid ppl {ppl[0]:.2f}" if ppl else "")
