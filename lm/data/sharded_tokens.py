"""One token stream stored in several memory-mapped files, indexed as a single 1-D array without concatenating them
(together they may exceed memory): what :attr:`lm.data.TokenSplit.tokens` is for a split of several token files.

It supports what the rest of the code does with a split's tokens: ``len``, ``shape``/``ndim``/``dtype``, integer
and slice indexing (a slice is a new array holding only the tokens asked for, gathered across file boundaries),
and ``np.asarray`` (which does concatenate everything: for tests and small splits).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class ShardedTokens:
    """Read-only view of ``parts`` (1-D arrays of one dtype, e.g. np.memmap) as their concatenation."""

    def __init__(self, parts: Sequence[np.ndarray]):
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("ShardedTokens needs at least one non-empty part")
        dtypes = {p.dtype for p in parts}
        if len(dtypes) != 1 or any(p.ndim != 1 for p in parts):
            raise ValueError(f"parts must be 1-D arrays of one dtype (got {sorted(map(str, dtypes))})")
        self.parts = list(parts)
        self.dtype = parts[0].dtype
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        """starts[k]: the position of part k's first token; starts[-1]: the length."""

    @property
    def shape(self) -> tuple[int]:
        return (int(self.starts[-1]),)

    ndim = 1

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self):,} tokens of {self.dtype} in {len(self.parts)} parts)"

    def _range(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` (0 <= start <= stop <= len) as a new array."""
        if start >= stop:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left")) - 1
        pieces = [self.parts[k][max(start, self.starts[k]) - self.starts[k]:min(stop, self.starts[k + 1])
                                - self.starts[k]] for k in range(first, last + 1)]
        return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            return self._take(np.arange(start, stop, step))
        if isinstance(index, (int, np.integer)):
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"index {index} is out of bounds for {n} tokens")
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.parts[k][i - self.starts[k]]
        return self._take(np.asarray(index))

    def _take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.where(positions < 0, positions + len(self), positions).astype(np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"index out of bounds for {len(self)} tokens")
        out = np.empty(positions.shape, dtype=self.dtype)
        which = np.searchsorted(self.starts, positions, side="right") - 1
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.parts[k][positions[mask] - self.starts[k]]
        return out

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype, copy=False)
