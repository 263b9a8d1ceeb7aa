"""When a float32 FFT is accurate enough for the far field of an RPE bias: a host-side criterion.

The FFT method splits the weights ``c(t) = exp(b(t) - max b)`` into an exact near band (offsets
``< NEAR_BAND``, summed by the band form, which also carries a constant ``mu``, the smallest far weight, for
every offset ``>= NEAR_BAND`` through prefix sums) and a far-field residual ``r(t) = c(t) - mu >= 0`` for
offsets ``>= NEAR_BAND``, convolved by FFT (a flat bias leaves no residual; no part is negative, so nothing
cancels). FFT round-off is absolute: it adds about ``eps * |r|_2 * |x|_2`` to every
position alike, where ``x`` is a channel ``k_m u_e`` over the whole sequence (``|x|_2 ~ sqrt(N)``). A
position's own normaliser is at least its near-band mass ``S = sum_{t < NEAR_BAND} c(t)`` (times its feature
products), and rows below ``NEAR_BAND`` take no far field at all. So the worst relative error of a position
scales like ``eps * risk`` with

    risk(N) = sqrt(N * sum_{NEAR_BAND <= t < N} (c(t) - mu)^2) / sum_{t < NEAR_BAND} c(t)

(largest over heads). Decaying biases (what LMs learn) keep the far residual small against the near mass;
flat ones have no residual at all; biases that rise with distance, spiky or i.i.d. random ones put weight far
from the diagonal and need float64. The constant between ``eps * risk`` and the measured error, and so
:data:`FP32_MAX_RISK`, come from the measurements in docs/op.md ("FFT precision policy") and are checked by
``tests/test_ops_precision.py``.

``risk`` grows with ``N``, so the answer for one bias is a length: :func:`fp32_max_lengths` returns, for each
table, the largest power-of-two length up to which float32 is safe. Computing it reads the tables (one
device-to-host copy for all of them): call it outside the hot path (once per optimizer step, see
``Transformer.refresh_precision_policy``), never inside the op.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["NEAR_BAND", "FP32_MAX_RISK", "MAX_LENGTH", "LENGTHS", "far_field_risk", "safe_length",
           "fp32_max_lengths", "updated_policy", "data_range", "auto_fft_dtype"]

NEAR_BAND = 64
"""Offsets ``< NEAR_BAND`` of the FFT method are summed exactly by the band form (where a decaying bias keeps
its mass), the FFT carries only offsets ``>= NEAR_BAND``."""
FP32_MAX_RISK = 300.0
"""Largest ``risk`` run with a float32 FFT. Measured over 18 bias families at N = 4096 and 16384 and 6 at 65536
(docs/op.md, "FFT precision policy"; ``tools/bench_fft_precision.py``): worst per-position error <= 1e-6 + 0.98 *
eps * risk, so 300 keeps it <= 4e-5 (target 1e-4)."""
DATA_RANGE_TYPICAL = 1.2
"""``data_range`` of the calibration inputs (uniform features, Gaussian values: 1.07 - 1.11)."""
MAX_LENGTH = 2**24
"""Longest length the policy vouches for; longer sequences use a float64 FFT."""
LENGTHS = tuple(2**j for j in range(int(math.log2(NEAR_BAND)), int(math.log2(MAX_LENGTH)) + 1))


def _clamped_prefix(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_{t < m} c[..., min(t, L-1)]`` for every ``m`` in the 1-D long tensor ``m``: ``(..., len(m))``."""
    L = c.shape[-1]
    prefix = torch.nn.functional.pad(c.cumsum(-1), (1, 0))  # (..., L + 1), prefix[i] = sum_{t<i}
    inside = prefix[..., m.clamp(max=L)]
    return inside + (m - L).clamp(min=0).to(c.dtype) * c[..., -1:]


def far_field_risk(table: torch.Tensor, lengths: Sequence[int] = LENGTHS) -> torch.Tensor:
    """``risk`` (see the module docstring) of one bias table ``(H, L)`` or ``(L,)`` at each length:
    ``(len(lengths),)`` float64 on the table's device, the largest over heads (0 where ``N <= NEAR_BAND``)."""
    b = table.detach().double()
    b = b[None] if b.dim() == 1 else b
    c = torch.exp(b - b.amax(-1, keepdim=True))  # (H, L)
    L = c.shape[-1]
    n = torch.tensor(list(lengths), device=c.device)
    near = torch.full_like(n, NEAR_BAND)
    s_near = _clamped_prefix(c, torch.minimum(n, near))
    # mu(N): the smallest weight over offsets NEAR_BAND..N-1 (clamped to the table).
    tail = torch.cat([c[:, NEAR_BAND:L], c[:, -1:]], dim=-1).cummin(-1).values  # min over K..K+i
    mu = tail[:, (n - 1 - NEAR_BAND).clamp(0, tail.shape[-1] - 1)]
    far1 = _clamped_prefix(c, n) - _clamped_prefix(c, near)
    far2 = _clamped_prefix(c * c, n) - _clamped_prefix(c * c, near)
    count = (n - NEAR_BAND).clamp(min=0).to(c.dtype)
    residual = (far2 - 2 * mu * far1 + count * mu * mu).clamp(min=0)  # sum (c - mu)^2 over the far offsets
    risk = torch.sqrt(n.to(c.dtype) * residual) / s_near
    risk = torch.where(n > NEAR_BAND, risk, torch.zeros((), dtype=c.dtype, device=c.device))
    return risk.amax(0)


def safe_length(risks: Sequence[float], max_risk: float = FP32_MAX_RISK) -> int:
    """The largest length of ``LENGTHS`` whose risk (a row of :func:`far_field_risk`) is at most ``max_risk``;
    ``NEAR_BAND // 2`` if none (every FFT then runs in float64). Risk grows with N, so safe lengths are a
    prefix of ``LENGTHS``."""
    ok = [n for n, r in zip(LENGTHS, risks) if r <= max_risk]
    return max(ok) if ok else NEAR_BAND // 2


def fp32_max_lengths(tables: Sequence[torch.Tensor], max_risk: float = FP32_MAX_RISK) -> list[int]:
    """For each bias table (``(H, L)`` or ``(L,)``), the longest length that may use a float32 FFT
    (:func:`safe_length`). One device-to-host copy for all tables."""
    if not tables:
        return []
    rows = torch.stack([far_field_risk(t) for t in tables]).tolist()
    return [safe_length(row, max_risk) for row in rows]


def updated_policy(current: int, risks: Sequence[float]) -> int:
    """Next value of a layer's ``fft_fp32_max_len`` given its risk row: lowered at once to stay accurate, raised
    only when the longer length is safe with a 2x margin, so a bias near the threshold cannot flip it step after
    step (``torch.compile`` recompiles the layer when it changes)."""
    hi, lo = safe_length(risks, FP32_MAX_RISK), safe_length(risks, FP32_MAX_RISK / 2)
    return hi if current > hi else max(current, lo)


def data_range(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """How far the inputs break the risk model's assumption of one magnitude along the sequence (0-dim tensor).

    Position ``j`` feeds the FFT channels with magnitude ``A_j = |k_j|_1 (1 + |v_j|_2)``; round-off grows with
    their RMS over the sequence, a normaliser with the local ``A`` near its row. Returns the largest over
    (batch, head) of ``rms_j A_j / min`` over blocks of ``NEAR_BAND`` positions of the block mean of ``A``."""
    a = k.detach().double().abs().sum(-1) * (1 + v.detach().double().norm(dim=-1))  # (B, H, N)
    n = a.shape[-1]
    blocks = torch.nn.functional.pad(a, (0, -n % NEAR_BAND), value=float("inf")).unflatten(-1, (-1, NEAR_BAND))
    counts = torch.isfinite(blocks).sum(-1).clamp(min=1)
    local = torch.where(torch.isfinite(blocks), blocks, torch.zeros((), dtype=a.dtype, device=a.device))
    local = (local.sum(-1) / counts).amin(-1)
    rms = a.square().mean(-1).sqrt()
    return (rms / local.clamp(min=torch.finfo(a.dtype).tiny)).amax()


def auto_fft_dtype(bias: torch.Tensor | None, n: int, k: torch.Tensor | None = None,
                   v: torch.Tensor | None = None) -> torch.dtype:
    """float32 or float64 for one call of the FFT method at length ``n``, for direct callers of the op: reads
    ``bias`` and, given ``k`` and ``v``, their :func:`data_range` (float64 when inputs of very different sizes
    along the sequence would make the round-off of large positions swamp small ones). The model instead uses a
    policy from the bias alone, refreshed outside the hot path."""
    if n <= NEAR_BAND:
        return torch.float32
    risk = far_field_risk(bias, [n])[0] if bias is not None else torch.zeros((), dtype=torch.float64)
    if k is not None and v is not None:
        risk = torch.maximum(risk, torch.ones_like(risk)) * (data_range(k, v) / DATA_RANGE_TYPICAL).clamp(min=1)
    return torch.float32 if float(risk) <= FP32_MAX_RISK else torch.float64
