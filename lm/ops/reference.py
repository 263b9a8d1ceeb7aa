"""O(N^2) dense float64 reference for causal kernelized attention with RPE, and the RPE bias families the FFT
precision policy is judged on (tests and benchmarks only).

Written as the formula reads, so that it is obviously right: it materialises the (N, N) weight matrix.
"""
from __future__ import annotations

import torch

from lm.ops.rpe_matrix import causal_rpe_bias

BIAS_FAMILIES = ("flat", "init", "decay_0.25log", "decay_0.5log", "decay_1log", "decay_1.5log", "decay_0.01t",
                 "decay_0.001t", "noisy_decay", "random_3", "random_6", "random_15", "rising_1", "rising_3",
                 "rising_6", "rising_15", "spiky_5", "spiky_15")


def bias_family(kind: str, n: int, num_heads: int = 2, seed: int = 1) -> torch.Tensor:
    """``(num_heads, n)`` float32 RPE biases of shape ``kind`` (``t`` = offset, ``U`` = uniform noise in
    [-0.5, 0.5] per head and offset): flat (0); init (0.04 U, as at initialisation); decay_<a>log (-a log(1+t));
    decay_<a>t (-a t); noisy_decay (-log(1+t) + 6 U); random_<s> (s U: i.i.d., spans s nats); rising_<s>
    (s t / (n-1)); spiky_<s> (0 at t = 0 and at 2% of offsets, -s elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64)
    noise = torch.rand(num_heads, n, generator=g, dtype=torch.float64) - 0.5
    name, _, arg = kind.rpartition("_")
    if kind == "flat":
        b = torch.zeros(n, dtype=torch.float64)
    elif kind == "init":
        b = 0.04 * noise
    elif kind == "noisy_decay":
        b = -torch.log1p(t) + 6 * noise
    elif name == "decay" and arg.endswith("log"):
        b = -float(arg[:-3]) * torch.log1p(t)
    elif name == "decay" and arg.endswith("t"):
        b = -float(arg[:-1]) * t
    elif name == "random":
        b = float(arg) * noise
    elif name == "rising":
        b = float(arg) * t / max(n - 1, 1)
    elif name == "spiky":
        b = torch.where(torch.rand(num_heads, n, generator=g) < 0.02, 0.0, -float(arg)).double()
        b[:, 0] = 0.0
    else:
        raise ValueError(f"unknown bias family {kind!r}; choose from {BIAS_FAMILIES}")
    return b.expand(num_heads, n).float().contiguous()


def rpe_weights(rpe_bias: torch.Tensor | None, num_heads: int, n: int, dtype=torch.float64,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Causal RPE weight matrix ``c(i - j)`` for ``j <= i`` and 0 above the diagonal.

    rpe_bias: ``None``, ``(L,)`` or ``(H, L)`` log-weights for offsets ``t = i - j``; offsets ``>= L - 1`` use
    the last entry. Returns ``(H, R, N)`` for query rows ``rows`` (default all ``N``; ``(1, R, N)``
    ones-below-diagonal when ``rpe_bias`` is None).
    """
    cols = torch.arange(n)
    rows = cols if rows is None else rows.cpu()
    if rpe_bias is None:
        return (rows[:, None] >= cols[None, :]).to(dtype)[None]
    bias = rpe_bias.to(dtype).cpu()
    bias = bias[None].expand(num_heads, -1) if bias.dim() == 1 else bias
    return causal_rpe_bias(bias, rows, cols).exp()


def kernelized_attention_reference(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                                   rpe_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float64 causal kernelized attention.

    phi_q, phi_k: ``(B, H, N, M)``; v: ``(B, H, N, D)``; rpe_bias: ``None``, ``(L,)`` or ``(H, L)``.
    Returns ``(B, H, N, D)`` in float64: ``out_i = sum_{j<=i} c(i-j) (q_i.k_j) v_j / sum_{j<=i} c(i-j) (q_i.k_j)``.
    Differentiable (float64 autograd) in all four inputs.
    """
    q, k, val = phi_q.double(), phi_k.double(), v.double()
    n = q.shape[-2]
    w = (q @ k.transpose(-1, -2)) * rpe_weights(rpe_bias, q.shape[1], n).to(q.device)  # (B, H, N, N)
    return (w @ val) / w.sum(-1, keepdim=True)


def kernelized_attention_reference_rows(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                                        rpe_bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """The dense float64 formula evaluated only at query positions ``rows`` (1-D LongTensor of R indices).

    For checking long sequences without an (N, N) matrix: memory O(B H R N). Returns ``(B, H, R, D)`` float64.
    """
    q, k, val = phi_q.double()[:, :, rows], phi_k.double(), v.double()
    c = rpe_weights(rpe_bias, q.shape[1], k.shape[-2], rows=rows).to(k.device)  # (H, R, N)
    w = (q @ k.transpose(-1, -2)) * c  # (B, H, R, N)
    return (w @ val) / w.sum(-1, keepdim=True)
