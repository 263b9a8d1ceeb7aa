"""Sampling from a causal LM: prefill the prompt with the parallel op, then recurrent decode steps.

The loop runs over :func:`lm.inference.decoding.prefill` / :func:`lm.inference.decoding.decode_step`, whose per-layer state is
constant-size for clipped RPE, a growing feature cache for general RPE and a KV cache for softmax.
One sequence at a time: a long context's cache is held once, and text streams as it is produced.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from lm.inference.decoding import decode_step, prefill


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits.

    temperature: 0 is greedy (argmax); > 0 divides the logits before softmax.
    top_k: keep only the k most likely tokens (ties at the k-th logit kept too); 0 keeps all.
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability sums to >= top_p
        (the most likely token always stays); 1 keeps all. Applied after top_k.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filter)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits of tokens outside the top-k / nucleus to -inf.

    Args:
        logits: (B, V) float.
    Returns:
        (B, V) float32, a new tensor; at least one finite entry per row (the argmax).
    """
    out = logits.float().clone()
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 < top_p: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, -math.inf)
    return out


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row.

    Args:
        logits: (B, V) float.
        generator: the random stream (on logits' device); same generator state, same draw.
    Returns:
        (B,) int64 token ids.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class GenerationStats:
    """Counts and timings of one :func:`generate` call (filled in as it runs; time spent by the caller
    between tokens, e.g. printing, is not counted)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_at_eos: bool = False

    @property
    def decode_tokens_per_second(self) -> float:
        """Recurrent decode steps (one per token after the first) per second."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else math.nan


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling,
             bos_id: int, eos_id: int | None = None, generator: torch.Generator | None = None,
             device: str | torch.device = "cpu", stats: GenerationStats | None = None) -> Iterator[int]:
    """Continue ``[BOS] + prompt_ids``, yielding each new token id as soon as it is chosen.

    Stops after ``max_new_tokens`` or when ``eos_id`` is drawn (EOS is not yielded). The model is put in eval
    mode and must be on ``device``; ``generator`` must be on ``device`` too. ``stats``, when given, is
    filled in with counts and timings.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    stats = stats if stats is not None else GenerationStats()
    clock = _synchronized_clock(device)
    model.eval()
    ids = torch.tensor([[bos_id, *prompt_ids]], dtype=torch.int64, device=device)
    stats.prompt_tokens = len(prompt_ids)
    if max_new_tokens == 0:
        return
    t0 = clock()
    logits, cache = prefill(model, ids, last_only=True)
    next_id = sample_next(logits[:, -1], sampling, generator)
    stats.prefill_seconds = clock() - t0
    while True:
        token = int(next_id.item())
        if eos_id is not None and token == eos_id:
            stats.stopped_at_eos = True
            return
        stats.new_tokens += 1
        yield token
        if stats.new_tokens == max_new_tokens:
            return
        t0 = clock()
        next_id = sample_next(decode_step(model, cache, next_id), sampling, generator)
        stats.decode_seconds += clock() - t0
        stats.decode_steps += 1


def _synchronized_clock(device: str | torch.device) -> Callable[[], float]:
    if torch.device(device).type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


class TextStream:
    """Incremental detokenizer: feed ids one by one, get the text they add.

    A piece may end inside a multi-byte character (byte fallback); text is released only once it decodes
    cleanly, and only a short tail of ids is re-decoded per token (so streaming stays O(1) per token).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] is already-emitted context for re-decoding
        self._read = 0

    def push(self, token: int) -> str:
        """Add one token id; return the newly completed text (possibly "")."""
        self._ids.append(token)
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
