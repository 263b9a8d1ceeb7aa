"""Training batches from a token stream: the global batch of an optimizer step is a pure function of (tokens,
seq_len, batch_size, step, seed), so a resumed run sees exactly the batches of an uninterrupted one; each rank
takes its own block of rows (:func:`shard`). With ``data.document_mask`` each token's document start comes from
the window's own EOS tokens (:func:`document_starts`, on the device, no host read).

This is all the training loop needs from :mod:`lm.data` once the corpus is prepared.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from lm.config import accumulation_steps
from lm.data.sharded_tokens import ShardedTokens
from lm.data.source import DataError


def _as_tokens(split) -> np.ndarray | ShardedTokens:
    """The token ids of a :class:`~lm.data.token_cache.TokenSplit` (its memmap, or its token files indexed as one
    stream), of a :class:`ShardedTokens` (never concatenated), or of an array-like."""
    if hasattr(split, "tokens"):
        return split.tokens
    return split if isinstance(split, ShardedTokens) else np.asarray(split)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_windows: int, max_offset: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_windows), int(rng.integers(0, max_offset + 1))


def window_layout(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(windows per epoch, largest per-epoch start offset) for windows of ``seq_len + 1`` tokens that step by
    ``seq_len`` (each token is a target once per epoch). One window is kept in reserve so the offset can move
    window boundaries by up to ``seq_len - 1`` tokens between epochs."""
    if num_tokens < seq_len + 1:
        raise DataError(f"the split has {num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        f"lower data.seq_len or use a larger split")
    num_windows = max(1, (num_tokens - seq_len) // seq_len)
    return num_windows, num_tokens - 1 - num_windows * seq_len


def global_batch(split, seq_len: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The whole global batch of optimizer step ``step``: LongTensor (batch_size, seq_len + 1).

    A pure function of its arguments (so resuming at a step reproduces the order exactly). Sample
    ``g = step * batch_size + row`` is window ``g mod W`` of epoch ``g // W`` (``W`` windows per epoch); each
    epoch is a seeded permutation of non-overlapping window starts shifted by a seeded offset. ``split`` is a
    :class:`TokenSplit`, a :class:`ShardedTokens` or a 1-D array of token ids; each row is read from the stream
    on its own (a row that crosses a token file boundary is gathered from both files).
    """
    if step < 0 or batch_size <= 0 or seq_len <= 0:
        raise DataError(f"need step >= 0, batch_size > 0, seq_len > 0 (got {step}, {batch_size}, {seq_len})")
    tokens = _as_tokens(split)
    num_windows, max_offset = window_layout(len(tokens), seq_len)
    rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
    for r in range(batch_size):
        epoch, j = divmod(step * batch_size + r, num_windows)
        order, offset = _epoch_order(seed, epoch, num_windows, max_offset)
        start = offset + int(order[j]) * seq_len
        rows[r] = tokens[start:start + seq_len + 1]
    return torch.from_numpy(rows)


def shard(batch: torch.Tensor, rank: int, world_size: int, micro_batch_size: int) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch: ``batch_size / (world_size * micro_batch_size)`` tensors of
    shape (micro_batch_size, seq_len + 1). Rank ``r`` takes the ``r``-th contiguous block of rows, so ranks get
    disjoint rows and together cover the batch. The batch must split evenly
    (:meth:`lm.config.TrainConfig.gradient_accumulation_steps` says so when it does not)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if micro_batch_size <= 0:
        raise DataError(f"micro_batch_size={micro_batch_size} must be > 0")
    accumulation_steps(batch.shape[0], micro_batch_size, world_size)
    per_rank = batch.shape[0] // world_size
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return list(mine.split(micro_batch_size))


def document_starts(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``ids`` ``(B, N)`` -> ``(B, N)`` long: for each token, the position in its row where its document starts,
    for the op's ``document_starts`` (:mod:`lm.ops.documents`).

    A document starts at the EOS that ends the one before it (or at the row's first token): as an input, that EOS
    plays the part BOS plays at the start of a stream, and the document's first token is predicted from it alone;
    as a target, it is the previous document's last token, predicted from that document alone. So no token is
    predicted from another document. A cumulative maximum over the positions of EOS tokens: no host read, one
    shape whatever the number of documents (compiles once)."""
    pos = torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape)
    return torch.where(ids == eos_id, pos, torch.zeros_like(pos)).cummax(dim=-1).values
