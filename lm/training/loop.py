"""The training loop, :func:`train` (its command line is :mod:`lm.cli.train`: ``python tools/train.py`` and
``launch.sh``).

Everything that decides the numbers of a step is a pure function of (config, step, rank): the batch
(:func:`lm.data.global_batch`), the learning rate (:func:`lm.training.schedule.lr_at`), the dropout RNG and the random
features (both seeded from ``seed`` and ``step``). So a resumed run repeats the uninterrupted one exactly, given
the weights and optimizer state of its checkpoint.

What can go wrong, and what the loop does about it (README, "What happens when things go wrong"): bad steps
(non-finite, or a loss spike: :mod:`lm.training.divergence`) are skipped, no checkpoint is written while the run is in a
streak of them, and a run that diverges stops naming its last good checkpoint; one trainer at a time holds the
run directory (:class:`lm.fileio.OwnerLock` on ``RUN/train.lock``); every step is recorded in ``RUN/steps.jsonl``
(:mod:`lm.training.steplog`). A stop signal or ``time_limit_minutes`` ends the run after the step in flight, saved
(:mod:`lm.training.preemption`): all ranks agree in the step's own reduction; a stop before validating a step
marks its checkpoint (``validation_pending``) and the resumed run validates that step first.
"""
from __future__ import annotations

import math
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Callable, NoReturn, Optional

import torch

from lm import checkpoint
from lm.training import checkpointing
from lm.checkpoint import CheckpointError
from lm.config import ConfigError, TrainConfig, as_dict, config_from_dict, to_yaml
from lm.data import global_batch, prepare_corpus, shard
from lm.errors import DiskError, UserError, disk_errors, disk_problem
from lm.fileio import LockHeld, OwnerLock, atomic_write_text, describe_holder
from lm.training import memory
from lm.training.distributed import DistInfo, barrier, broadcast, init_distributed
from lm.training.divergence import DivergenceMonitor
from lm.training.engine import Engine, build_engine
from lm.training.preemption import (Decision, Interrupted, StopControl, StopSignals, TrainingPreempted,
                                    requeue_slurm_job, stop_line)
from lm.training.schedule import lr_at
from lm.training.steplog import StepLog

LOCK = "train.lock"
"""The run directory's lock file (never delete it while a trainer may run)."""

RUN_CONTENT = (LOCK, checkpoint.CHECKPOINTS, "steps.jsonl")
"""What makes a folder a run directory (a run writes train.lock first of all)."""
BEFORE_A_RUN = ("tokenizer", "eval", "spec.json", "log.txt", "result.json")
"""What lm's own tools may put in a run directory before its first run (prepare_data --run-dir, the stability
study); anything else in a folder that is not a run directory is the user's, and the run refuses the folder."""
RESUME_NOTED = ("seed", "batch_size")
"""Settings a resume may change (the run goes on, differently from the uninterrupted one): said in one line and
recorded in steps.jsonl."""

VALIDATION_PENDING = "validation_pending"
"""In a checkpoint's counters: the run stopped early before validating this step; a resume validates it first."""


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message says why, which checkpoint is the last good one, and how to resume from
    it. ``kind``: "diverged" (max_bad_steps bad steps in a row), "bad_streak_at_end" (the run reached its last step
    in a streak of bad steps) or "ended_far_above_start" (divergence.final_loss_factor); ``step``: the last step
    trained."""

    def __init__(self, message: str, kind: str, step: int):
        super().__init__(message)
        self.kind, self.step = kind, step


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of the RNG stream of ``step`` on ``rank`` (dropout, feature redraws with rank 0)."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


DISK_ADVICE = "free space there (or make it writable), then run the same command again: training resumes from its " \
              "newest checkpoint"


class RunLog:
    """TensorBoard scalars and a progress line, written by rank 0 only. A disk that refuses TensorBoard's events
    (written by a thread of TensorBoard's, which re-raises the error at the next scalar) is one line naming the
    folder: while the log is open, that thread's own traceback of it is not printed."""

    def __init__(self, run_dir: Path, info: DistInfo, cfg: TrainConfig, start_step: int):
        self.enabled = info.is_main
        self.cfg, self.device = cfg, info.device
        self.writer = None
        self.folder = run_dir / "tensorboard"
        self.previous_hook = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.previous_hook = threading.excepthook
            threading.excepthook = self._thread_exception  # restored by close()
            try:
                with self._writing():
                    self.writer = SummaryWriter(str(self.folder), purge_step=start_step + 1)
            except BaseException:
                self.close()
                raise
        self.t0, self.window_steps, self.window_tokens, self.window_loss = time.time(), 0, 0, 0.0
        self.skipped = 0

    def _thread_exception(self, args) -> None:
        if disk_problem(args.exc_value) and type(args.thread).__module__.startswith("tensorboard"):
            return  # the main thread reports it, in one line
        self.previous_hook(args)

    def _writing(self):
        return disk_errors(self.folder, DISK_ADVICE)

    def memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB

    def train(self, step: int, stats, tokens: int) -> None:
        self.window_steps += 1
        self.window_tokens += tokens
        self.window_loss += stats.loss if math.isfinite(stats.loss) else 0.0
        self.skipped += stats.skipped
        if not self.enabled or (step % self.cfg.log_every and step != self.cfg.max_steps):
            return
        elapsed = max(time.time() - self.t0, 1e-9)
        tok_s = self.window_tokens / elapsed
        loss = self.window_loss / self.window_steps
        eta = (self.cfg.max_steps - step) * elapsed / self.window_steps
        with self._writing():
            for name, value in [("train/loss", loss), ("train/lr", stats.lr), ("train/grad_norm", stats.grad_norm),
                                ("train/tokens_per_s", tok_s), ("train/skipped_steps", self.skipped),
                                ("system/memory_gb", self.memory_gb())]:
                self.writer.add_scalar(name, value, step)
        print(f"step {step}/{self.cfg.max_steps} | loss {loss:.4f} | lr {stats.lr:.2e} | grad norm "
              f"{stats.grad_norm:.3f} | {tok_s:,.0f} tok/s | ETA {_hms(eta)}", flush=True)
        self.t0, self.window_steps, self.window_tokens, self.window_loss = time.time(), 0, 0, 0.0

    def valid(self, step: int, nll, split) -> None:
        """Log the validation NLL ``nll`` (an :class:`lm.eval.perplexity.NLL`) of the valid ``split`` (a TokenSplit):
        loss, token perplexity, and word perplexity for a text of lines (WikiText-103's convention, as
        ``tools/eval_ppl.py``) or bits per byte for a corpus of documents (where words need not exist)."""
        if not self.enabled:
            return
        from lm.eval.perplexity import format_perplexity, split_word_perplexity
        if split.num_documents:  # from a sample of windows, the sample's mean NLL stands for the split's
            tag, label = "bits_per_byte", "bits/byte"
            value = nll.mean * split.num_tokens / (math.log(2) * split.num_bytes)
            shown = f"{value:.4f}"
        else:
            tag, label = "word_ppl", "word ppl"
            value = split_word_perplexity(nll, split.num_tokens, split.num_word_level_tokens)
            shown = format_perplexity(value, decimals=2)
        with self._writing():
            for name, v in [("valid/loss", nll.mean), ("valid/ppl", nll.perplexity), (f"valid/{tag}", value)]:
                self.writer.add_scalar(name, v, step)
            self.writer.flush()
        sample = "" if nll.num_tokens == split.num_tokens else f", {label} estimated from this sample"
        print(f"step {step} | valid loss {nll.mean:.4f} | valid ppl {format_perplexity(nll.perplexity, decimals=2)} | "
              f"valid {label} {shown} ({nll.num_tokens:,} tokens{sample})", flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.flush()

    def close(self) -> None:
        """Close the event file; a disk that refuses the last events is ignored here (flush and the scalars
        report it), so that it never hides the error that ended the run."""
        try:
            if self.writer is not None:
                self.writer.close()
        except Exception as e:  # TensorBoard's thread re-raises what it met, whatever its type
            if not disk_problem(e):
                raise
        finally:
            self.writer = None
            if self.previous_hook is not None:
                threading.excepthook, self.previous_hook = self.previous_hook, None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def validate(engine: Engine, cfg: TrainConfig, valid_tokens, bos_id: int, eos_id: int):
    """Validation NLL on rank 0 (the number ``tools/eval_ppl.py`` prints at context ``data.seq_len``; with
    ``data.document_mask`` the documents of a window do not see each other, as in training)."""
    from lm.eval.perplexity import score_tokens
    max_windows = cfg.eval_batches * cfg.micro_batch_size if cfg.eval_batches else None
    return score_tokens(engine.module, valid_tokens, context=cfg.data.seq_len,
                        stride=cfg.eval_stride or cfg.data.seq_len, batch_size=cfg.micro_batch_size,
                        bos_id=bos_id, device=engine.info.device, max_windows=max_windows,
                        document_eos=eos_id if cfg.data.document_mask else None)


def _foreign_files(cfg: TrainConfig, run_dir: Path) -> list[str]:
    """Entries of an existing ``run_dir`` that no run wrote: all but :data:`BEFORE_A_RUN` (and a data.cache_dir
    inside it) when the folder is not a run directory yet; none when it is one."""
    try:
        names = sorted(p.name for p in run_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    if any(n in names for n in RUN_CONTENT):
        return []
    allowed = set(BEFORE_A_RUN)
    try:
        cache = Path(cfg.data.cache_dir).resolve().relative_to(run_dir.resolve())
        allowed.add(cache.parts[0] if cache.parts else "")
    except ValueError:
        pass
    return [n for n in names if n not in allowed]


def _resume_changes(stored: dict, mine: dict) -> dict:
    """``{key: [checkpoint's, now]}`` for the :data:`RESUME_NOTED` settings a resume changes."""
    return {k: [stored.get(k), mine.get(k)] for k in RESUME_NOTED if stored.get(k) != mine.get(k)}


def _resume_point(cfg: TrainConfig, run_dir: Path) -> tuple[Optional[Path], dict]:
    found = checkpoint.checkpoint_dirs(run_dir)
    if found and not cfg.resume:
        raise ConfigError(f"run_dir={run_dir} already holds checkpoints (newest {found[-1].name}); pass resume=true "
                          f"to continue it, or choose another run_dir (nothing was overwritten)")
    if not found:
        return None, {}
    resume_from = checkpoint.newest_intact(run_dir, "training")  # warns about newer damaged ones
    if resume_from is None:
        raise CheckpointError(f"no checkpoint of {run_dir} is intact (see the warnings above); restore one, or "
                              f"choose another run_dir")
    # the stored config with today's defaults for keys an older version did not have
    stored = as_dict(config_from_dict(checkpoint.read_meta(resume_from)["config"]))
    mine = as_dict(cfg)
    movable = ("num_proc", "cache_dir", "path", "progress")  # machine or display settings: the data is the same
    for section in ("model", "data"):
        diff = [d for d in _diff(stored[section], mine[section], section) if d.split(":")[0].split(".")[-1]
                not in movable]
        if diff:
            raise ConfigError(f"resuming {resume_from} with a different {section} config: {diff}; use the same "
                              f"settings or another run_dir")
    return resume_from, _resume_changes(stored, mine)


def _take_run_dir(cfg: TrainConfig, run_dir: Path, info: DistInfo, lock: OwnerLock) -> tuple[Optional[Path], dict]:
    """Rank 0 checks that ``run_dir`` is new, empty or a run directory, locks it, clears the debris of crashes
    (before it writes anything, so that a disk a crash left full can be used again) and picks the checkpoint to
    resume from; every rank learns the outcome (a refusal is an error on every rank). Returns the checkpoint and
    (rank 0) the :data:`RESUME_NOTED` settings the resume changes."""
    error, step, changes = None, -1, {}
    if info.is_main:
        try:
            foreign = _foreign_files(cfg, run_dir)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise ConfigError(f"run_dir={run_dir} holds files that are not a training run's ({shown}): a run "
                                  f"writes config.yaml, steps.jsonl, tensorboard/ and checkpoints/ there; give a new "
                                  f"or empty run_dir (nothing was written)")
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                previous = lock.acquire(before_writing=lambda: checkpointing.clean_debris(run_dir))
            except LockHeld as e:
                raise ConfigError(f"run_dir={run_dir} is in use by {describe_holder(e.holder)}: two trainers on "
                                  f"one run directory would overwrite each other's checkpoints; wait for it to end, "
                                  f"stop it, or choose another run_dir") from None
            _report_takeover(lock, previous)
            found, changes = _resume_point(cfg, run_dir)
            step = -1 if found is None else checkpoint.checkpoint_step(found)
        except (ConfigError, CheckpointError) as e:
            error = e
        except OSError as e:  # e.g. a run_dir that cannot be created, or a full disk
            problem = disk_problem(e)
            error = DiskError(f"{problem}: {e.filename or run_dir}; free space there (or make it writable) and "
                              f"run the same command again (nothing of the run was changed)") if problem else \
                ConfigError(f"run_dir={run_dir} cannot be used: {e}; choose another run_dir")
    outcome = broadcast(torch.tensor([error is None, step], dtype=torch.int64)).tolist()
    if error is not None:
        raise error
    if not outcome[0]:
        raise ConfigError(f"rank 0 could not start the run in run_dir={run_dir} (its error message says why)")
    found = None if outcome[1] < 0 else run_dir / checkpoint.CHECKPOINTS / checkpoint.checkpoint_name(outcome[1])
    return found, changes


def _report_takeover(lock: OwnerLock, previous: Optional[dict]) -> None:
    if not lock.enforced:
        print(f"warning: the file system of {lock.path} does not support locks: a second trainer on this run "
              f"directory would not be refused", flush=True)
    if not previous:
        return
    holder = describe_holder(previous)
    if previous.get("host") in (None, socket.gethostname()):
        print(f"note: taking over {lock.path} from {holder}, which ended without releasing it", flush=True)
    else:
        print(f"warning: taking over {lock.path} from {holder} on another host, which did not release it: if "
              f"that run still goes on (on a file system whose locks other hosts cannot see), stop one of them",
              flush=True)


def _diff(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}.{k}")
        elif a.get(k) != b.get(k) and not (k == "vocab_size" and 0 in (a.get(k), b.get(k))):
            out.append(f"{prefix}.{k}: checkpoint {a.get(k)!r} != now {b.get(k)!r}")
    return out


def train(cfg: TrainConfig, clock: Callable[[], float] = time.monotonic) -> int:
    """Train according to ``cfg``; returns the number of the last step trained. Raises :class:`TrainingStopped`
    when the run diverges or ends far above its first loss (the message names the last good checkpoint), and
    :class:`TrainingPreempted` when a signal of ``preemption.signals`` or ``time_limit_minutes`` stopped it
    early, after saving (:mod:`lm.training.preemption`; re-running resumes). Handlers for those signals are
    installed while it runs; the previous ones come back after. ``clock``: what ``time_limit_minutes`` and
    ``save_every_minutes`` read (seconds; tests give a clock they control)."""
    with StopSignals(cfg.preemption.signals) as signals:
        stop = StopControl(cfg, signals, clock)  # time_limit_minutes counts from here
        info = init_distributed(cfg)
        lock = OwnerLock(Path(cfg.run_dir) / LOCK)
        try:
            with disk_errors(cfg.run_dir, DISK_ADVICE):
                return _train(cfg, info, lock, stop)
        except (UserError, TrainingStopped, TrainingPreempted):
            raise
        except Exception as e:
            if memory.is_out_of_memory(e):
                raise memory.out_of_memory(cfg, info.device, e, info.world_size) from None
            raise
        finally:
            lock.release()


def _train(cfg: TrainConfig, info: DistInfo, lock: OwnerLock, stop: StopControl) -> int:
    from lm.model import Transformer

    run_dir = Path(cfg.run_dir)
    memory.check_fits(cfg, info.device, info.world_size)  # before anything is written
    resume_from, changes = _take_run_dir(cfg, run_dir, info, lock)
    barrier()  # every rank has looked at the run directory before rank 0 writes into it
    corpus = _prepare_data(cfg, run_dir, stop.signals)
    _stop_before_start(cfg, info, stop, resume_from)  # nothing written yet: no config.yaml, no steps
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = corpus.tokenizer.vocab_size
    elif cfg.model.vocab_size < corpus.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{corpus.tokenizer.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    model.init_weights()
    model.activation_checkpointing = cfg.compute.activation_checkpointing
    engine = build_engine(cfg, model, info)
    start, counters = 0, {}
    if resume_from is not None:
        meta = checkpointing.load_training_state(resume_from, engine, corpus.tokenizer.hash)
        start, counters = meta["step"], meta["counters"]
        if info.is_main:
            print(f"resumed from {resume_from} at step {start}", flush=True)
            if changes:
                changed = ", ".join(f"{k}={new} (the run so far: {old})" for k, (old, new) in changes.items())
                print(f"note: resuming with {changed}: the steps from {start + 1} on differ from an uninterrupted "
                      f"run's (recorded in steps.jsonl)", flush=True)
    _stop_before_start(cfg, info, stop, resume_from)

    train_split, valid_split = corpus.split("train"), corpus.split("valid")
    document_eos = corpus.tokenizer.eos_id if cfg.data.document_mask else None
    log = RunLog(run_dir, info, cfg, start)
    steps = StepLog(run_dir, start, enabled=info.is_main)
    if changes:
        steps.note_next(resumed={"from_step": start, "changed": changes})
    monitor = DivergenceMonitor(cfg.divergence, counters, start, first_loss_guess=math.log(cfg.model.vocab_size))
    end = min(cfg.stop_at or cfg.max_steps, cfg.max_steps)
    step = start

    def validation(request: Decision) -> tuple[Decision, bool]:
        """Validate ``step`` on rank 0 (the others wait); a stop signal reaching rank 0 ends it at once (it only
        reads). Then every rank agrees on stopping. Returns (the decision, whether the validation is still to be
        done)."""
        done = True
        if info.is_main:
            try:
                with stop.signals.interruptible():
                    nll = validate(engine, cfg, valid_split.tokens, corpus.tokenizer.bos_id, corpus.tokenizer.eos_id)
            except Interrupted:
                done = False
            else:
                log.valid(step, nll, valid_split)
        barrier()
        return stop.agree(request), not done

    def stop_now(reason: str, saved: Optional[Path]) -> NoReturn:
        steps.sync()
        log.flush()
        message = ""
        if info.is_main:
            resume_at = saved if saved is not None else checkpoint.newest_intact(run_dir, "training")
            message = stop_line(reason, step, resume_at, in_bad_streak=saved is None)
            print(message, flush=True)
            note = requeue_slurm_job(cfg, reason)
            if note:
                print(note, flush=True)
        _end_together()
        raise TrainingPreempted(message or "training stopped early (rank 0 says where it saved)", reason, step,
                                saved)

    try:
        if counters.get(VALIDATION_PENDING) and cfg.eval_every:  # stopped before validating its step
            request, _ = validation(Decision())
            if request.stop:
                stop_now(request.stop, resume_from)
        stop.loop_starts()
        while step < end:
            if cfg.model.attention.redraw_every and step and step % cfg.model.attention.redraw_every == 0:
                engine.module.redraw_features(torch.Generator().manual_seed(step_seed(cfg.seed, step)))
            engine.module.refresh_precision_policy()  # FFT precision from the current RPE: one host read per step
            torch.manual_seed(step_seed(cfg.seed, step, info.rank))
            batch = global_batch(train_split, cfg.data.seq_len, cfg.batch_size, step, cfg.seed)
            micro = shard(batch, info.dp_rank, info.dp_size, cfg.micro_batch_size)  # sequence-parallel ranks share rows
            limit = monitor.loss_limit()
            stats = engine.train_step(micro, global_tokens=batch[:, 1:].numel(),
                                      lr=lr_at(step, cfg.optim, cfg.max_steps), loss_limit=limit, flags=stop.flags,
                                      document_eos=document_eos)
            step += 1
            monitor.record(step, stats.loss, stats.bad, limit)
            steps.write(step, stats, limit, monitor.bad_in_a_row)
            if stats.bad and info.is_main:
                print(monitor.last_event, flush=True)
            if monitor.diverged:
                message = _stop_message(cfg, run_dir, info, monitor)
                _end_together()
                raise TrainingStopped(message, "diverged", step)
            log.train(step, stats, batch[:, 1:].numel())
            request = stop.decide(stats.flags)  # agreed by every rank in the step's own reduction
            pending = False
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                if request.stop:
                    pending = True  # saving comes first; a resume validates this step before going on
                else:
                    request, pending = validation(request)
            saved = None
            due = step % cfg.save_every == 0 or step == end or request.save or request.stop
            if due and not monitor.bad_in_a_row:  # never in a bad streak
                steps.sync()
                saved = checkpointing.save_checkpoint(run_dir, engine, step, cfg, corpus.tokenizer,
                                                      {**monitor.state_dict(), **_pending(pending)},
                                                      cfg.keep_checkpoints)
                stop.saved()
                if not request.stop and step < end:  # a signal while saving: this step is saved, stop now
                    request = stop.agree(request)
            if request.stop:
                stop_now(request.stop, saved)
        if monitor.bad_in_a_row or monitor.ended_far_above_start():
            kind = "bad_streak_at_end" if monitor.bad_in_a_row else "ended_far_above_start"
            message = _stop_message(cfg, run_dir, info, monitor)
            _end_together()
            raise TrainingStopped(message, kind, step)
    finally:
        steps.close()
        log.close()
    _end_together()
    return step


def _end_together() -> None:
    """Where every rank ends a run it agreed to end: a barrier, so that the last collective before the process
    exits holds no tensor of Python's. (A gloo worker thread still releasing a finished all-reduce of a Python
    tensor while the interpreter shuts down aborts the process: "terminate called without an active exception".)
    Never on an error path, where the other ranks may not come."""
    barrier()


def _pending(pending: bool) -> dict:
    return {VALIDATION_PENDING: True} if pending else {}


def _prepare_data(cfg: TrainConfig, run_dir: Path, signals: StopSignals):
    """The corpus (:func:`lm.data.prepare_corpus`); None when a stop signal ended its preparation (caches are
    written atomically, so it can stop anywhere; a re-run goes on from what is complete)."""
    try:
        with signals.interruptible():
            return prepare_corpus(cfg.data, run_dir)
    except Interrupted:
        return None
    except UserError:
        if signals.received:  # e.g. a tokenizer worker process ended by the same signal
            return None
        raise


def _stop_before_start(cfg: TrainConfig, info: DistInfo, stop: StopControl, resume_from: Optional[Path]) -> None:
    """Before the first step: if any rank received a stop signal, stop with nothing written (the clock never
    stops a command before its first step). Collective."""
    request = stop.agree(first_step_done=False)
    if not request.stop:
        return
    step = 0 if resume_from is None else checkpoint.checkpoint_step(resume_from)
    message = ""
    if info.is_main:
        message = stop_line(request.stop, step, resume_from)
        print(message, flush=True)
        note = requeue_slurm_job(cfg, request.stop)
        if note:
            print(note, flush=True)
    _end_together()
    raise TrainingPreempted(message or "training stopped before its first step", request.stop, step, resume_from)


def _stop_message(cfg: TrainConfig, run_dir: Path, info: DistInfo, monitor: DivergenceMonitor) -> str:
    """Why the run stops and how to go on, in one line; rank 0 also sets aside the checkpoint of weights that
    diverged."""
    if not info.is_main:
        return "training stopped (rank 0 says why and which checkpoint to resume from)"
    lower = (f"a lower learning rate, e.g. optim.lr={cfg.optim.lr / 2:.3g} (now {cfg.optim.lr:g}; a longer "
             f"optim.warmup_steps helps too)")
    if not monitor.bad_in_a_row:  # the run ended far above its first loss
        return (f"the run ended with a training loss of {monitor.typical_loss():.4g} (median of the last "
                f"{len(monitor.good)} good steps), above divergence.final_loss_factor="
                f"{cfg.divergence.final_loss_factor:g} x its first step's {monitor.first_loss:.4g}: it diverged "
                f"without a run of bad steps. Its checkpoints hold the diverged weights: start again with another "
                f"run_dir and {lower}.")
    last = monitor.streak[-1][0]
    if monitor.diverged:
        good, renamed = checkpointing.set_aside_diverged(run_dir, monitor.last_good_step)
        what = (f"training diverged at step {last}: {monitor.bad_in_a_row} bad steps in a row "
                f"(divergence.max_bad_steps={cfg.divergence.max_bad_steps}); ")
    else:
        good, renamed = checkpoint.newest_intact(run_dir, "training"), None
        what = f"the run reached step {last} in a streak of bad steps, so its last checkpoint was not written: "
    what += f"{monitor.streak_summary()}; the bad steps were skipped. "
    if renamed is not None:
        what += (f"The weights of step {monitor.last_good_step} failed on all of them, so its checkpoint was renamed "
                 f"{renamed.name}. ")
    if good is not None:
        what += (f"Last good checkpoint: {good} (step {checkpoint.checkpoint_step(good)}); to resume from it, run the "
                 f"same command with {lower}.")
    else:
        what += f"No checkpoint was written before that; to start again, run the same command with {lower}."
    if cfg.divergence.spike_factor and any(reason == "spike" for _, reason in monitor.streak):
        what += (f" If these were not a divergence, raise divergence.spike_factor (now "
                 f"{cfg.divergence.spike_factor:g}) or set it to 0.")
    return what
