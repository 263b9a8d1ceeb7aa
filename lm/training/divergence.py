"""Which training steps are bad, and when a run has diverged (the settings are ``divergence.*``).

A step is **bad** when its loss or gradients are non-finite (reasons ``"loss"``, ``"gradients"``) or its loss is a
**spike** (``"spike"``)::

    loss > spike_factor x median(losses of the last spike_window good steps)

The rule is armed from the first good step (while the run is younger than ``spike_window`` good steps, the median
is over the good steps there are: an early explosion is caught too, and the first losses of a run are the highest
of a healthy one, so the young rule errs towards leniency). Bad steps are skipped by the engine: weights and
optimizer state stay as they were, so they never enter the reference either.

A run **diverged** when ``max_bad_steps`` steps in a row were bad: the weights after the last applied update
failed on that many different batches. A run also fails when it ends with its typical loss (the median of the
last ``spike_window`` good steps) above ``final_loss_factor`` x its first step's loss: it went up without any
single step tripping the spike rule (or with the rule off).

:func:`replay` applies the same rule to a recorded loss curve (e.g. ``steps.jsonl``); since a skipped step leaves
the weights alone, replaying a run's own losses gives the verdicts the run took.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional, Sequence

from lm.config import DivergenceConfig

BAD_REASONS = ("loss", "gradients", "spike")
"""Why a step is bad: non-finite loss, non-finite gradients, loss spike."""
_NAMES = {"loss": "non-finite loss", "gradients": "non-finite gradients", "spike": "loss spike"}


def bad_step(loss: float, loss_limit: float = math.inf, gradients_finite: bool = True) -> str:
    """The verdict of one step (the one place it is decided): ``"loss"`` when its loss is not finite, else
    ``"gradients"`` when its gradients are not, else ``"spike"`` when its loss is above ``loss_limit``, else
    ``""`` (a good step)."""
    if not math.isfinite(loss):
        return "loss"
    if not gradients_finite:
        return "gradients"
    return "spike" if loss > loss_limit else ""


def spike_limit(good_losses: Sequence[float], spike_factor: float) -> float:
    """The loss above which the next step is a spike: ``spike_factor x median(good_losses)``; ``inf`` when the rule
    is off (``spike_factor == 0``) or there is no good step yet."""
    if not spike_factor or not good_losses:
        return math.inf
    return spike_factor * statistics.median(good_losses)


def replay(losses: Sequence[float], cfg: DivergenceConfig, nonfinite_gradients: Sequence[bool] = ()) -> list[str]:
    """The verdict of each step of a loss curve, as training takes it: ``""`` (good) or a reason of
    :data:`BAD_REASONS`. ``nonfinite_gradients[i]`` marks a finite-loss step whose gradients were not finite."""
    monitor = DivergenceMonitor(cfg)
    out = []
    for i, loss in enumerate(losses):
        limit = monitor.loss_limit()
        grads_bad = i < len(nonfinite_gradients) and nonfinite_gradients[i]
        bad = bad_step(loss, limit, gradients_finite=not grads_bad)
        monitor.record(i + 1, loss, bad, limit)
        out.append(bad)
    return out


class DivergenceMonitor:
    """The bad-step bookkeeping of one training process: the spike limit of the next step, the current streak of
    bad steps, and the verdicts that stop a run.

    Args:
        cfg: the ``divergence`` settings.
        state: :meth:`state_dict` of the checkpoint resumed from (``None`` for a new run). A resumed run starts a
            fresh streak: checkpoints are written only after good steps.
        start_step: the step the run starts from (its weights are the last applied update).
        first_loss_guess: the first step's loss when ``state`` predates this record (e.g. ``log(vocab_size)``, what
            a freshly initialised model scores).
    """

    def __init__(self, cfg: DivergenceConfig, state: Optional[dict] = None, start_step: int = 0,
                 first_loss_guess: Optional[float] = None):
        state = state or {}
        self.cfg = cfg
        self.good = deque((float(x) for x in state.get("recent_good_losses", [])), maxlen=cfg.spike_window)
        self.first_loss: Optional[float] = state.get("first_loss", first_loss_guess if start_step else None)
        self.bad_in_a_row = 0
        self.streak: list[tuple[int, str]] = []
        """(step, reason) of the current run of bad steps."""
        self.last_good_step = start_step
        """The step of the last update applied: the current weights are the ones it produced."""
        self.last_event = ""
        """One line about the last bad step, for the progress log."""
        self.last_detail = ""
        """What was wrong with the last bad step."""

    def loss_limit(self) -> float:
        """The spike limit of the next step (``inf`` while the rule is not armed or is off)."""
        return spike_limit(self.good, self.cfg.spike_factor)

    def record(self, step: int, loss: float, bad: str, limit: float) -> None:
        """Count step ``step`` (1-based) with its global mean loss, its verdict (``""`` or a reason of
        :data:`BAD_REASONS`) and the spike limit it ran under."""
        if not bad:
            self.good.append(float(loss))
            if self.first_loss is None:
                self.first_loss = float(loss)
            self.bad_in_a_row, self.streak, self.last_good_step = 0, [], step
            return
        self.bad_in_a_row += 1
        self.streak.append((step, bad))
        self.last_detail = {"loss": f"loss {loss}", "gradients": f"loss {loss:.4g}, gradients not finite",
                            "spike": f"loss {loss:.4g} > limit {limit:.4g} = {self.cfg.spike_factor:g} x median of "
                                     f"the last {len(self.good)} good steps"}.get(bad, bad)
        self.last_event = (f"step {step}: bad step ({_NAMES.get(bad, bad)}: {self.last_detail}), skipped "
                           f"({self.bad_in_a_row} in a row; the run stops at divergence.max_bad_steps="
                           f"{self.cfg.max_bad_steps})")

    @property
    def diverged(self) -> bool:
        """``max_bad_steps`` bad steps in a row: the run must stop."""
        return self.bad_in_a_row >= self.cfg.max_bad_steps

    def streak_summary(self) -> str:
        """E.g. ``steps 121-125 were bad (3 loss spikes, 2 non-finite losses)``."""
        if not self.streak:
            return "no bad steps"
        first, last = self.streak[0][0], self.streak[-1][0]
        counts = [f"{n} x {_NAMES[r]}" for r in BAD_REASONS if (n := sum(1 for _, x in self.streak if x == r))]
        steps = f"step {first} was" if first == last else f"steps {first}-{last} were"
        return f"{steps} bad ({', '.join(counts)}; the last: {self.last_detail})"

    def typical_loss(self) -> Optional[float]:
        """Median loss of the last ``spike_window`` good steps (None before the first good step)."""
        return statistics.median(self.good) if self.good else None

    def ended_far_above_start(self) -> bool:
        """The run's typical loss is above ``final_loss_factor`` x its first step's loss (never when that is 0)."""
        typical = self.typical_loss()
        return bool(self.cfg.final_loss_factor and typical is not None and self.first_loss is not None
                    and typical > self.cfg.final_loss_factor * self.first_loss)

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run takes the same decisions (JSON-serialisable)."""
        return {"recent_good_losses": list(self.good), "first_loss": self.first_loss}
