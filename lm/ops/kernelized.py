"""Causal kernelized attention with relative positional encoding: validation, method choice, autograd.

``kernelized_attention(phi_q, phi_k, v, rpe_bias=None, method="auto")`` computes, per batch and head,

    out_i = sum_{j<=i} c(i-j) (phi_q_i . phi_k_j) v_j / sum_{j<=i} c(i-j) (phi_q_i . phi_k_j),
    c(t) = exp(rpe_bias[min(t, L-1)])    (c = 1 when rpe_bias is None).

Numerator and normaliser come out of one pass over ``u = [v, 1]``. The convolution itself lives in
``toeplitz.py``; here the bias is turned into weights (``max`` subtracted per head: it cancels in the ratio and
keeps every weight <= 1), a method is picked, and custom ``autograd.Function`` s recompute in backward so
that only O(B H N (M + D)) is kept between forward and backward.
"""
from __future__ import annotations

import math

import torch

from lm.ops import toeplitz

METHODS = ("auto", "dense", "fft", "band", "prefix")

# Crossovers for method="auto", measured (CPU, 1 thread, B=1, H=8, M=16, D=64, forward + backward, ms):
#   no RPE:  N=256 dense 5 / prefix 4;  N=512 dense 43 / prefix 16                -> dense below 256.
#   L = N:   N=512 dense 64 / band 95 / fft 132;  N=1024 dense 715 / fft 418        -> dense up to 512.
#   L = N/4: N=256 dense 14 / band 11;  N=512 dense 67 / band 49                    -> band when L <= N/4.
#   band vs fft: N=1024 L=256 173/423, L=1024 488/418;  N=2048 L=512 553/760, L=2048 1392/563;
#   N=16384 (H=1) L=257 band 0.29 s / fft 1.07 s. Band costs ~N (T + L) with T = 256, the FFT ~N log2 N:
#   band wins while L + 256 <= ~120 log2 N (N=1024: L <= 944; 16384: L <= 1424; 65536: L <= 1664).
DENSE_MAX_N_NO_RPE = 255
DENSE_MAX_N = 512
BAND_COST_PER_LOG2N = 120
# The FFT path recomputes its first ceil(N / 32) rows exactly (see _attend).
EXACT_HEAD_FRACTION_INV = 32
# float32 FFT only when the weights span at most this many nats (bias max - min over the offsets used), else
# float64. Worst per-position relative error of the fp32 FFT rows (>= N/32), N = 16384, M = 16, uniform
# features, v ~ N(0, 1), against float64 (checked near the threshold by tests/test_ops_numerics.py):
#   range 0: 4.8e-6; 3 nats: random 4.6e-6, rising 2.8e-5, decaying 2.1e-6, spiky 4.7e-6;
#   4 nats: rising 5.5e-5; 5 nats: rising 1.4e-4 (fails 1e-4). float64 FFT: <= 2e-7 up to 15 nats.
# float64 costs ~2x (fwd+bwd N=16384, 1 thread: 0.36x vs 0.74x of SDPA).
FP32_FFT_MAX_BIAS_RANGE = 3.0


def kernelized_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                         rpe_bias: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """Causal kernelized attention with optional RPE.

    phi_q, phi_k: ``(B, H, N, M)`` non-negative features; v: ``(B, H, N, D)``; rpe_bias: ``None``, ``(H, L)`` or
    ``(L,)`` (shared by heads) log-weights for offsets ``0..L-1``, offsets ``>= L-1`` use the last one.
    method: ``auto`` | ``dense`` (O(N^2)) | ``fft`` (O(N log N), any L) | ``band`` (O(N L), clipped RPE) |
    ``prefix`` (O(N), only without RPE). All are exact; ``auto`` picks the fastest.
    Returns ``(B, H, N, D)`` in ``v``'s dtype; computed in float32 (float64 for float64 inputs), never under
    autocast. Differentiable in all four inputs.
    """
    _validate(phi_q, phi_k, v, rpe_bias, method)
    B, H, N, M = phi_q.shape
    compute = torch.float64 if torch.float64 in (phi_q.dtype, phi_k.dtype, v.dtype) else torch.float32
    with torch.autocast(device_type=v.device.type, enabled=False):
        q, k, val = phi_q.to(compute), phi_k.to(compute), v.to(compute)
        bias = None
        if rpe_bias is not None:
            bias = rpe_bias.to(compute)
            bias = bias.expand(H, -1) if bias.dim() == 1 else bias
            bias = bias[:, :N]  # offsets never exceed N - 1; a longer bias gets zero gradient there
            bias = bias - bias.amax(-1, keepdim=True).detach()
        out = _attend(q, k, val, bias, method)
    return out.to(v.dtype)


def _attend(q, k, v, bias, method: str) -> torch.Tensor:
    """Dispatch on validated inputs in the compute dtype; ``bias`` is ``(H, min(L, N))`` with max 0, or None."""
    B, H, N, M = q.shape
    if method == "auto":
        method = choose_method(N, None if bias is None else bias.shape[-1])
    if method == "dense":
        return _dense(q, k, v, bias)
    if method in ("band", "prefix"):
        c = torch.ones(H, 1, dtype=q.dtype, device=q.device) if bias is None else bias.exp()
        return _BandAttention.apply(q, k, v, c)
    offsets = torch.arange(N, device=q.device)
    c = (torch.ones(H, N, dtype=q.dtype, device=q.device) if bias is None
         else bias[:, offsets.clamp(max=bias.shape[-1] - 1)].exp())
    out = _FFTAttention.apply(q, k, v, c, fft_precision(bias, q.dtype))
    # FFT round-off is absolute, ~eps * (the largest partial sum, i.e. late positions); the first rows have the
    # smallest normalisers, so they are recomputed exactly (they only see keys < head). Rows >= N / 32 then
    # have relative error ~32x smaller than the worst row would (see FP32_FFT_MAX_BIAS_RANGE).
    head = -(-N // EXACT_HEAD_FRACTION_INV)
    if head >= N:
        return out
    exact = _attend(q[:, :, :head], k[:, :, :head], v[:, :, :head],
                    None if bias is None else bias[:, :head], "auto")
    return torch.cat([exact, out[:, :, head:]], dim=2)


def choose_method(n: int, num_offsets: int | None) -> str:
    """The fastest exact method for sequence length ``n`` and ``num_offsets = min(L, n)`` (None: no RPE)."""
    if num_offsets is None:
        return "dense" if n <= DENSE_MAX_N_NO_RPE else "prefix"
    if n <= DENSE_MAX_N and 4 * num_offsets > n:
        return "dense"
    if num_offsets + 256 <= BAND_COST_PER_LOG2N * math.log2(max(n, 2)):
        return "band"
    return "fft"


def fft_precision(bias: torch.Tensor | None, compute: torch.dtype) -> torch.dtype:
    """float32 FFT when the (max-subtracted) bias spans at most FP32_FFT_MAX_BIAS_RANGE nats, else float64."""
    if compute == torch.float64:
        return torch.float64
    if bias is None:
        return torch.float32
    spread = float(-bias.detach().min())  # max is 0 after the subtraction
    return torch.float32 if spread <= FP32_FFT_MAX_BIAS_RANGE else torch.float64


def _validate(phi_q, phi_k, v, rpe_bias, method) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    named = [(n, x) for n, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v), ("rpe_bias", rpe_bias))
             if x is not None or n != "rpe_bias"]
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in named:
        if x.dtype not in floating:
            raise ValueError(f"{name} has dtype {x.dtype}; expected one of float16, bfloat16, float32, float64")
        if x.device != v.device:
            raise ValueError(f"{name} is on {x.device} but v is on {v.device}; put all inputs on one device")
    if phi_q.dim() != 4:
        raise ValueError(f"phi_q must have shape (B, H, N, M), got {tuple(phi_q.shape)}")
    B, H, N, M = phi_q.shape
    if phi_k.shape != phi_q.shape:
        raise ValueError(f"phi_k must have the shape of phi_q (B, H, N, M) = {tuple(phi_q.shape)}, "
                         f"got {tuple(phi_k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, H, N):
        raise ValueError(f"v must have shape (B, H, N, D) = ({B}, {H}, {N}, D) to match phi_q, got {tuple(v.shape)}")
    if N == 0 or M == 0 or v.shape[-1] == 0:
        raise ValueError(f"empty inputs: phi_q {tuple(phi_q.shape)}, v {tuple(v.shape)}; N, M and D must be >= 1")
    if rpe_bias is not None:
        if not (rpe_bias.dim() == 1 or (rpe_bias.dim() == 2 and rpe_bias.shape[0] == H)) or rpe_bias.shape[-1] < 1:
            raise ValueError(f"rpe_bias must have shape (H, L) = ({H}, L) or (L,) with L >= 1, "
                             f"got {tuple(rpe_bias.shape)}")
        if method == "prefix":
            raise ValueError("method='prefix' is plain causal linear attention and takes no rpe_bias; "
                             "use method='band' or 'fft' (or 'auto') with an RPE")


def _safe_normaliser(den: torch.Tensor, q: torch.Tensor, k: torch.Tensor, rel: float) -> torch.Tensor:
    """``den`` floored at ``rel * q_i . sum_j k_j`` (+ tiny): round-off can push a tiny normaliser to <= 0.

    ``q_i . sum_j k_j`` bounds the FFT round-off (which spreads over all positions) since every weight <= 1;
    exact methods pass ``rel = 0`` (only an all-underflowed normaliser needs the floor, and then the numerator
    is 0 too). Returns the floored normaliser; where the floor acted, ``den`` gets no gradient.
    """
    tiny = torch.finfo(den.dtype).tiny
    if rel == 0:
        return den.clamp_min(tiny)
    scale = (q * k.sum(2, keepdim=True)).sum(-1).to(den.dtype)
    return torch.maximum(den, scale * rel + tiny)


def _dense(q, k, v, bias):
    """O(N^2) masked form through ordinary autograd (used for short sequences)."""
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    offset = i[:, None] - i[None, :]
    causal = offset >= 0
    if bias is None:
        weights = causal.to(q.dtype)
    else:
        weights = torch.where(causal, bias[:, offset.clamp(0, bias.shape[-1] - 1)].exp(),
                              torch.zeros((), dtype=q.dtype, device=q.device))
    a = (q @ k.transpose(-1, -2)) * weights  # (B, H, N, N)
    den = _safe_normaliser(a.sum(-1), q, k, 0.0)
    return (a @ v) / den.unsqueeze(-1)


class _MixingAttention(torch.autograd.Function):
    """Shared forward/backward around a Toeplitz mixer ``Y = mix(q, k, v, c)`` (over ``[v, 1]``, so
    ``Y (B, H, N, D + 1)``): out = Y[..., :D] / Y[..., D]. Saves only inputs, out and the normaliser."""

    @staticmethod
    def _mix(q, k, v, c, extra):
        raise NotImplementedError

    @staticmethod
    def _mix_backward(q, k, v, c, g, extra, need_dc: bool):
        """-> (dq, dk, dv, dc or None) for the gradient ``g (B, H, N, D + 1)`` of ``Y``."""
        raise NotImplementedError

    @staticmethod
    def _floor(extra) -> float:
        return 0.0

    @classmethod
    def forward(cls, ctx, q, k, v, c, extra=None):
        y = cls._mix(q, k, v, c, extra)
        den = y[..., -1]
        floored = _safe_normaliser(den, q, k, cls._floor(extra))
        out = (y[..., :-1] / floored.unsqueeze(-1)).to(v.dtype)
        ctx.save_for_backward(q, k, v, c, out, floored, floored > den)
        ctx.extra = extra
        return out

    @classmethod
    def backward(cls, ctx, grad_out):
        q, k, v, c, out, den, clamped = ctx.saved_tensors
        # d out / d Y: [1 / den] for the numerator columns, -out / den for the normaliser column.
        g = torch.empty(*out.shape[:-1], out.shape[-1] + 1, dtype=den.dtype, device=out.device)
        g_num = torch.div(grad_out, den.unsqueeze(-1), out=g[..., :-1])
        g[..., -1] = -torch.einsum("bhnd,bhnd->bhn", g_num, out.to(den.dtype)).masked_fill_(clamped, 0)
        need_dc = ctx.needs_input_grad[3]
        dq, dk, dv, dc = cls._mix_backward(q, k, v, c, g, ctx.extra, need_dc)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dc.to(c.dtype) if need_dc else None, None)


class _FFTAttention(_MixingAttention):
    """Masked causal Toeplitz convolution by FFT; ``extra`` is the FFT dtype."""

    @staticmethod
    def _mix(q, k, v, c, fft_dtype):
        return toeplitz.fft_forward(q, k, v, c, fft_dtype)

    @staticmethod
    def _mix_backward(q, k, v, c, g, fft_dtype, need_dc):
        return toeplitz.fft_backward(q, k, v, c, g, fft_dtype, need_dc)

    @staticmethod
    def _floor(fft_dtype) -> float:
        return 32 * torch.finfo(fft_dtype).eps


class _BandAttention(_MixingAttention):
    """Exact band of offsets < L-1 by blocked matmuls plus a prefix-sum state for the clipped rest."""

    @staticmethod
    def _mix(q, k, v, c, extra):
        return toeplitz.band_forward(q, k, v, c)

    @staticmethod
    def _mix_backward(q, k, v, c, g, extra, need_dc):
        return toeplitz.band_backward(q, k, v, c, g)
