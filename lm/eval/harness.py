"""EleutherAI's lm-evaluation-harness over our checkpoints: :class:`HarnessLM` is an ``lm_eval`` model
(registered as ``lm-kernelized``), :func:`run_tasks` runs ``lm_eval.simple_evaluate`` with it offline-safe, and
:func:`json_safe` / :func:`format_tables` turn its results into JSON and lm-eval's tables.

Needs the optional extra ``pip install -e '.[eval]'``; importing this module without it raises
:class:`LMEvalMissing` (a one-line message saying how to install it).

Conventions (where lm-eval leaves a choice to the model):

- Every scored sequence starts at BOS, as in :mod:`lm.eval.perplexity` (an empty context is BOS alone).
- ``loglikelihood``: trailing whitespace of the context moves to the front of the continuation (lm-eval's own
  rule), then context and continuation are tokenized *separately* and concatenated. Our tokenizer starts a
  piece at every whitespace, so for the usual boundary (a continuation starting with a space or newline) this is
  exactly the tokenization of the joined text. At a boundary inside a word (``"The ca" + "t"``) the joined text
  would merge across it (``"▁cat"``); lm-eval's HF rule, ``encode(whole)[len(encode(context)):]``, then
  silently scores the wrong tokens (here none), while ours scores the continuation's own tokens.
  Sequences longer than ``max_length`` are left-truncated: the continuation keeps its full context window and
  the oldest context tokens (BOS first) are dropped, like :func:`lm.eval.perplexity.score_tokens`'s later windows.
- ``loglikelihood_rolling``: each string is one document scored by :func:`lm.eval.perplexity.score_tokens` (BOS, then
  windows of ``max_length`` tokens, ``rolling_stride`` new targets per window; every token scored exactly once).
- ``generate_until``: :func:`lm.inference.generation.generate` (prefill + recurrent decode), greedy unless ``do_sample`` /
  ``temperature > 0``; stops at EOS, at ``max_gen_toks`` or once the text holds a stop sequence (cut before it).
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lm.inference.loading import Inference, load_for_inference
from lm.data.hub import hub_offline
from lm.device import resolve_device
from lm.errors import UserError
from lm.eval.perplexity import score_tokens
from lm.inference.generation import Sampling, TextStream, generate

INSTALL_HINT = ("lm-eval (EleutherAI's lm-evaluation-harness) is not installed: run `pip install -e '.[eval]'` "
                "in the repository (or `pip install 'lm-eval>=0.4.13,<0.5'`)")


class LMEvalMissing(ImportError):
    """lm-eval is not installed; the message says how to install it."""


try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as e:
    if not (e.name or "").startswith("lm_eval"):
        raise
    raise LMEvalMissing(INSTALL_HINT) from None

MODEL_NAME = "lm-kernelized"
"""The name under which :class:`HarnessLM` is registered with lm-eval (``--model lm-kernelized``)."""


class HarnessError(UserError, ValueError):
    """A request the adapter cannot serve; the message says what to change."""


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation (lm-eval's rule), so the
    continuation's first piece carries its word-boundary space as in training text."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


@register_model(MODEL_NAME)
class HarnessLM(LM):
    """A trained checkpoint as an lm-eval model.

    Args:
        path: run directory (its newest checkpoint) or one ``checkpoints/step_*`` directory.
        overrides: ``key=value`` config overrides for loading (as in ``tools/eval_ppl.py``).
        batch_size: sequences (``loglikelihood``) or windows (``loglikelihood_rolling``) per forward pass.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        max_length: tokens per forward pass, BOS included (default: the training context ``data.seq_len``;
            RPE models also run longer contexts).
        rolling_stride: new tokens scored per rolling window after the first (default ``max_length``:
            non-overlapping windows, lm-eval's convention).
        max_gen_toks: default generation budget when a task's ``gen_kwargs`` give none.
        seed: seeds the sampling generator (request ``i`` uses ``seed + i``), so sampled generations repeat.
        inference: an already loaded checkpoint (instead of ``path``).
        max_batch_size: accepted for lm-eval's interface and ignored.
    """

    def __init__(self, path: str | os.PathLike | None = None, overrides: Sequence[str] = (), batch_size: int = 8,
                 device: str = "auto", max_length: int | None = None, rolling_stride: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0, inference: Inference | None = None,
                 max_batch_size: int | None = None):
        super().__init__()
        if (path is None) == (inference is None):
            raise HarnessError("give the checkpoint as path=RUN_DIR (or a loaded inference=, not both)")
        if isinstance(batch_size, str) and batch_size.isdigit():  # lm-eval's command line passes strings
            batch_size = int(batch_size)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise HarnessError(f"batch_size={batch_size!r} must be a positive integer ('auto' is not supported)")
        device = resolve_device(device)
        if inference is None:
            inference = load_for_inference(path, list(overrides), device=device)
        self.inference = inference
        self.model = inference.model.to(device).eval()
        self.tokenizer = inference.tokenizer
        self._device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = int(max_length or inference.cfg.data.seq_len)
        self.rolling_stride = int(rolling_stride or self.max_length)
        if self.max_length < 2:
            raise HarnessError(f"max_length={self.max_length} must be >= 2")
        if not 1 <= self.rolling_stride <= self.max_length:
            raise HarnessError(f"rolling_stride={self.rolling_stride} must be in [1, max_length={self.max_length}]")
        if max_gen_toks < 1:
            raise HarnessError(f"max_gen_toks={max_gen_toks} must be >= 1")
        self.max_gen_toks = max_gen_toks
        self.seed = seed

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records under ``results["config"]``."""
        cfg = self.inference.cfg
        return {"checkpoint": str(self.inference.path), "step": self.inference.step,
                "attention": cfg.model.attention.kind, "rpe": cfg.model.attention.rpe,
                "train_context": cfg.data.seq_len, "max_length": self.max_length,
                "rolling_stride": self.rolling_stride, "tokenizer_hash": self.tokenizer.hash}

    # ------------------------------------------------------------------ loglikelihood
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation (see the module docstring for the boundary rule)."""
        context, continuation = split_pair(context, continuation)
        return self.tokenizer.encode(context), self.tokenizer.encode(continuation)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy choice)`` for each request."""
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = self.score_pairs(pairs, disable_tqdm=disable_tqdm)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    @torch.no_grad()
    def score_pairs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], disable_tqdm: bool = True
                    ) -> list[tuple[float, bool]]:
        """Token-level :meth:`loglikelihood`: ``[BOS] + context + continuation`` per pair, left-truncated to
        ``max_length`` inputs, batched longest first (right padding: the model is causal, so padding after a
        sequence cannot change its logits)."""
        for context, continuation in pairs:
            if len(continuation) > self.max_length:
                raise HarnessError(f"a continuation of {len(continuation)} tokens does not fit max_length="
                                   f"{self.max_length}; raise max_length (--max-length)")
        sequences = [[self.tokenizer.bos_id, *context, *continuation] for context, continuation in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(sequences[i]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        bar = tqdm(total=len(pairs), desc="loglikelihood", disable=True if disable_tqdm else None, dynamic_ncols=True)
        for start in range(0, len(order), self.batch_size):
            batch = [i for i in order[start:start + self.batch_size] if pairs[i][1]]  # empty continuation: 0
            if batch:
                for i, res in zip(batch, self._score_batch([sequences[i] for i in batch],
                                                           [len(pairs[i][1]) for i in batch])):
                    results[i] = res
            bar.update(len(order[start:start + self.batch_size]))
        bar.close()
        return results

    def _score_batch(self, sequences: list[list[int]], num_scored: list[int]) -> list[tuple[float, bool]]:
        """Sum of log-probs of the last ``num_scored[b]`` tokens of each sequence (and whether each is the
        argmax), from one forward pass over inputs ``sequence[:-1]`` left-truncated to ``max_length``."""
        inputs = [seq[:-1][-self.max_length:] for seq in sequences]
        width = max(map(len, inputs))
        ids = np.zeros((len(inputs), width), dtype=np.int64)
        rows, positions, targets = [], [], []
        for b, (seq, inp, k) in enumerate(zip(sequences, inputs, num_scored)):
            ids[b, :len(inp)] = inp
            rows += [b] * k
            positions += range(len(inp) - k, len(inp))  # logits at position p predict inputs' next token
            targets += seq[-k:]
        device = self._device
        logits = self.model(torch.from_numpy(ids).to(device))
        rows_t, targets_t = torch.tensor(rows, device=device), torch.tensor(targets, device=device)
        scored = logits[rows_t, torch.tensor(positions, device=device)].float()  # (K, V): only scored positions
        logp = torch.log_softmax(scored, dim=-1).gather(-1, targets_t[:, None]).squeeze(-1)
        missed = (scored.argmax(dim=-1) != targets_t).to(torch.int64)
        sums = torch.zeros(len(inputs), dtype=torch.float64, device=device).index_add_(0, rows_t, logp.double())
        misses = torch.zeros(len(inputs), dtype=torch.int64, device=device).index_add_(0, rows_t, missed)
        return [(s, m == 0) for s, m in zip(sums.tolist(), misses.tolist())]

    # ------------------------------------------------------------------ rolling (perplexity)
    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string as one document (BOS first, sliding windows, each token once)."""
        results = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=True if disable_tqdm else None, dynamic_ncols=True):
            (text,) = req.args
            tokens = self.tokenizer.encode_array(text)
            if len(tokens) == 0:
                ll = 0.0
            else:
                nll = score_tokens(self.model, tokens, self.max_length, self.rolling_stride, self.batch_size,
                                   self.tokenizer.bos_id, self._device)
                ll = -nll.nll_sum
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
            results.append(ll)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuation of each context, cut before the first stop sequence (``until``)."""
        results = []
        for i, req in enumerate(tqdm(requests, desc="generate_until", disable=True if disable_tqdm else None, dynamic_ncols=True)):
            context, gen_kwargs = req.args
            text = self.generate_text(context, dict(gen_kwargs or {}), seed=self.seed + i)
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results

    def generate_text(self, context: str, gen_kwargs: dict[str, Any], seed: int = 0) -> str:
        """One :meth:`generate_until` request. ``gen_kwargs``: ``until`` (str or list), ``max_gen_toks`` (or
        ``max_new_tokens``), ``do_sample``, ``temperature``, ``top_k``, ``top_p``; anything else is an error."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_gen_toks = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", self.max_gen_toks)))
        do_sample = gen_kwargs.pop("do_sample", None)
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0
        sampling = Sampling(temperature, int(gen_kwargs.pop("top_k", 0) or 0), float(gen_kwargs.pop("top_p", 1.0)))
        if gen_kwargs:
            raise HarnessError(f"unsupported generation arguments {sorted(gen_kwargs)}; supported: until, "
                               f"max_gen_toks, do_sample, temperature, top_k, top_p")
        budget = self.max_length - 1 - max_gen_toks  # BOS + prompt + generation fit in max_length
        if budget < 1:
            raise HarnessError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length="
                               f"{self.max_length}; raise max_length (--max-length) or lower max_gen_toks")
        prompt = self.tokenizer.encode(context)[-budget:]
        generator = torch.Generator(device=self._device).manual_seed(seed)
        stream, text = TextStream(self.tokenizer.decode), ""
        for token in generate(self.model, prompt, max_gen_toks, sampling, bos_id=self.tokenizer.bos_id,
                              eos_id=self.tokenizer.eos_id, generator=generator, device=self._device):
            text += stream.push(token)
            if any(s in text for s in until):
                break
        else:
            text += stream.flush()
        for s in until:
            text = text.split(s)[0]
        return text


# ---------------------------------------------------------------------------------------------- running
def task_manager(tasks: Sequence[str], include_path: Sequence[str | os.PathLike] = ()):
    """lm-eval's TaskManager for ``tasks``. Indexing lm-eval's thousands of built-in tasks takes ~10 s, so when
    every task is found in ``include_path`` the built-ins are left out. Unknown names are a :class:`HarnessError`
    naming close matches."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser()) for p in include_path]
    for p in paths:
        if not Path(p).is_dir():
            raise HarnessError(f"--include-path {p!r} is not a directory")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise HarnessError("unknown task(s): " + "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "")
                                                          for t, h in hints.items())
                           + ". Local tasks need --include-path DIR (a directory of task YAMLs)")
    return manager


def run_tasks(lm: HarnessLM, tasks: Sequence[str], include_path: Sequence[str | os.PathLike] = (),
              limit: int | float | None = None, num_fewshot: int | None = None, log_samples: bool = False,
              offline: bool | None = None, bootstrap_iters: int = 0) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks`` (see :func:`lm.data.hub.hub_offline` for ``offline``).
    Returns lm-eval's results dict (use :func:`json_safe` before writing it). ``bootstrap_iters=0`` skips
    lm-eval's bootstrap standard errors (minutes of CPU for perplexity metrics)."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise HarnessError("no tasks given (--tasks T1,T2)")
    with hub_offline(offline) as is_offline, _our_commit_as_git_hash(), _datasets_bars_on_a_terminal_only():
        manager = task_manager(tasks, include_path)
        try:
            return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                                   batch_size=lm.batch_size, device=str(lm.device))
        except ConnectionError as e:  # raised by `datasets` while the tasks load, before any scoring
            why = ("the Hugging Face hub is unreachable (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and the data "
                   "are not in the local `datasets` cache" if is_offline else "the Hugging Face hub did not answer")
            raise HarnessError(f"a task's data cannot be loaded: {why} ({str(e).splitlines()[0]}); run where the "
                               f"hub is reachable once (it caches the data), or use local tasks "
                               f"(tools/harness_tasks.py, --include-path)") from None


def lm_commit() -> str | None:
    """``git describe --always --dirty`` of the checkout this package runs from; None when it is not a git
    checkout (an installed copy) or git is missing. Asked quietly."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


@contextlib.contextmanager
def _our_commit_as_git_hash():
    """lm-eval records ``results["git_hash"]`` by running ``git describe`` in the working directory, which prints
    "fatal: not a git repository" outside one; meanwhile it records this package's commit instead (the code that
    evaluated: :func:`lm_commit`), asked quietly."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lm_commit
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def _datasets_bars_on_a_terminal_only():
    """No `datasets` progress bars (carriage-return runs) while stderr is a file; as before afterwards."""
    import sys

    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    off = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if off:
        disable_progress_bars()
    try:
        yield
    finally:
        if off:
            enable_progress_bars()


def json_safe(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results as plain JSON values: its task configs hold functions and its samples numpy values;
    those become strings / numbers (lm-eval's own ``handle_non_serializable``)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))


def format_tables(results: dict[str, Any]) -> str:
    """lm-eval's markdown tables: the tasks, then the groups when there are any."""
    from lm_eval.utils import make_table

    out = make_table(results)
    if results.get("groups"):
        out += "\n" + make_table(results, "groups")
    return out
