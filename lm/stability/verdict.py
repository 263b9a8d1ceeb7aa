"""What one run of a study says about stability: the fields of a run in ``summary.json``, from the run's
``steps.jsonl`` records (:mod:`lm.training.steplog`) and how its trainer ended.

The training loop skips bad steps (:mod:`lm.training.divergence`: a non-finite loss or gradients, or a loss spike above
``spike_factor`` x the median of the last good losses) and stops a run after ``max_bad_steps`` of them in a row.
Skipping is what lets a run survive a bad step, so the study must not take survival for stability. A run
**diverged** when any of these holds:

1. the trainer stopped it (:class:`lm.training.loop.TrainingStopped`): ``max_bad_steps`` bad steps in a row (non-finite or
   spikes: the weights of the last update failed on that many batches), the last step inside a streak of bad
   steps, or a final loss above ``final_loss_factor`` x its first loss;
2. **any** step had a non-finite loss or non-finite gradients, even if the run then went on: without the skip, the
   NaN would have entered the weights (clipping a NaN gradient norm gives NaN updates) and the run would have been
   lost, so a run that survived only because such steps were skipped counts as diverged.

A loss spike that was skipped and followed by good steps is **not** a divergence: the spike rule caught a bad
batch (or a bad update's first symptom) and the run recovered. Such spikes are counted (``loss_spikes``) and the
summary reports how many runs recovered from spikes, so they stay visible.

The other fields: ``first_bad_step`` (the first step with any bad verdict, None without one), ``steps_completed``
(the last step the trainer ran, skipped steps included: where a stopped run stopped), ``max_grad_norm`` (the
largest finite gradient norm before clipping, None if no step had one), ``final_valid_ppl`` (token perplexity of
the valid split at the training context, None when the run diverged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

NONFINITE = ("loss", "gradients")
"""``bad`` reasons of :mod:`lm.training.steplog` records that mean a non-finite step."""

RUN_FIELDS = ("seed", "diverged", "first_bad_step", "steps_completed", "final_valid_ppl", "max_grad_norm",
              "loss_spikes")
"""The fields of a run in ``summary.json``, in order."""


@dataclass(frozen=True)
class Outcome:
    """How a run's trainer ended: ``status`` "completed" (it returned) or "stopped" (it raised
    :class:`lm.training.loop.TrainingStopped`: ``kind`` is its kind, ``step`` its last step, ``message`` its message)."""

    status: str
    kind: str = ""
    step: int = 0
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in ("completed", "stopped"):
            raise ValueError(f"Outcome.status={self.status!r} must be 'completed' or 'stopped'")

    def as_dict(self) -> dict:
        return {"status": self.status, "kind": self.kind, "step": self.step, "message": self.message}


def nonfinite_steps(records: Sequence[dict]) -> list[int]:
    """Steps whose loss or gradients were not finite."""
    return [r["step"] for r in records if r["bad"] in NONFINITE]


def final_streak(records: Sequence[dict]) -> list[dict]:
    """The records of the streak of bad steps the log ends with ([] if it ends with a good step)."""
    n = records[-1]["bad_in_a_row"] if records else 0
    return list(records[len(records) - n:]) if n else []


def streak_reasons(records: Sequence[dict]) -> str:
    """E.g. ``"3 loss spikes, 2 non-finite"``: what the bad steps among ``records`` were."""
    spikes = sum(1 for r in records if r["bad"] == "spike")
    nonfinite = sum(1 for r in records if r["bad"] in NONFINITE)
    return ", ".join(x for x in (f"{spikes} loss spike{'s' * (spikes != 1)}" if spikes else "",
                                 f"{nonfinite} non-finite" if nonfinite else "") if x) or "none bad"


def stop_cause(records: Sequence[dict], outcome: Outcome) -> str:
    """Why the trainer stopped a run, in a word: "spikes" (its final streak was loss spikes only), "non-finite"
    (only non-finite steps), "mixed", "final loss" (it ended far above its first loss), or "" (not stopped)."""
    if outcome.status != "stopped":
        return ""
    streak = final_streak(records)
    if not streak:
        return "final loss"
    kinds = {"spikes" if r["bad"] == "spike" else "non-finite" for r in streak}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def divergence_reasons(records: Sequence[dict], outcome: Outcome, max_bad_steps: int) -> list[str]:
    """Why the run counts as diverged, one phrase per reason (empty: it did not). ``max_bad_steps`` is the run's
    ``divergence.max_bad_steps``: a record whose streak reaches it means the trainer stopped there, even when the
    outcome was lost."""
    reasons = []
    if outcome.status == "stopped":
        streak = final_streak(records)
        what = f": the last {len(streak)} steps were bad ({streak_reasons(streak)})" if streak else ""
        reasons.append(f"stopped by the trainer ({outcome.kind}) at step {outcome.step}{what}")
    elif any(r["bad_in_a_row"] >= max_bad_steps for r in records):
        reasons.append(f"{max_bad_steps} bad steps in a row")
    bad = nonfinite_steps(records)
    if bad:
        reasons.append(f"{len(bad)} non-finite step(s), the first at step {bad[0]}")
    return reasons


def summarize_run(seed: int, records: Sequence[dict], outcome: Outcome, max_bad_steps: int,
                  valid_ppl: Optional[float]) -> dict:
    """The ``summary.json`` record of one run (fields :data:`RUN_FIELDS`); ``valid_ppl`` is the measured final
    valid perplexity (None when it was not measured), reported only when the run did not diverge."""
    diverged = bool(divergence_reasons(records, outcome, max_bad_steps))
    grads = [r["grad_norm"] for r in records if r["grad_norm"] is not None and math.isfinite(r["grad_norm"])]
    first_bad = next((r["step"] for r in records if r["bad"]), None)
    ppl = None if diverged or valid_ppl is None or not math.isfinite(valid_ppl) else float(valid_ppl)
    return {"seed": seed, "diverged": diverged, "first_bad_step": first_bad,
            "steps_completed": records[-1]["step"] if records else 0, "final_valid_ppl": ppl,
            "max_grad_norm": max(grads) if grads else None,
            "loss_spikes": sum(1 for r in records if r["bad"] == "spike")}
