"""O(N^2) masked form of causal kernelized attention, through ordinary autograd (the fastest for short
sequences; it materialises ``(B, H, N, N)`` scores)."""
from __future__ import annotations

import torch

from lm.ops.documents import document_mask
from lm.ops.rpe_matrix import causal_rpe_bias

__all__ = ["dense_attention"]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    starts: torch.Tensor | None = None, init: torch.Tensor | None = None) -> torch.Tensor:
    """q, k ``(B, H, N, M)``, v ``(B, H, N, D)``, bias ``(H, L)`` log-weights (max subtracted) or None ->
    ``(B, H, N, D)`` in ``q``'s dtype. Offsets ``>= L - 1`` use ``bias[:, L-1]``. ``starts`` ``(B, N)``: each
    token's document start (:mod:`lm.ops.documents`); keys before it are masked. ``init`` ``(B, H, M, D + 1)``:
    sums ``k^T [v, 1]`` of keys before the sequence, weighed ``c[L-1]`` by every row."""
    pos = torch.arange(q.shape[-2], device=q.device)
    if bias is None:
        weights = (pos[:, None] >= pos[None, :]).to(q.dtype)
    else:
        weights = causal_rpe_bias(bias, pos, pos).exp()  # (H, N, N), 0 above the diagonal
    if starts is not None:
        weights = weights * document_mask(starts, pos, pos)[:, None].to(q.dtype)  # (B, H or 1, N, N)
    a = (q @ k.transpose(-1, -2)) * weights  # (B, H, N, N)
    num, den = a @ v, a.sum(-1)
    if init is not None:
        c_far = torch.ones((), dtype=q.dtype, device=q.device) if bias is None else bias[:, -1, None, None].exp()
        far = (q @ init) * c_far  # (B, H, N, D + 1)
        num, den = num + far[..., :-1], den + far[..., -1]
    # Only an all-underflowed normaliser needs the floor, and then the numerator is 0 too.
    return num / den.clamp_min(torch.finfo(q.dtype).tiny).unsqueeze(-1)
