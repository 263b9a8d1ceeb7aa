"""Causal Toeplitz mixing by FFT, ``Y_i = sum_{j<=i} r(i-j) (q_i . k_j) u_j``, and its exact gradients.

Used for the far field of general RPE (``kernelized.py`` passes weights that are zero on the exact near band).
Shapes, with ``E = D + 1`` (``u = [v, 1]``, so the normaliser comes out of the same pass) and ``P = B * H``
independent items:

- ``q``, ``k``: ``(B, H, N, M)``; ``v``: ``(B, H, N, D)``; ``r``: ``(H, N)`` weights of offsets ``0..N-1`` (any
  sign); ``g``: ``(B, H, N, E)`` gradient of ``Y``. Results are in ``fft_dtype``.

Each of the ``M * E`` channels ``x = k_m u_e`` of an item is zero-padded to ``nfft >= 2N - 1`` (no wrap-around),
transformed, multiplied by the spectrum of ``r`` and transformed back; ``Y_e += q_m * s``. Nothing of size
``P * M * E * N`` is ever held: the channel grid is cut into tiles ``(items, features, columns)`` under a memory
budget, and backward recomputes. Two schedules share the tile code:

- batched (GPU, and ``meta`` in tests): tiles span many items at once, :data:`FFT_WORKSPACE_BYTES` per tile, so
  the number of kernels is about ``work / budget`` and never one loop turn per (batch, head);
- CPU: items are split over worker threads (:mod:`lm.ops.threads`), each running cache-sized tiles of
  :data:`FFT_TILE_CPU` numbers.

Plain tensor code without autograd; no host reads, no value-dependent branches.
"""
from __future__ import annotations

import functools

import torch

from lm.ops.threads import run_items

__all__ = ["FFT_TILE_CPU", "FFT_WORKSPACE_BYTES", "fft_size", "tile_shape", "fft_forward", "fft_backward"]

FFT_TILE_CPU = 2**19
"""Numbers in one zero-padded tile on CPU (2 MiB of float32): the few buffers of a step stay in cache."""
FFT_WORKSPACE_BYTES = 2**28
"""Bytes of one zero-padded tile in the batched schedule (256 MiB; the spectra and products of a step make
the working set about 6x that in backward)."""


def fft_size(n: int) -> int:
    """Smallest length ``>= n`` of the form ``2^a`` or ``3 * 2^a`` (both fast; larger odd factors are slow)."""
    p = 1 << max(0, (n - 1).bit_length())
    three = 3 << max(0, (-(-n // 3) - 1).bit_length())
    return min(p, three)


@functools.lru_cache(maxsize=256)
def tile_shape(items: int, M: int, E: int, nfft: int, budget: int) -> tuple[int, int, int]:
    """Tile ``(items, features, columns)`` with at most ``budget`` numbers (``x nfft``) that needs the fewest
    tiles to cover ``items x M x E``; ties go to fewer items per tile."""
    per = max(1, budget // nfft)
    best = None
    for ec in range(1, E + 1):
        for mc in range(1, M + 1):
            if mc * ec > per:
                break
            pc = min(items, per // (mc * ec))
            count = -(-items // pc) * -(-M // mc) * -(-E // ec)
            key = (count, pc, -(mc * ec))
            if best is None or key < best[0]:
                best = (key, (pc, mc, ec))
    return best[1]


def _part(x: torch.Tensor, a: int, b: int, c0: int | None = None, c1: int | None = None) -> torch.Tensor:
    """``x[a:b, c0:c1]`` without dispatching slices that take everything (each one is a kernel-free op, but
    still a dispatch, and a tile makes many)."""
    if a != 0 or b != x.shape[0]:
        x = x[a:b]
    if c0 is not None and (c0 != 0 or c1 != x.shape[1]):
        x = x[:, c0:c1]
    return x


class _Tiles:
    """Zero-padded buffers for one tile shape. Only ``[..., :N]`` is ever written, so the tail stays zero and
    a transform needs no padding copy."""

    def __init__(self, n: int, nfft: int, shape: tuple[int, int, int], dtype, device, count: int):
        self.n, self.nfft, self.shape = n, nfft, shape
        self.pads = [torch.zeros(*shape, nfft, dtype=dtype, device=device) for _ in range(count)]
        self.heads = [pad[..., :n] for pad in self.pads]  # the written part, one view for all tiles

    def spectrum(self, i: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """rfft of the zero-padded outer products ``a (p, mc, 1, N) x b (p, 1, ec, N)`` -> ``(p, mc, ec, F)``."""
        p, mc, ec = a.shape[0], a.shape[1], b.shape[2]
        full = (p, mc, ec) == self.shape
        pad = self.pads[i] if full else self.pads[i][:p, :mc, :ec]
        torch.mul(a, b, out=self.heads[i] if full else pad[..., : self.n])
        return torch.fft.rfft(pad)

    def inverse(self, spec: torch.Tensor) -> torch.Tensor:
        """First ``N`` samples of irfft: ``(p, mc, ec, F)`` -> ``(p, mc, ec, N)``."""
        return torch.fft.irfft(spec, n=self.nfft)[..., : self.n]

    def blocks(self, start: int, stop: int, M: int, E: int):
        """Index ranges ``(a, b, m0, m1, e0, e1)`` of the tiles covering items ``start..stop-1``."""
        pc, mc, ec = self.shape
        for a in range(start, stop, pc):
            for m0 in range(0, M, mc):
                for e0 in range(0, E, ec):
                    yield a, min(stop, a + pc), m0, min(M, m0 + mc), e0, min(E, e0 + ec)


def _plan(items: int, M: int, E: int, n: int, dtype: torch.dtype, device: torch.device, workers: int):
    """Tile shape and item split: ``(per_call_items, budget)`` for the CPU or the batched schedule."""
    nfft = fft_size(2 * n - 1)
    if device.type == "cpu":
        per_worker = -(-items // max(1, workers))
        return nfft, tile_shape(per_worker, M, E, nfft, FFT_TILE_CPU), max(1, workers)
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    return nfft, tile_shape(items, M, E, nfft, FFT_WORKSPACE_BYTES // itemsize), 1


def _items(x: torch.Tensor, dtype: torch.dtype, ones_column: bool = False) -> torch.Tensor:
    """``(B, H, N, C)`` -> contiguous ``(B * H, C (+1), N)`` in ``dtype`` (the FFT runs along the last axis)."""
    B, H, N, C = x.shape
    out = torch.empty(B * H, C + int(ones_column), N, dtype=dtype, device=x.device)
    out[:, :C].copy_(x.reshape(B * H, N, C).transpose(1, 2))
    if ones_column:
        out[:, C].fill_(1)
    return out


def _weight_spectrum(r: torch.Tensor, B: int, nfft: int, dtype: torch.dtype) -> torch.Tensor:
    """rfft of ``r (H, N)`` for every item: ``(B * H, F)``."""
    rf = torch.fft.rfft(r.to(dtype), n=nfft)
    return rf.expand(B, *rf.shape).reshape(-1, rf.shape[-1])


def fft_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, fft_dtype: torch.dtype,
                workers: int = 1) -> torch.Tensor:
    """``Y (B, H, N, E)`` in ``fft_dtype`` (a transposed view). ``workers``: CPU worker threads over items."""
    B, H, N, M = q.shape
    E, P = v.shape[-1] + 1, B * H
    nfft, shape, workers = _plan(P, M, E, N, fft_dtype, q.device, workers)
    rf = _weight_spectrum(r, B, nfft, fft_dtype)[:, None, None]  # (P, 1, 1, F)
    qt, kt, ut = _items(q, fft_dtype), _items(k, fft_dtype), _items(v, fft_dtype, ones_column=True)
    y = torch.zeros(P, E, N, dtype=fft_dtype, device=q.device)
    q4, k4, u4 = qt[:, :, None], kt[:, :, None], ut[:, None]  # (P, M, 1, N), (P, M, 1, N), (P, 1, E, N)

    def run(start: int, stop: int) -> None:
        ws = _Tiles(N, nfft, shape, fft_dtype, q.device, 1)
        for a, b, m0, m1, e0, e1 in ws.blocks(start, stop, M, E):
            spec = ws.spectrum(0, _part(k4, a, b, m0, m1), _part(u4, a, b).narrow(2, e0, e1 - e0))
            s = ws.inverse(spec.mul_(_part(rf, a, b)))
            _part(y, a, b, e0, e1).add_(s.mul_(_part(q4, a, b, m0, m1)).sum(1))

    run_items(run, P, workers)
    return y.view(B, H, E, N).transpose(-1, -2)


def fft_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, g: torch.Tensor,
                 fft_dtype: torch.dtype, need_dr: bool = True, workers: int = 1):
    """Gradients ``(dq, dk, dv, dr)`` of ``sum(g * Y)`` with ``Y = fft_forward(q, k, v, r)``, in ``fft_dtype``.

    Per channel ``x = k_m u_e``: ``s = r * x`` (causal convolution) is recomputed for ``dq``; ``ds = q_m g_e``;
    ``dx_j = sum_{i>=j} r(i-j) ds_i`` is the anti-causal correlation (``conj(R)`` in frequency); ``dr(t) =
    sum_i ds_i x_{i-t}`` summed over channels and batch accumulates as ``conj(X) dS`` and is transformed once.
    dq, dk ``(B, H, N, M)``, dv ``(B, H, N, D)``, dr ``(H, N)`` (None unless ``need_dr``)."""
    B, H, N, M = q.shape
    E, P = v.shape[-1] + 1, B * H
    nfft, shape, workers = _plan(P, M, E, N, fft_dtype, q.device, workers)
    rf = _weight_spectrum(r, B, nfft, fft_dtype)[:, None, None]  # (P, 1, 1, F)
    rf_conj = rf.conj().resolve_conj()
    qt, kt, gt = _items(q, fft_dtype), _items(k, fft_dtype), _items(g, fft_dtype)
    ut = _items(v, fft_dtype, ones_column=True)
    dq, dk = torch.zeros_like(qt), torch.zeros_like(kt)
    du = torch.zeros_like(ut)
    acc = torch.zeros(P, rf.shape[-1], dtype=rf.dtype, device=q.device) if need_dr else None
    q4, k4, u4, g4 = qt[:, :, None], kt[:, :, None], ut[:, None], gt[:, None]

    def run(start: int, stop: int) -> None:
        ws = _Tiles(N, nfft, shape, fft_dtype, q.device, 2)
        for a, b, m0, m1, e0, e1 in ws.blocks(start, stop, M, E):
            kk, qq = _part(k4, a, b, m0, m1), _part(q4, a, b, m0, m1)  # (p, mc, 1, N)
            uu, gg = _part(u4, a, b).narrow(2, e0, e1 - e0), _part(g4, a, b).narrow(2, e0, e1 - e0)  # (p, 1, ec, N)
            xf = ws.spectrum(0, kk, uu)  # (p, mc, ec, F)
            s = ws.inverse(xf * _part(rf, a, b))
            _part(dq, a, b, m0, m1).add_(s.mul_(gg).sum(2))
            dsf = ws.spectrum(1, qq, gg)
            if need_dr:
                _part(acc, a, b).add_(xf.conj_physical_().mul_(dsf).sum((1, 2)))
            dx = ws.inverse(dsf.mul_(_part(rf_conj, a, b)))
            _part(dk, a, b, m0, m1).add_((dx * uu).sum(2))
            _part(du, a, b, e0, e1).add_(dx.mul_(kk).sum(1))

    run_items(run, P, workers)
    dr = torch.fft.irfft(acc.view(B, H, -1).sum(0), n=nfft)[..., :N] if need_dr else None

    def back(x: torch.Tensor, C: int) -> torch.Tensor:
        return x[:, :C].view(B, H, C, N).transpose(-1, -2)

    return back(dq, M), back(dk, M), back(du, E - 1), dr
