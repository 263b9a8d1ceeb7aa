"""The causal RPE matrix: ``b[min(i - j, L - 1)]`` for every query position ``i`` and key position ``j <= i``,
``-inf`` above the diagonal. The one place it is built, for every form that materialises it: the dense op
(:mod:`lm.ops.dense`, as weights ``exp`` of it), softmax attention's additive bias (:mod:`lm.model.rpe`), the
float64 reference (:mod:`lm.ops.reference`) and the stability probe."""
from __future__ import annotations

import torch

__all__ = ["causal_rpe_bias"]


def causal_rpe_bias(rpe_bias: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``rpe_bias`` ``(H, L)`` or ``(L,)`` log-weights, query positions ``q_pos`` ``(Nq,)`` and key positions
    ``k_pos`` ``(Nk,)`` (long) -> ``(H, Nq, Nk)`` or ``(Nq, Nk)``: entry ``[i, j]`` is
    ``rpe_bias[..., min(q_pos[i] - k_pos[j], L - 1)]`` where ``k_pos[j] <= q_pos[i]``, else ``-inf``. Its ``exp``
    is the causal weight matrix (0 above the diagonal); differentiable in ``rpe_bias`` (no gradient reaches the
    masked entries)."""
    offsets = q_pos.to(rpe_bias.device)[:, None] - k_pos.to(rpe_bias.device)[None, :]
    bias = rpe_bias[..., offsets.clamp(0, rpe_bias.shape[-1] - 1)]
    return bias.masked_fill(offsets < 0, float("-inf"))
