"""Per-step training records: ``RUN/steps.jsonl``, one JSON object per optimizer step, written by rank 0.

Fields of a record (strict JSON: a non-finite number is written ``null``):

    step          1-based optimizer step (the step TensorBoard uses)
    loss          mean token NLL of the step's global batch, nats (null when non-finite)
    grad_norm     global gradient 2-norm before clipping (null when non-finite, or unknown: DeepSpeed's ZeRO /
                  bf16 / fp16 optimizers skip a spike by making its gradients non-finite)
    lr            learning rate of the step
    skipped       the weights were left unchanged (a bad step, or an fp16 loss-scale overflow)
    bad           "" for a good step, else "loss" / "gradients" (non-finite) or "spike" (lm.training.divergence)
    loss_limit    the spike limit the step ran under (null while the rule is not armed or is off)
    bad_in_a_row  length of the streak of bad steps this step ends (0 after a good step)
    resumed       only in the first record after a resume that changed the seed or the batch size:
                  ``{"from_step": s, "changed": {"seed": [the run's so far, now]}}``

Crash safety: each record is one ``write`` of a whole line, flushed at once and fsynced before every checkpoint,
so a crash loses at most the line being written, and never a line of a step a checkpoint holds. A torn last line
is skipped by :func:`read_steps`. A run that starts from step ``s`` (resumed, or 0 for a new run) first cuts the file
back to the records of steps ``<= s``, so the file always describes the steps of the weights it ended with.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from lm.errors import disk_errors

FILE = "steps.jsonl"


def _number(x) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def truncate_after(path: str | Path, step: int) -> None:
    """Keep only the complete records of steps ``<= step`` at the start of ``path`` (if it exists)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                ok = line.endswith(b"\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                break
            keep += len(line)
    os.truncate(path, keep)


def read_steps(path: str | Path) -> list[dict]:
    """The records of a ``steps.jsonl``, in order (a torn last line left by a crash is skipped)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            out.append(json.loads(line))
    return out


class StepLog:
    """Appends one record per step to ``run_dir/steps.jsonl``; does nothing where ``enabled`` is false (ranks
    other than 0). The file is first cut back to the steps ``<= start_step``."""

    def __init__(self, run_dir: str | Path, start_step: int, enabled: bool = True):
        self.file = None
        self.path = Path(run_dir) / FILE
        self.extra: dict = {}
        if enabled:
            truncate_after(self.path, start_step)
            self.file = open(self.path, "ab", buffering=0)

    def note_next(self, **fields) -> None:
        """Add ``fields`` to the next record written (e.g. what a resume changed)."""
        self.extra.update(fields)

    def write(self, step: int, stats, loss_limit: float, bad_in_a_row: int) -> None:
        """Record step ``step``; ``stats`` is the engine's :class:`lm.training.engine.StepStats`."""
        if self.file is None:
            return
        record = {"step": step, "loss": _number(stats.loss), "grad_norm": _number(stats.grad_norm),
                  "lr": _number(stats.lr), "skipped": bool(stats.skipped), "bad": stats.bad,
                  "loss_limit": _number(loss_limit), "bad_in_a_row": bad_in_a_row, **self.extra}
        self.extra = {}
        with disk_errors(self.path, "free space there, then run the same command again: training resumes from its "
                                    "newest checkpoint"):
            self.file.write((json.dumps(record) + "\n").encode())

    def sync(self) -> None:
        """Flush the records to disk (before a checkpoint is written)."""
        if self.file is not None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        """Close the file; a disk that refuses the last bytes is ignored here (write and sync report it)."""
        if self.file is not None:
            f, self.file = self.file, None
            try:
                f.close()
            except OSError:
                pass
