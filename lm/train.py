"""The training loop, :func:`train` (its command line is :mod:`lm.cli.train`: ``python tools/train.py`` and
``launch.sh``).

Everything that decides the numbers of a step is a pure function of (config, step, rank): the batch
(:func:`lm.data.global_batch`), the learning rate (:func:`lm.schedule.lr_at`), the dropout RNG and the random
features (both seeded from ``seed`` and ``step``). So a resumed run repeats the uninterrupted one exactly, given
the weights and optimizer state of its checkpoint.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from lm import checkpoint
from lm.config import ConfigError, TrainConfig, as_dict, to_yaml
from lm.data import global_batch, prepare_corpus, shard
from lm.distributed import DistInfo, barrier, init_distributed
from lm.engine import Engine, build_engine
from lm.schedule import lr_at


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why and where."""


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of the RNG stream of ``step`` on ``rank`` (dropout, feature redraws with rank 0)."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2 ** 63)


class RunLog:
    """TensorBoard scalars and a progress line, written by rank 0 only."""

    def __init__(self, run_dir: Path, info: DistInfo, cfg: TrainConfig, start_step: int):
        self.enabled = info.is_main
        self.cfg, self.device = cfg, info.device
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.t0, self.window_steps, self.window_tokens, self.window_loss = time.time(), 0, 0, 0.0
        self.skipped = 0

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
        for name, value in [("train/loss", loss), ("train/lr", stats.lr), ("train/grad_norm", stats.grad_norm),
                            ("train/tokens_per_s", tok_s), ("train/skipped_steps", self.skipped),
                            ("system/memory_gb", self.memory_gb())]:
            self.writer.add_scalar(name, value, step)
        print(f"step {step}/{self.cfg.max_steps} | loss {loss:.4f} | lr {stats.lr:.2e} | grad norm "
              f"{stats.grad_norm:.3f} | {tok_s:,.0f} tok/s | ETA {_hms(eta)}", flush=True)
        self.t0, self.window_steps, self.window_tokens, self.window_loss = time.time(), 0, 0, 0.0

    def valid(self, step: int, nll, split) -> None:
        """Log the validation NLL ``nll`` (an :class:`lm.evaluate.NLL`) of the valid ``split`` (a TokenSplit):
        loss, token perplexity and word perplexity (WikiText-103 convention, as ``tools/eval_ppl.py``)."""
        if not self.enabled:
            return
        from lm.evaluate import split_word_perplexity
        word_ppl = split_word_perplexity(nll, split.num_tokens, split.num_word_level_tokens)
        for name, value in [("valid/loss", nll.mean), ("valid/ppl", nll.perplexity), ("valid/word_ppl", word_ppl)]:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        sample = "" if nll.num_tokens == split.num_tokens else ", word ppl estimated from this sample"
        print(f"step {step} | valid loss {nll.mean:.4f} | valid ppl {nll.perplexity:.2f} | valid word ppl "
              f"{word_ppl:.2f} ({nll.num_tokens:,} tokens{sample})", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def validate(engine: Engine, cfg: TrainConfig, valid_tokens, bos_id: int):
    """Validation NLL on rank 0 (the number ``tools/eval_ppl.py`` prints at context ``data.seq_len``)."""
    from lm.evaluate import score_tokens
    max_windows = cfg.eval_batches * cfg.micro_batch_size if cfg.eval_batches else None
    return score_tokens(engine.module, valid_tokens, context=cfg.data.seq_len,
                        stride=cfg.eval_stride or cfg.data.seq_len, batch_size=cfg.micro_batch_size,
                        bos_id=bos_id, device=engine.info.device, max_windows=max_windows)


def _resume_point(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    found = checkpoint.list_checkpoints(run_dir)
    if found and not cfg.resume:
        raise ConfigError(f"run_dir={run_dir} already holds checkpoints (newest {found[-1].name}); pass resume=true "
                          f"to continue it, or choose another run_dir (nothing was overwritten)")
    if not found:
        return None
    stored = checkpoint.read_meta(found[-1])["config"]
    mine = as_dict(cfg)
    movable = ("num_proc", "cache_dir", "path")  # may differ between machines without changing the data
    for section in ("model", "data"):
        diff = [d for d in _diff(stored[section], mine[section], section) if d.split(":")[0].split(".")[-1]
                not in movable]
        if diff:
            raise ConfigError(f"resuming {found[-1]} with a different {section} config: {diff}; use the same "
                              f"settings or another run_dir")
    return found[-1]


def _diff(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}.{k}")
        elif a.get(k) != b.get(k) and not (k == "vocab_size" and 0 in (a.get(k), b.get(k))):
            out.append(f"{prefix}.{k}: checkpoint {a.get(k)!r} != now {b.get(k)!r}")
    return out


def train(cfg: TrainConfig) -> int:
    """Train according to ``cfg``; returns the number of the last step trained."""
    from lm.model import Transformer

    info = init_distributed(cfg)
    run_dir = Path(cfg.run_dir)
    resume_from = _resume_point(cfg, run_dir)
    barrier()  # every rank has looked at the run directory before rank 0 writes into it
    corpus = prepare_corpus(cfg.data, run_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = corpus.tokenizer.vocab_size
    elif cfg.model.vocab_size < corpus.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{corpus.tokenizer.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    model.init_weights()
    model.activation_checkpointing = cfg.compute.activation_checkpointing
    engine = build_engine(cfg, model, info)
    start, bad_in_a_row = 0, 0
    if resume_from is not None:
        meta = checkpoint.load_training_state(resume_from, engine, corpus.tokenizer.hash)
        start, bad_in_a_row = meta["step"], meta["counters"].get("nonfinite_in_a_row", 0)
        if info.is_main:
            print(f"resumed from {resume_from} at step {start}", flush=True)

    train_split, valid_split = corpus.split("train"), corpus.split("valid")
    log = RunLog(run_dir, info, cfg, start)
    stop_at = cfg.stop_at or cfg.max_steps
    step = start
    try:
        while step < min(stop_at, cfg.max_steps):
            if cfg.model.attention.redraw_every and step and step % cfg.model.attention.redraw_every == 0:
                engine.module.redraw_features(torch.Generator().manual_seed(step_seed(cfg.seed, step)))
            engine.module.refresh_precision_policy()  # FFT precision from the current RPE: one host read per step
            torch.manual_seed(step_seed(cfg.seed, step, info.rank))
            batch = global_batch(train_split, cfg.data.seq_len, cfg.batch_size, step, cfg.seed)
            micro = shard(batch, info.dp_rank, info.dp_size, cfg.micro_batch_size)  # sequence-parallel ranks share rows
            stats = engine.train_step(micro, global_tokens=batch[:, 1:].numel(),
                                      lr=lr_at(step, cfg.optim, cfg.max_steps))
            step += 1
            bad_in_a_row = bad_in_a_row + 1 if stats.nonfinite else 0
            if bad_in_a_row >= cfg.max_nonfinite_steps:
                raise TrainingStopped(
                    f"stopped at step {step}: {bad_in_a_row} steps in a row had non-finite {stats.nonfinite} "
                    f"(loss {stats.loss}, grad norm {stats.grad_norm}); those steps were skipped. Lower optim.lr, "
                    f"raise optim.warmup_steps, or use compute.precision=bf16/fp32, and resume from the last "
                    f"checkpoint")
            log.train(step, stats, batch[:, 1:].numel())
            last = step == min(stop_at, cfg.max_steps)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                if info.is_main:
                    nll = validate(engine, cfg, valid_split.tokens, corpus.tokenizer.bos_id)
                    log.valid(step, nll, valid_split)
                barrier()
            if step % cfg.save_every == 0 or last:
                checkpoint.save_checkpoint(run_dir, engine, step, cfg, corpus.tokenizer,
                                           {"nonfinite_in_a_row": bad_in_a_row}, cfg.keep_checkpoints)
    finally:
        log.close()
    return step
