"""Sliding-window negative log-likelihood of a token stream: the one scorer behind ``tools/eval_ppl.py`` and
training's validation (so logged validation perplexity equals eval_ppl's at the same context), plus the
per-split figures eval_ppl reports (:func:`split_perplexity`) and the split tokenized with a model's own
tokenizer (:func:`tokenize_split`).

The stream ``tokens`` (T,) is read as ``s = [BOS] + tokens``; target ``t`` (= ``tokens[t]``) is predicted from
a window of ``s`` that ends just before it. Windows hold ``context`` tokens (BOS included) and are planned by
:func:`plan_windows`:

- the first window starts at BOS and scores its ``min(context, T)`` targets;
- each later window scores the next ``stride`` targets (fewer in the last) and starts ``context`` tokens before
  its end, so every scored target has at least ``context - stride`` tokens of history.

Every target is scored exactly once. ``stride == context`` is the plain non-overlapping mode, except that the
last window is shifted back to hold a full ``context`` (it scores only the targets it adds), so all windows
but a lone short first one have the same length and batch without padding.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lm.data.batches import document_starts


def _exp(x: float) -> float:
    """exp that returns inf instead of raising OverflowError (a diverged model has infinite perplexity)."""
    return math.exp(x) if x < 709.0 else math.inf


def format_perplexity(ppl: float, decimals: int = 3) -> str:
    """A perplexity for a table or a log line: fixed-point up to 1e6, then ``1.234e+07``; ``inf`` for a diverged
    model (never a 300-digit number)."""
    if not math.isfinite(ppl):
        return str(ppl)
    return f"{ppl:.{decimals}f}" if ppl < 1e6 else f"{ppl:.3e}"


@dataclass(frozen=True)
class NLL:
    """Summed negative log-likelihood (nats) of ``num_tokens`` scored tokens."""

    nll_sum: float
    num_tokens: int

    @property
    def mean(self) -> float:
        """Mean NLL per token (nats)."""
        return self.nll_sum / self.num_tokens

    @property
    def perplexity(self) -> float:
        """Token-level perplexity, ``exp(nll_sum / num_tokens)``."""
        return _exp(self.mean)


@dataclass(frozen=True)
class Window:
    """One window over ``s = [BOS] + tokens``: inputs ``s[start:end]`` predict targets ``tokens[start:end]``;
    only targets ``tokens[score_from:end]`` are scored (the rest is history)."""

    start: int
    score_from: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows that score each of ``num_tokens`` targets exactly once (see the module docstring)."""
    if num_tokens < 1:
        raise ValueError(f"nothing to score: the token stream is empty (num_tokens={num_tokens})")
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    first = min(context, num_tokens)
    windows = [Window(0, 0, first)]
    scored = first
    while scored < num_tokens:
        end = min(scored + stride, num_tokens)
        windows.append(Window(end - context, scored, end))
        scored = end
    return windows


def _window_inputs(tokens: np.ndarray | torch.Tensor, w: Window, bos_id: int) -> torch.Tensor:
    """Input ids ``s[w.start:w.end]`` (length w.length, int64) where ``s = [BOS] + tokens``."""
    if w.start == 0:
        body = torch.as_tensor(np.asarray(tokens[: w.end - 1], dtype=np.int64))
        return torch.cat([torch.tensor([bos_id], dtype=torch.int64), body])
    return torch.as_tensor(np.asarray(tokens[w.start - 1: w.end - 1], dtype=np.int64))


def _window_targets(tokens: np.ndarray | torch.Tensor, w: Window) -> torch.Tensor:
    """Scored targets ``tokens[w.score_from:w.end]`` (int64)."""
    return torch.as_tensor(np.asarray(tokens[w.score_from: w.end], dtype=np.int64))


def _select(windows: list[Window], max_windows: int | None) -> list[Window]:
    """All windows, or ``max_windows`` of them spread evenly over the stream (deterministic)."""
    if max_windows is None or max_windows >= len(windows):
        return windows
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be >= 1 (or None for the whole stream)")
    picks = np.linspace(0, len(windows) - 1, max_windows).round().astype(int)
    return [windows[i] for i in sorted(set(picks.tolist()))]


def _batches(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive groups of at most ``batch_size`` windows of equal length (only the first may differ)."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0].length == w.length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


@torch.no_grad()
def score_tokens(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor, context: int, stride: int,
                 batch_size: int, bos_id: int, device: str | torch.device = "cpu", max_windows: int | None = None,
                 progress: bool = False, document_eos: int | None = None) -> NLL:
    """Sliding-window NLL of a 1-D token stream under a causal LM.

    Args:
        model: ``model(ids (B, n) long) -> logits (B, n, V)``; put on ``device`` by the caller. Run in eval
            mode here (dropout off); its previous train/eval mode is restored on return.
        tokens: (T,) token ids (e.g. a split's ``np.memmap``); read window by window, never copied whole.
        context: tokens per window, BOS included (may exceed the training context for RPE models).
        stride: new targets scored per window after the first; ``1 <= stride <= context``.
        batch_size: windows per forward pass.
        bos_id: the beginning-of-sequence id the first target is conditioned on.
        max_windows: score only this many windows, spread evenly over the stream (for bounded validation
            during training); None scores every target exactly once.
        progress: show a tqdm bar with tokens scored and running perplexity.
        document_eos: the EOS id of a packed documents stream whose model was trained with ``data.document_mask``:
            then each token of a window sees only its own document (which starts at the EOS before it;
            :func:`lm.data.batches.document_starts`), never the document before; ``model`` must take
            ``document_starts`` (our Transformer). None: windows are attended whole.

    Returns:
        :class:`NLL` with the float64-accumulated summed NLL (nats) and the number of targets scored.
    """
    if np.ndim(tokens) != 1:
        raise ValueError(f"tokens must be a 1-D stream of ids, got shape {tuple(np.shape(tokens))}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    windows = _select(plan_windows(len(tokens), context, stride), max_windows)
    total_targets = sum(w.end - w.score_from for w in windows)

    was_training = model.training
    model.eval()
    nll_sum, num_tokens = 0.0, 0
    bar = tqdm(total=total_targets, unit="tok", desc="scoring", disable=None if progress else True, dynamic_ncols=True)
    try:
        for group in _batches(windows, batch_size):
            ids = torch.stack([_window_inputs(tokens, w, bos_id) for w in group]).to(device)
            logits = model(ids) if document_eos is None else model(ids, document_starts=document_starts(ids,
                                                                                                     document_eos))
            if logits.shape[:2] != ids.shape:
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for ids {tuple(ids.shape)}")
            for row, w in zip(logits, group):
                targets = _window_targets(tokens, w).to(device)
                scored = row[w.score_from - w.start:].float()
                nll = F.cross_entropy(scored, targets, reduction="none")
                nll_sum += nll.double().sum().item()
                num_tokens += targets.numel()
            bar.update(sum(w.end - w.score_from for w in group))
            bar.set_postfix(ppl=f"{_exp(nll_sum / num_tokens):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    return NLL(nll_sum, num_tokens)


@dataclass(frozen=True)
class SplitPerplexity:
    """The figures ``tools/eval_ppl.py`` reports for one split at one context (see :func:`split_perplexity`)."""

    split: str
    context: int
    stride: int
    nll_sum: float
    """Summed NLL in nats over every token of the split."""
    num_tokens: int
    num_words: int
    """Whitespace-delimited words of the original split text."""
    num_line_ends: int
    """Lines of the original split text (a missing final newline counts as one)."""
    num_word_level_tokens: int | None
    """``num_words + num_line_ends``: WikiText-103's own token count (valid 217,646, test 245,569); None for a
    documents corpus."""
    num_bytes: int
    """UTF-8 bytes of the original split text."""
    token_perplexity: float
    word_perplexity: float | None
    """``exp(total NLL / (words + line ends))``: word-level perplexity by the WikiText-103 convention, as in the
    literature (word-level models predict an end-of-line token per line, and our model pays for the newlines).
    None for a documents corpus: its tokens include an EOS per document and its text need not be words."""
    whitespace_word_perplexity: float | None
    """``exp(total NLL / whitespace words)``: the same NLL over the words alone (higher; not the literature's)."""
    bits_per_byte: float
    """Total NLL in bits over the text's UTF-8 bytes (a documents corpus's EOS tokens are part of the NLL)."""
    seconds: float
    num_documents: int = 0
    """Documents of a documents corpus (each ends with an EOS token); 0 for a text of lines (WikiText)."""
    per_document: bool = False
    """Each document scored on its own from BOS (no context from the document before it)."""
    document_mask: bool = False
    """The packed stream scored with documents kept apart (a model trained with ``data.document_mask``)."""


def word_level_tokens(num_words: int, num_line_ends: int) -> int:
    """The denominator of word-level perplexity: whitespace words + one end-of-line token per line."""
    return num_words + num_line_ends


def split_word_perplexity(nll: NLL, split_tokens: int, words_and_lines: int) -> float:
    """Word-level perplexity (WikiText-103 convention) of a split of ``split_tokens`` tokens and
    ``words_and_lines`` word-level tokens, from the NLL of the tokens scored. Exactly
    :attr:`SplitPerplexity.word_perplexity` when every token was scored; from a sample of windows (training's
    bounded validation) the sample's mean token NLL stands for the split's, so it is an estimate. NaN when the
    split has no word-level count (a documents corpus: ``words_and_lines == 0``)."""
    if words_and_lines <= 0:
        return math.nan
    return _exp(nll.mean * split_tokens / words_and_lines)


def split_perplexity(nll: NLL, split: str, num_words: int, num_line_ends: int, num_bytes: int, context: int,
                     stride: int, seconds: float = math.nan, num_documents: int = 0,
                     per_document: bool = False, document_mask: bool = False) -> SplitPerplexity:
    """Token perplexity and bits per byte of a split from its summed NLL and the split's counts, and word
    perplexity for a text of lines (``num_documents == 0``: WikiText's convention)."""
    if num_bytes < 1 or (not num_documents and num_words < 1):
        raise ValueError(f"split {split!r} has {num_words} words and {num_bytes} bytes: nothing to normalise by")
    words_and_lines = None if num_documents else word_level_tokens(num_words, num_line_ends)
    return SplitPerplexity(split, context, stride, nll.nll_sum, nll.num_tokens, num_words, num_line_ends,
                           words_and_lines, num_bytes, token_perplexity=nll.perplexity,
                           word_perplexity=None if num_documents else _exp(nll.nll_sum / words_and_lines),
                           whitespace_word_perplexity=None if num_documents else _exp(nll.nll_sum / num_words),
                           bits_per_byte=nll.nll_sum / (math.log(2) * num_bytes), seconds=seconds,
                           num_documents=num_documents, per_document=per_document,
                           document_mask=document_mask)


@dataclass(frozen=True)
class EvalSplit:
    """A split tokenized for evaluation: ``tokens`` (T,) and the original text's counts."""

    name: str
    tokens: np.ndarray
    """Token ids: int64, or a documents split's memory-mapped token cache (uint16/uint32, read window by window)."""
    num_words: int
    """Whitespace-delimited words of the original text."""
    num_line_ends: int
    """Lines of the original text (:class:`lm.data.LineEnds`)."""
    num_bytes: int
    """UTF-8 bytes of the original text."""
    num_documents: int = 0
    """Documents (each followed by the tokenizer's EOS id in ``tokens``); 0 for a text of lines (WikiText)."""

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def tokenize_split(data_cfg, tokenizer, name: str) -> EvalSplit:
    """Split ``name`` of ``data_cfg``'s corpus, tokenized with ``tokenizer`` (a model's own).

    Not :func:`lm.data.prepare_corpus`: that derives the tokenizer from the data settings, and a checkpoint
    must be scored with the tokenizer it was trained with even when those settings (or the tokenizer code, or
    the cache) have changed since. Valid and test splits of a text of lines are small (~1 MB for WikiText-103),
    so they are tokenized in memory; the text is read through the same loader as training's, in line-aligned
    chunks. A documents split uses its token cache when one was built with this very tokenizer (caches are keyed
    by the tokenizer's hash), else it is tokenized in memory, an EOS after each document.
    """
    from lm.data import DataError, DocumentSource, LineEnds, cached_document_split, pack, resolve_sources
    from lm.data.documents import tasks
    from lm.data.token_cache import worker_count

    source = resolve_sources(data_cfg, [name])[name]
    if isinstance(source, DocumentSource):
        cached = cached_document_split(data_cfg, tokenizer, source)
        if cached is not None:
            return EvalSplit(name, cached.tokens, cached.num_words, cached.num_line_ends, cached.num_bytes,
                             cached.num_documents)
        tokens, counts = pack(tokenizer, tasks(source.segments()), num_threads=worker_count(data_cfg))
        if counts.num_documents == 0:
            raise DataError(f"the {name} split of {source.origin} has no documents")
        return EvalSplit(name, tokens, counts.num_words, counts.num_line_ends, counts.num_bytes,
                         counts.num_documents)
    pieces, words, line_ends = [], 0, LineEnds()
    for chunk in map(line_ends.add, source.chunks()):
        pieces.append(tokenizer.encode_array(chunk))
        words += len(chunk.split())
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return EvalSplit(name, tokens.astype(np.int64, copy=False), words, line_ends.count, source.num_bytes)


def document_spans(tokens, eos_id: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each document of a packed stream, its EOS included (a last document without one
    ends at the stream's end). Reads the stream in blocks, so a memory-mapped cache is never loaded whole."""
    ends, block = [], 1 << 24
    for a in range(0, len(tokens), block):
        ends.extend((a + np.flatnonzero(np.asarray(tokens[a:a + block]) == eos_id) + 1).tolist())
    if not ends or ends[-1] != len(tokens):
        ends.append(len(tokens))
    return list(zip([0, *ends[:-1]], ends))


def score_documents(model: torch.nn.Module, tokens, eos_id: int, context: int, stride: int, batch_size: int,
                    bos_id: int, device: str | torch.device = "cpu", progress: bool = False) -> NLL:
    """Summed NLL of a packed stream with each document scored on its own: from BOS, its windows never reaching
    into the document before it (:func:`score_tokens` per document, EOS included). What a long-context model is
    judged on per document; costs one forward pass per window of each document."""
    total, count = 0.0, 0
    spans = document_spans(tokens, eos_id)
    bar = tqdm(total=len(spans), unit="doc", desc="documents", disable=None if progress else True, dynamic_ncols=True)
    try:
        for start, end in spans:
            nll = score_tokens(model, tokens[start:end], context, stride, batch_size, bos_id, device)
            total += nll.nll_sum
            count += nll.num_tokens
            bar.update(1)
    finally:
        bar.close()
    return NLL(total, count)


def evaluate_split(model: torch.nn.Module, split: EvalSplit, contexts: Sequence[int], stride: int | None,
                   batch_size: int, bos_id: int, device: str, progress: bool = False,
                   per_document_eos: int | None = None, document_eos: int | None = None) -> list[SplitPerplexity]:
    """:func:`split_perplexity` of ``split`` at each context (tokens per window), with ``stride`` new tokens per
    window (None: the context, non-overlapping windows). With ``per_document_eos`` (the tokenizer's EOS id; a
    documents split only) every document is scored on its own (:func:`score_documents`); with ``document_eos``
    (a model trained with ``data.document_mask``) the packed stream's documents do not see each other."""
    if per_document_eos is not None and not split.num_documents:
        raise ValueError(f"split {split.name!r} is a text of lines, not documents: it has no per-document score")
    rows = []
    for context in contexts:
        start = time.perf_counter()
        if per_document_eos is None:
            nll = score_tokens(model, split.tokens, context, stride or context, batch_size, bos_id, device,
                               progress=progress, document_eos=document_eos)
        else:
            nll = score_documents(model, split.tokens, per_document_eos, context, stride or context, batch_size,
                                  bos_id, device, progress=progress)
        rows.append(split_perplexity(nll, split.name, split.num_words, split.num_line_ends, split.num_bytes,
                                     context, stride or context, seconds=time.perf_counter() - start,
                                     num_documents=split.num_documents,
                                     per_document=per_document_eos is not None,
                                     document_mask=per_document_eos is None and document_eos is not None))
    return rows
