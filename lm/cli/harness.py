"""Evaluate a trained model with EleutherAI's lm-evaluation-harness (lm-eval; `pip install -e '.[eval]'`).

    python tools/harness.py RUN_DIR_OR_CHECKPOINT --tasks T1,T2 [--include-path DIR] [--limit N]
                            [--batch-size B] [--device D] [--output FILE] [--max-length N] [key=value ...]

Runs `lm_eval.simple_evaluate` with the checkpoint as model `lm-kernelized` (lm/eval/harness.py), prints lm-eval's
table and writes its results as JSON (default RUN_DIR/eval/harness_<checkpoint>.json). Task data come from the
Hugging Face hub when it is reachable; otherwise (or with HF_HUB_OFFLINE=1) only local task files and the local
`datasets` cache are used. Local tasks over WikiText-format files: `python tools/harness_tasks.py FILE DIR`,
then `--include-path DIR`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm.cli.common import (USER_ERRORS, CommandError, add_checkpoint_arguments, add_device_argument, command_parser,
                           eval_dir, report_error, reports_disk_errors, tell_deepspeed_the_accelerator)
from lm.device import set_cpu_threads, set_tf32
from lm.fileio import atomic_write_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    add_checkpoint_arguments(p, "model.attention.method=fft")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", action="append", default=[], help="directory of extra task YAMLs "
                   "(repeatable)")
    p.add_argument("--limit", type=float, help="documents per task (< 1: a fraction); for quick checks only")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences or windows per forward pass")
    add_device_argument(p)
    p.add_argument("--max-length", type=int, help="tokens per forward pass (default: the training context)")
    p.add_argument("--rolling-stride", type=int, help="new tokens per rolling-perplexity window (default: "
                   "--max-length)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled generations")
    p.add_argument("--log-samples", action="store_true", help="include every request and response in the JSON")
    p.add_argument("--output", type=Path, help="results JSON (default RUN_DIR/eval/harness_<checkpoint>.json)")
    return p.parse_intermixed_args(argv)


def parse_limit(limit: float | None) -> int | float | None:
    """``--limit``: a document count (>= 1) or a fraction of each task (< 1), as lm-eval takes it."""
    if limit is None:
        return None
    if limit <= 0:
        raise CommandError(f"--limit={limit:g} must be > 0 (a count, or a fraction below 1)")
    return int(limit) if limit >= 1 else limit


def default_output(checkpoint: Path) -> Path:
    """RUN_DIR/eval/harness_<checkpoint name>.json for RUN_DIR/checkpoints/<name>, else inside the checkpoint."""
    return eval_dir(checkpoint) / f"harness_{checkpoint.name}.json"


@reports_disk_errors(status=2)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tell_deepspeed_the_accelerator()
    try:
        from lm.eval import harness  # needs the optional lm-eval: imported only now, so the hint can be printed
    except ImportError as e:
        if type(e).__name__ != "LMEvalMissing":  # lm.eval.harness.LMEvalMissing: lm-eval is not installed
            raise
        return report_error(e, status=2)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        limit = parse_limit(args.limit)
        model = harness.HarnessLM(args.path, args.overrides, batch_size=args.batch_size, device=args.device,
                                  max_length=args.max_length, rolling_stride=args.rolling_stride, seed=args.seed)
        set_tf32(model.inference.cfg.compute.tf32, model.device)
        set_cpu_threads(model.inference.cfg.compute.cpu_threads)
        results = harness.run_tasks(model, tasks, args.include_path, limit=limit, num_fewshot=args.num_fewshot,
                                    log_samples=args.log_samples)
    except USER_ERRORS as e:  # HarnessError is one too
        return report_error(e, status=2)
    print(harness.format_tables(results))
    out = args.output or default_output(model.inference.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(harness.json_safe(results), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0
