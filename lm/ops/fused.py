"""The fused chunk form: the custom op ``lm::fused_chunk`` (and its backward) around the Triton kernels of
:mod:`lm.ops.fused_kernels`, the ``fused`` method of :func:`lm.ops.kernelized_attention`.

Exact for every RPE kind in ``O(N (L + BT) (M + D))`` (``O(N^2 (M + D))`` for general RPE, like FlashAttention)
with a fixed number of kernels whatever ``N``: two in forward (far states, output), three in backward (far-state
gradients, ``dq`` with the RPE weight gradient, ``dk``/``dv``) plus a few elementwise ones. It saves only its
inputs, the output and the normaliser; backward recomputes the far states.

Runs on CUDA, or on CPU tensors when Triton interprets (``TRITON_INTERPRET=1`` set before ``triton`` is imported:
how the tests check it). :func:`fused_available` says whether it can run on a device.
"""
from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace
from typing import Optional

import torch

from lm.ops.band import window_blocks

__all__ = ["FUSED_BLOCK", "fused_available", "fused_attention"]

FUSED_BLOCK = 64
"""Rows per block ``BT`` (flash-linear-attention's chunk size: tiles fill tensor cores, states stay small)."""


_TRITON = importlib.util.find_spec("triton") is not None


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused method can run on ``device``: CUDA with Triton installed, or CPU under
    ``TRITON_INTERPRET=1``."""
    kind = torch.device(device).type
    if kind == "cuda":
        return _TRITON
    return kind == "cpu" and _TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def _kernels() -> SimpleNamespace:
    from lm.ops.fused_kernels import (ACC_FLOAT32, ACC_FLOAT64, backward_delta, backward_dkv,  # imports triton:
                                      backward_dq, far_states, far_states_backward, forward)  # only when it runs
    return SimpleNamespace(far_states=far_states, forward=forward, backward_delta=backward_delta,
                           far_states_backward=far_states_backward, backward_dq=backward_dq, backward_dkv=backward_dkv,
                           acc={torch.float32: ACC_FLOAT32, torch.float64: ACC_FLOAT64})


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.dot needs tiles of at least 16


def _settings(q: torch.Tensor, tf32: bool, block: int):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    half = q.dtype in (torch.float16, torch.bfloat16)
    prec = "tf32" if (tf32 and q.dtype == torch.float32) else "ieee"
    far_prec = "tf32" if (half or (tf32 and q.dtype == torch.float32)) else "ieee"
    upcast = half and q.device.type == "cpu"  # the interpreter's half-precision tl.dot is wrong (see _dot)
    return dict(BT=block, BM=_pow2(q.shape[-1]), PREC=prec, ACC=_kernels().acc[acc], UPCAST=upcast), far_prec, acc


def _shapes(q, v, c, block):
    B, H, N, M = q.shape
    nb = -(-N // block)
    nw = window_blocks(c.shape[-1], block)
    return B, H, N, M, v.shape[-1], c.shape[-1], nb, nw, max(nb - nw, 0)


def _run_far_states(k, v, c, starts, init, block, kw, acc):
    B, H, N, M, D, L, nb, nw, nb_far = _shapes(k, v, c, block)
    if nb_far == 0 and init is None:
        return None
    states = torch.zeros(B * H, nb_far + 1, M, D + 1, dtype=acc, device=k.device)
    if init is not None:
        states[:, 0] = init.reshape(B * H, M, D + 1)
    if nb_far:
        _kernels().far_states[(B * H,)](k, v, _or(starts, k), states, N, M, D, H, nb_far, BD=_pow2(D),
                                        HAS_DOCS=starts is not None, **kw)
    return states


def _or(x, dummy):
    """A pointer argument the kernel does not read when ``x`` is None."""
    return dummy if x is None else x


def _forward(q, k, v, c, starts, init, block, tf32):
    kw, far_prec, acc = _settings(q, tf32, block)
    B, H, N, M, D, L, nb, nw, nb_far = _shapes(q, v, c, block)
    states = _run_far_states(k, v, c, starts, init, block, kw, acc)
    out = torch.empty(B, H, N, D, dtype=v.dtype, device=v.device)
    den = torch.empty(B, H, N, dtype=acc, device=v.device)
    _kernels().forward[(nb, B * H)](q, k, v, c, _or(starts, q), _or(states, q), out, den, N, M, D, L, H, nw, nb_far,
                                    BD=_pow2(D), HAS_DOCS=starts is not None, HAS_FAR=states is not None,
                                    FAR_PREC=far_prec, TINY=torch.finfo(acc).tiny, **kw)
    return out, den


def _backward(q, k, v, c, starts, init, out, den, grad_out, block, tf32, need_dc, need_dinit):
    kw, far_prec, acc = _settings(q, tf32, block)
    B, H, N, M, D, L, nb, nw, nb_far = _shapes(q, v, c, block)
    tiny = torch.finfo(acc).tiny
    kernels = _kernels()
    grad_out = grad_out.to(out.dtype).contiguous()
    gd = torch.empty(B, H, N, dtype=acc, device=q.device)  # d loss / d normaliser
    kernels.backward_delta[(nb, B * H)](out, grad_out, den, gd, N, D, BT=block, BD=_pow2(D), ACC=kw["ACC"],
                                        TINY=tiny)
    states = _run_far_states(k, v, c, starts, init, block, kw, acc)
    ds = torch.empty(B * H, max(nb_far, 1), M, D + 1, dtype=acc, device=q.device)
    docs = dict(HAS_DOCS=starts is not None, TINY=tiny)
    if nb_far:
        kernels.far_states_backward[(B * H,)](q, grad_out, den, gd, c, _or(starts, q), ds, N, M, D, L, H, nw,
                                              nb_far, BD=_pow2(D), FAR_PREC=far_prec, **docs, **kw)
    dq = torch.empty_like(q)
    dc = torch.zeros(B * H, L, dtype=acc, device=q.device)
    kernels.backward_dq[(nb, B * H)](q, k, v, c, _or(starts, q), _or(states, q), grad_out, den, gd, dq, dc, N, M, D,
                                     L, H, nw, nb_far, BD=_pow2(D), HAS_FAR=states is not None, NEED_DC=need_dc,
                                     FAR_PREC=far_prec, **docs, **kw)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    kernels.backward_dkv[(nb, B * H)](q, k, v, c, _or(starts, q), ds, grad_out, den, gd, dk, dv, dc, N, M, D, L, H,
                                      nw, nb_far, nb, BD=_pow2(D), HAS_FAR=nb_far > 0, NEED_DC=need_dc,
                                      FAR_PREC=far_prec, **docs, **kw)
    dinit = None
    if need_dinit:  # every query row takes the initial state with weight c[L-1]
        gn = grad_out.to(acc) / den.clamp_min(tiny).unsqueeze(-1)
        g = torch.cat([gn, gd.unsqueeze(-1)], dim=-1)
        dinit = torch.einsum("bhnm,bhne->bhme", q.to(acc), g) * c[:, -1, None, None].to(acc)
    return dq, dk, dv, dc.view(B, H, L).sum(0).to(c.dtype) if need_dc else None, dinit


@torch.library.custom_op("lm::fused_chunk", mutates_args=())
def _fused_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, starts: Optional[torch.Tensor],
              init: Optional[torch.Tensor], block: int, tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused chunk form: ``(out (B, H, N, D) in v's dtype, normaliser (B, H, N) float32/64)``; weights ``c``
    ``(H, L)``, document ``starts`` ``(B, N)`` and initial far state ``init`` ``(B, H, M, D + 1)`` optional."""
    return _forward(q, k, v, c, starts, init, block, tf32)


@_fused_op.register_fake
def _fused_fake(q, k, v, c, starts, init, block, tf32):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return v.new_empty(v.shape), v.new_empty(v.shape[:-1], dtype=acc)


@torch.library.custom_op("lm::fused_chunk_backward", mutates_args=())
def _fused_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                       starts: Optional[torch.Tensor], init: Optional[torch.Tensor], out: torch.Tensor,
                       den: torch.Tensor, grad_out: torch.Tensor, block: int, tf32: bool, need_dc: bool,
                       need_dinit: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``lm::fused_chunk``: ``(dq, dk, dv, dc, dinit)``, empty where not needed."""
    dq, dk, dv, dc, dinit = _backward(q, k, v, c, starts, init, out, den, grad_out, block, tf32, need_dc,
                                      need_dinit)
    return dq, dk, dv, dc if dc is not None else q.new_empty(0), dinit if dinit is not None else q.new_empty(0)


@_fused_backward_op.register_fake
def _fused_backward_fake(q, k, v, c, starts, init, out, den, grad_out, block, tf32, need_dc, need_dinit):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(c) if need_dc else q.new_empty(0),
            torch.empty_like(init, dtype=den.dtype) if (need_dinit and init is not None) else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, c, starts, init, block, tf32 = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, c, starts, init, out, den)
    ctx.settings = (block, tf32)
    ctx.mark_non_differentiable(den)


def _autograd_backward(ctx, grad_out, _grad_den):
    q, k, v, c, starts, init, out, den = ctx.saved_tensors
    need_dc, need_dinit = ctx.needs_input_grad[3], init is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dc, dinit = torch.ops.lm.fused_chunk_backward(q, k, v, c, starts, init, out, den,
                                                              grad_out.contiguous(), *ctx.settings, need_dc,
                                                              need_dinit)
    return (dq, dk, dv, dc if need_dc else None, None, dinit.to(init.dtype) if need_dinit else None, None, None)


_fused_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                    starts: torch.Tensor | None = None, init: torch.Tensor | None = None, *,
                    block: int = FUSED_BLOCK, tf32: bool = False) -> torch.Tensor:
    """``(B, H, N, D)`` in ``v``'s dtype. q, k ``(B, H, N, M)`` and v ``(B, H, N, D)`` in one dtype (float32,
    bfloat16, float16 or float64), ``c`` ``(H, L)`` weights ``exp(bias - max)`` (float32; float64 for float64
    inputs), ``starts`` ``(B, N)`` long or None, ``init`` ``(B, H, M, D + 1)`` far sums of keys before the sequence
    (weight ``c[L-1]`` for every row; in ``c``'s dtype) or None. ``block``: rows per block, a power of two >= 16."""
    q, k, v, c = q.contiguous(), k.contiguous(), v.contiguous(), c.contiguous()
    starts = None if starts is None else starts.contiguous()
    init = None if init is None else init.contiguous()
    out, _ = torch.ops.lm.fused_chunk(q, k, v, c, starts, init, block, tf32)
    return out
