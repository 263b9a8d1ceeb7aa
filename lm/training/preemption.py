"""Stopping training early and cleanly when asked: signals (a scheduler's preemption or warning, Ctrl-C, a user's
``kill``) and a wall-clock limit (``time_limit_minutes``); and saving by the clock (``save_every_minutes``).

A stop never costs more than the step in flight: every rank finishes that step, the step is saved (unless a
checkpoint of it exists), the step log and TensorBoard are flushed, rank 0 prints one line

    stopped by SIGTERM at step 120: checkpoint runs/x/checkpoints/step_00000120; re-run the same command to resume

and :class:`TrainingPreempted` ends the command with exit status 75 (``lm.cli.train.EXIT_PREEMPTED``).

- :class:`StopSignals` installs handlers for ``preemption.signals`` while training runs and restores the previous
  ones after. A handler only records the signal, except inside :meth:`StopSignals.interruptible` blocks, whose
  work may be dropped at any point (data preparation: caches are written atomically; validation: it only reads):
  there it raises :class:`Interrupted` to end the block at once. It never raises inside a step or a save: a
  second signal while a checkpoint is written is recorded and the save completes (SIGKILL still ends it, and
  saves are atomic, so the previous checkpoint stays intact).
- :class:`StopControl` turns what this rank knows (its signals, its clock) into flags for the engine's one
  reduction per step (:attr:`lm.training.engine.StepStats.flags`), so that all ranks agree on stopping with no
  extra collective and no extra host sync; where no step runs (before the first one, after a validation or a
  save) it agrees through one small all-reduce of its own (:meth:`StopControl.agree`). Any rank that received a
  signal, or whose clock says so, is enough.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from lm.config import TrainConfig
from lm.training.distributed import all_reduce

NEVER_REQUEUE = ("SIGTERM", "SIGINT")
"""Signals that mean "stop" rather than "the job's time is up": scancel sends SIGTERM, Ctrl-C SIGINT."""


class TrainingPreempted(RuntimeError):
    """Training stopped early on request, after saving (a signal, or ``time_limit_minutes``); re-running the same
    command resumes exactly. ``reason``: the signal's name or ``time_limit_minutes=N``; ``step``: the last step
    trained (the resumed one when none was); ``checkpoint``: where a re-run resumes from (None: nothing saved)."""

    def __init__(self, message: str, reason: str, step: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


class Interrupted(BaseException):
    """Raised by a stop signal's handler inside :meth:`StopSignals.interruptible` (a BaseException, so that no
    ``except Exception`` in the interrupted work swallows it)."""


class StopSignals:
    """Handlers for the signals named ``names`` (e.g. ``["SIGTERM", "SIGINT"]``) from ``with`` to its end; the
    previous handlers come back after, also on errors. ``received``: the signals that came, in order.

    Only the main thread can install handlers: elsewhere this does nothing (signals act as without it). A child
    forked while the handlers are installed gets the previous behaviour back when a signal reaches it."""

    def __init__(self, names: Sequence[str]):
        self.signals = [signal.Signals[name] for name in names]
        self.received: list[signal.Signals] = []
        self._previous: dict[signal.Signals, object] = {}
        self._armed = False
        self._pid = os.getpid()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked child: behave as it would have without these handlers
            previous = self._previous.get(signal.Signals(signum))
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received.append(signal.Signals(signum))
        if self._armed:
            self._armed = False  # once: the unwinding itself is never interrupted
            raise Interrupted(signal.Signals(signum).name)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block whose work may be dropped anywhere: a stop signal during it (or already received) raises
        :class:`Interrupted`."""
        if self.received:
            raise Interrupted(self.received[0].name)
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


@dataclass(frozen=True)
class Decision:
    """What all ranks agreed after a step (or outside one)."""
    stop: str = ""
    """Why to stop now: a signal's name or ``time_limit_minutes=N``; "" to go on."""
    save: bool = False
    """``save_every_minutes`` says: save this step."""


class StopControl:
    """This rank's side of stopping: its signals and its clock, as flags for a step's reduction
    (:meth:`flags`), and the decision all ranks agree on (:meth:`decide`, :meth:`agree`).

    Clocks: ``time_limit_minutes`` counts from this object's creation (the start of the command);
    ``save_every_minutes`` from the last :meth:`saved` (or the creation). The limit is near when less than the
    last step's duration (from one step's reduction to the next: validations and saves included) is left.
    ``clock``: seconds from any fixed origin (default ``time.monotonic``; tests give a clock they control)."""

    def __init__(self, cfg: TrainConfig, signals: StopSignals, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.signals, self.clock = cfg, signals, clock
        self.start = self.last_save = self.last_flags = clock()
        self.step_seconds = 0.0

    def loop_starts(self) -> None:
        """The training loop begins: step durations count from now."""
        self.last_flags = self.clock()

    def flags(self) -> tuple[bool, ...]:
        """This rank's flags for the step's reduction, read when it runs: (save due by the clock, time limit
        near, then one per ``preemption.signals``: received here)."""
        now = self.clock()
        self.step_seconds, self.last_flags = now - self.last_flags, now
        return self._flags(now, limit=True)

    def _flags(self, now: float, limit: bool) -> tuple[bool, ...]:
        c = self.cfg
        save_due = c.save_every_minutes > 0 and now - self.last_save >= 60 * c.save_every_minutes
        near = (limit and c.time_limit_minutes > 0
                and now - self.start + self.step_seconds >= 60 * c.time_limit_minutes)
        got = set(self.signals.received)
        return (save_due, near, *(s in got for s in self.signals.signals))

    def decide(self, raised: Sequence[bool]) -> Decision:
        """The decision from flags any rank raised (:attr:`lm.training.engine.StepStats.flags`); the same on
        every rank. A signal wins over the clock; of several signals, the first of ``preemption.signals``."""
        save_due, near, *got = raised
        names = [s.name for s, r in zip(self.signals.signals, got) if r]
        reason = names[0] if names else (f"time_limit_minutes={self.cfg.time_limit_minutes:g}" if near else "")
        return Decision(reason, bool(save_due))

    def agree(self, before: Decision = Decision(), first_step_done: bool = True) -> Decision:
        """Outside a step: all ranks agree through one small all-reduce (collective: every rank calls it). The
        result keeps what ``before`` (the step's decision) asked for. Before the first step of a command the
        clock never stops it: every command trains at least one step."""
        mine = self._flags(self.clock(), limit=first_step_done)
        votes = all_reduce(torch.tensor([float(f) for f in mine], dtype=torch.float64)).tolist()
        agreed = self.decide([v > 0 for v in votes])
        return Decision(before.stop or agreed.stop, before.save or agreed.save)

    def saved(self) -> None:
        """A checkpoint was just written: ``save_every_minutes`` counts from now."""
        self.last_save = self.clock()


def stop_line(reason: str, step: int, checkpoint: Optional[Path], in_bad_streak: bool = False) -> str:
    """The one line rank 0 prints when training stops early (``checkpoint``: where a re-run resumes from)."""
    if checkpoint is None and step == 0:
        return f"stopped by {reason} before the first step: nothing to save; re-run the same command to start"
    if in_bad_streak:
        where = (f"checkpoint {checkpoint}; re-run the same command to resume from it" if checkpoint is not None
                 else "no checkpoint yet; re-run the same command to start again")
        return f"stopped by {reason} at step {step}, in a streak of bad steps (never saved): {where}"
    return f"stopped by {reason} at step {step}: checkpoint {checkpoint}; re-run the same command to resume"


def requeue_slurm_job(cfg: TrainConfig, reason: str) -> Optional[str]:
    """With ``preemption.requeue`` under SLURM, and a stop that means "time is up" (``time_limit_minutes`` or a
    signal not in :data:`NEVER_REQUEUE`): ``scontrol requeue $SLURM_JOB_ID``. Returns a line to print (None:
    nothing to say). Rank 0 only."""
    if not cfg.preemption.requeue:
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "note: preemption.requeue=true but SLURM_JOB_ID is not set (not a SLURM job): nothing requeued"
    if reason in NEVER_REQUEUE:
        return f"note: SLURM job {job} not requeued: {reason} means stop (requeue follows time limits only)"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"warning: could not requeue SLURM job {job} ({e}); submit the same job again to resume"
    if done.returncode:
        why = (done.stderr or done.stdout).strip().splitlines()
        return (f"warning: scontrol requeue {job} failed ({why[0] if why else f'status {done.returncode}'}); "
                f"submit the same job again to resume (is it submitted with --requeue?)")
    return f"requeued SLURM job {job}: it resumes from this checkpoint when it starts again"
