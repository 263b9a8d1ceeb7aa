"""O(N^2) dense float64 reference for causal kernelized attention with RPE (tests and benchmarks only).

Written as the formula reads, so that it is obviously right: it materialises the (N, N) weight matrix.
"""
from __future__ import annotations

import torch


def rpe_weights(rpe_bias: torch.Tensor | None, num_heads: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """Causal RPE weight matrix ``c(i - j)`` for ``j <= i`` and 0 above the diagonal.

    rpe_bias: ``None``, ``(L,)`` or ``(H, L)`` log-weights for offsets ``t = i - j``; offsets ``>= L - 1`` use
    the last entry. Returns ``(H, N, N)`` (``(1, N, N)`` ones-below-diagonal when ``rpe_bias`` is None).
    """
    i = torch.arange(n)
    offset = i[:, None] - i[None, :]  # (N, N)
    causal = offset >= 0
    if rpe_bias is None:
        return causal.to(dtype)[None]
    bias = rpe_bias.to(dtype)
    if bias.dim() == 1:
        bias = bias[None].expand(num_heads, -1)
    idx = offset.clamp(0, bias.shape[-1] - 1)
    c = torch.exp(bias[:, idx])  # (H, N, N)
    return torch.where(causal, c, torch.zeros((), dtype=dtype))


def kernelized_attention_reference(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                                   rpe_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float64 causal kernelized attention.

    phi_q, phi_k: ``(B, H, N, M)``; v: ``(B, H, N, D)``; rpe_bias: ``None``, ``(L,)`` or ``(H, L)``.
    Returns ``(B, H, N, D)`` in float64: ``out_i = sum_{j<=i} c(i-j) (q_i.k_j) v_j / sum_{j<=i} c(i-j) (q_i.k_j)``.
    Differentiable (float64 autograd) in all four inputs.
    """
    q, k, val = phi_q.double(), phi_k.double(), v.double()
    n = q.shape[-2]
    w = (q @ k.transpose(-1, -2)) * rpe_weights(rpe_bias, q.shape[1], n)  # (B, H, N, N)
    return (w @ val) / w.sum(-1, keepdim=True)


def kernelized_attention_reference_rows(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                                        rpe_bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """The dense float64 formula evaluated only at query positions ``rows`` (1-D LongTensor of R indices).

    For checking long sequences without an (N, N) matrix: memory O(B H R N). Returns ``(B, H, R, D)`` float64.
    """
    q, k, val = phi_q.double()[:, :, rows], phi_k.double(), v.double()
    n = k.shape[-2]
    offset = rows[:, None].to(k.device) - torch.arange(n, device=k.device)[None, :]  # (R, N)
    causal = offset >= 0
    if rpe_bias is None:
        c = causal.double()[None]
    else:
        bias = rpe_bias.double()
        bias = bias[None] if bias.dim() == 1 else bias
        c = torch.where(causal, torch.exp(bias[:, offset.clamp(0, bias.shape[-1] - 1)]), torch.zeros((), dtype=torch.float64))
    w = (q @ k.transpose(-1, -2)) * c  # (B, H, R, N)
    return (w @ val) / w.sum(-1, keepdim=True)
