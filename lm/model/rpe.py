"""Relative positional encodings: learnable log-weights ``b(t)`` for the query-key offset ``t = i - j >= 0``.

Both parameterisations are *clipped*: ``b(t)`` is constant for ``t >= L - 1`` for a table length ``L`` fixed
by the configuration, so they extend to any sequence length and their table is exactly the op's ``rpe_bias``
(``(H, L)`` per head, or ``(L,)`` shared by all heads). ``table(n)`` returns at most ``n`` entries, which is all
a sequence of ``n`` tokens can use. The model builds one module per layer, or a single one that every
layer shares (``rpe_shared``, as in the paper).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lm.config.model import check_buckets
from lm.ops.rpe_matrix import causal_rpe_bias

__all__ = ["PerOffsetRPE", "BucketedRPE", "t5_causal_buckets", "relative_bias"]


class _ClippedRPE(nn.Module):
    """Common part: a bias table ``(H, L)`` or ``(L,)`` whose last entry covers all offsets ``>= L - 1``.

    Under half-precision training the ``bias`` parameter is half (DeepSpeed's bf16 keeps every parameter in it),
    which would quantise log-weights to 2^-8 of their size (~0.03 nats at 5 nats). The engine then hands over the
    optimizer's float32 master copy after each step (:meth:`use_master`): the table the model uses is the float32
    value, and gradients still reach ``bias``."""

    num_heads: int | None
    master_residual: torch.Tensor | None = None
    """float32 ``master - bias`` while an optimizer keeps a float32 copy of a half ``bias`` (else None)."""

    def values(self) -> torch.Tensor:
        """``bias`` as the model uses it: the float32 master values when :meth:`use_master` gave them."""
        return self.bias if self.master_residual is None else self.bias + self.master_residual

    @torch.no_grad()
    def use_master(self, master: torch.Tensor | None) -> None:
        """Make :meth:`values` equal ``master`` (the optimizer's float32 copy of ``bias``; None: ``bias`` itself)."""
        self.master_residual = (None if master is None else
                                master.to(self.bias.device, torch.float32) - self.bias.detach().float())

    def full_table(self) -> torch.Tensor:
        """The whole table, ``(H, L)`` or ``(L,)`` (the op's ``rpe_bias`` for sequences of any length)."""
        raise NotImplementedError

    @property
    def table_len(self) -> int:
        """L: offsets ``>= L - 1`` share the last entry."""
        raise NotImplementedError

    def table(self, n: int) -> torch.Tensor:
        """The table truncated to the ``min(n, L)`` offsets a sequence of ``n`` tokens can use.

        Truncation keeps the op's meaning: offsets ``t <= n - 1`` read the same values either way.
        """
        return self.full_table()[..., : max(1, min(n, self.table_len))]

    def forward(self, n: int) -> torch.Tensor:
        return self.table(n)


class PerOffsetRPE(_ClippedRPE):
    """One learnable scalar per offset ``0 .. max_distance``; offsets ``>= max_distance`` share the last.

    ``num_heads=None``: one table ``(max_distance + 1,)`` shared by all heads; else ``(num_heads, max_distance + 1)``.
    Use ``max_distance >= context`` for fully general RPE.
    """

    def __init__(self, num_heads: int | None, max_distance: int):
        super().__init__()
        if max_distance < 0:
            raise ValueError(f"PerOffsetRPE: max_distance must be >= 0, got {max_distance}")
        self.num_heads = num_heads
        shape = (max_distance + 1,) if num_heads is None else (num_heads, max_distance + 1)
        self.bias = nn.Parameter(torch.zeros(shape))

    @property
    def table_len(self) -> int:
        return self.bias.shape[-1]

    def full_table(self) -> torch.Tensor:
        return self.values()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)


def t5_causal_buckets(offsets: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional bucket of each offset ``t >= 0`` (long tensor, same shape as ``offsets``).

    Offsets below ``num_buckets // 2`` get their own bucket; larger ones are spaced logarithmically up to
    ``max_distance``; everything ``>= max_distance`` lands in the last bucket ``num_buckets - 1``.
    """
    exact = num_buckets // 2
    t = offsets.clamp(min=0)
    # max(t, 1) only avoids log(0) in the branch that torch.where discards.
    log_part = exact + (torch.log(t.clamp(min=1).double() / exact) / math.log(max_distance / exact)
                        * (num_buckets - exact)).long()
    return torch.where(t < exact, t, log_part.clamp(max=num_buckets - 1))


class BucketedRPE(_ClippedRPE):
    """T5-style log buckets: ``num_buckets`` learnable scalars (per head, or shared when ``num_heads=None``),
    offset ``t`` reads bucket :func:`t5_causal_buckets` ``(t)``. ``L`` is the first offset in the last bucket + 1."""

    def __init__(self, num_heads: int | None, num_buckets: int, max_distance: int):
        super().__init__()
        check_buckets(num_buckets, max_distance)
        self.num_heads = num_heads
        shape = (num_buckets,) if num_heads is None else (num_heads, num_buckets)
        self.bias = nn.Parameter(torch.zeros(shape))
        self.num_buckets, self.max_distance = num_buckets, max_distance
        # Config arithmetic on the host, once (also when the model is built on another device, e.g. meta).
        buckets = t5_causal_buckets(torch.arange(max_distance + 1, device="cpu"), num_buckets, max_distance)
        self._table_len = int(torch.nonzero(buckets == num_buckets - 1)[0]) + 1

    @property
    def table_len(self) -> int:
        return self._table_len

    def bucket_of_offset(self, n: int) -> torch.Tensor:
        """The bucket of each offset ``0 .. n - 1`` ``(n,)``, on the parameters' device. Computed, not stored: a
        few arithmetic kernels, and nothing that a loader (a checkpoint, transformers' meta-device loading) can
        leave unset."""
        return t5_causal_buckets(torch.arange(n, device=self.bias.device), self.num_buckets, self.max_distance)

    def full_table(self) -> torch.Tensor:
        return self.values()[..., self.bucket_of_offset(self.table_len)]

    def table(self, n: int) -> torch.Tensor:
        return self.values()[..., self.bucket_of_offset(max(1, min(n, self.table_len)))]

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)


def relative_bias(table: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive attention bias for softmax attention: ``(H, Nq, Nk)`` (or ``(Nq, Nk)`` for a shared table).

    Entry ``[i, j]`` is ``table[..., min(q_pos[i] - k_pos[j], L - 1)]`` where ``k_pos[j] <= q_pos[i]``, else -inf
    (causal mask). ``q_pos`` ``(Nq,)`` and ``k_pos`` ``(Nk,)`` are absolute positions (long).
    """
    return causal_rpe_bias(table, q_pos, k_pos)
