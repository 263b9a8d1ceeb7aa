"""Learning-rate schedule: a pure function of the optimizer step, so resume and skipped steps never shift it."""
from __future__ import annotations

import math

from lm.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a ``max_steps`` run.

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps, then either constant
    or a half-cosine from ``lr`` down to ``lr * min_lr_ratio`` at the last step.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
