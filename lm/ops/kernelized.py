"""Causal kernelized attention with relative positional encoding: validation, method choice, the custom op.

``kernelized_attention(phi_q, phi_k, v, rpe_bias=None, method="auto")`` computes, per batch and head,

    out_i = sum_{j<=i} c(i-j) (phi_q_i . phi_k_j) v_j / sum_{j<=i} c(i-j) (phi_q_i . phi_k_j),
    c(t) = exp(rpe_bias[min(t, L-1)])    (c = 1 when rpe_bias is None).

Numerator and normaliser come out of one pass over ``u = [v, 1]``. Here the bias becomes weights (``max``
subtracted per head: it cancels in the ratio and keeps every weight <= 1) by ordinary differentiable torch,
a method is picked from the shapes and the device (:func:`choose_method`: measured crossovers on CPU, the cost
model of ``cost.py`` on GPUs), and the mixing runs in a custom op:

- ``fused``: Triton kernels of the chunk form (``fused.py``, ``fused_kernels.py``; the op ``lm::fused_chunk``);
- ``band`` / ``prefix``: exact band + prefix sums (``band.py``) with the weights ``(H, L)`` (``(H, 1)`` of
  ones for ``prefix``), in ``lm::kernelized_mix``;
- ``fft``: the same band for offsets ``< NEAR_BAND`` plus a constant ``mu`` (the smallest far weight) for all
  farther offsets, and an FFT (``fft.py``) of the far residual ``c(t) - mu >= 0`` (``precision.py`` explains
  why this keeps a float32 FFT accurate); the FFT runs in ``fft_dtype``;
- ``dense``: plain differentiable torch (``dense.py``).

Document boundaries (``documents.py``) reach every method but the FFT; a continued recurrent state enters as its
ring's keys in front of the tokens and its far sums as an initial state (every method; the FFT only while the
state holds no far keys).

The custom ops save only their inputs, the output and the normaliser; their backwards (also custom ops) recompute.
All have fake implementations whose strides match the real outputs, so ``torch.compile(fullgraph=True)`` traces
the op without graph breaks, inductor included; nothing in the op reads tensor values on the host.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lm.ops.band import band_backward, band_budget, band_forward
from lm.ops.dense import dense_attention
from lm.ops.documents import check_document_starts
from lm.ops.feature_maps import no_autocast
from lm.ops.fused import fused_attention, fused_available
from lm.ops.fft import fft_backward, fft_forward
from lm.ops.precision import NEAR_BAND, auto_fft_dtype
from lm.ops.recurrent import RecurrentState, state_after
from lm.ops.threads import CPUThreads

__all__ = ["METHODS", "RPE_METHODS", "kernelized_attention", "choose_method"]

METHODS = ("auto", "dense", "fft", "band", "prefix", "fused")
"""Every method name (``auto`` picks one of the others)."""
RPE_METHODS = ("auto", "dense", "fft", "band", "fused")
"""The methods that take an RPE: ``prefix`` is plain causal linear attention (``band`` without RPE is ``prefix``)."""

# Crossovers of method="auto" on CPU (measured: docs/op.md, "The auto rule"): dense up to these lengths, then band while
# L + BAND_OVERHEAD <= BAND_COST_PER_LOG2N * log2(N) (band costs ~N (L + 64), the FFT ~N log2 N), else FFT.
DENSE_MAX_N_NO_RPE = 160
DENSE_MAX_N = 256
BAND_COST_PER_LOG2N = 160
BAND_OVERHEAD = 64
# FFT round-off bound used for the normaliser floor (see _floor), in units of the FFT dtype's eps.
FLOOR_EPS = 32


def kernelized_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                         rpe_bias: torch.Tensor | None = None, method: str = "auto", *,
                         cu_seqlens: torch.Tensor | None = None, document_starts: torch.Tensor | None = None,
                         initial_state: RecurrentState | None = None, output_final_state: bool = False,
                         fft_dtype: torch.dtype | None = None, tf32: bool = False, cpu_threads: int = 0
                         ) -> torch.Tensor | tuple[torch.Tensor, RecurrentState]:
    """Causal kernelized attention with optional RPE.

    phi_q, phi_k: ``(B, H, N, M)`` non-negative features; v: ``(B, H, N, D)``; rpe_bias: ``None``, ``(H, L)`` or
    ``(L,)`` (shared by heads) log-weights for offsets ``0..L-1``, offsets ``>= L-1`` use the last one.
    method: ``auto`` | ``dense`` (O(N^2)) | ``fft`` (O(N log N), any L) | ``band`` (O(N L), clipped RPE) |
    ``prefix`` (O(N), only without RPE) | ``fused`` (Triton kernels of the chunk form, any L; CUDA). All are
    exact; ``auto`` picks the fastest for the shapes and device (:func:`choose_method`).
    cu_seqlens: ``(S + 1,)`` int offsets of the sequences packed in a batch of ``B = 1`` (flash-linear-attention's
    convention), or document_starts: ``(B, N)`` int, each token's document start; tokens attend only inside
    their document (:mod:`lm.ops.documents`). Not with ``fft`` (``auto`` then never picks it).
    initial_state: a :class:`lm.ops.RecurrentState` (from an earlier call's ``output_final_state``, or
    :func:`lm.ops.state_after`) that these ``N`` tokens continue: the result equals the last ``N`` rows of one call
    over all the tokens (a chunked prefill, several tokens appended to a decoding state). ``rpe_bias`` must then
    be the whole table the state was built for.
    output_final_state: also return the recurrent state after the tokens (:mod:`lm.ops.recurrent`), for an
    RPE table of ``L`` entries (all of ``rpe_bias``, also beyond ``N``), from which
    :func:`lm.ops.kernelized_attention_step` or another call with ``initial_state`` continues.
    fft_dtype: precision of the FFT method's far field: ``torch.float32`` / ``torch.float64``, or ``None`` to
    decide from the bias values (``lm.ops.precision``; one host read per call, so not under ``torch.compile``;
    the model passes the dtype its precision policy chose). float64 inputs always use float64.
    tf32: let the ``fused`` method's float32 matmuls run on TF32 tensor cores (about 1e-3 relative error instead
    of float32's 1e-6; off by default). bfloat16/float16 inputs always run the fused matmuls in their own dtype.
    cpu_threads: worker threads over (batch, head) on CPU (``lm.ops.threads.CPUThreads``): 0 =
    ``torch.get_num_threads()``, 1 = none.
    Returns ``(B, H, N, D)`` in ``v``'s dtype (and the state); computed in float32 (float64 for float64 inputs;
    the fused method's matmuls in the inputs' half dtype when all three are half), never under autocast.
    Differentiable in all four inputs (and the initial state's tensors).
    """
    _validate(phi_q, phi_k, v, rpe_bias, method, fft_dtype, cpu_threads)
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32={tf32!r}: use True or False")
    B, H, N, _ = phi_q.shape
    starts = check_document_starts(cu_seqlens, document_starts, B, N, v.device)
    if starts is not None and method == "fft":
        raise ValueError("method='fft' cannot keep documents apart (a convolution runs over the whole row); use "
                         "'auto', 'fused', 'band', 'prefix' or 'dense' with cu_seqlens / document_starts")
    if starts is not None and (output_final_state or initial_state is not None):
        raise ValueError("initial_state / output_final_state with document boundaries are not supported: a state "
                         "would mix documents; run the last document alone to continue it")
    if rpe_bias is None and method == "band":
        method = "prefix"
    table_len = 1 if rpe_bias is None else rpe_bias.shape[-1]
    if initial_state is None:
        out = _attention(phi_q, phi_k, v, rpe_bias, method, fft_dtype, tf32, cpu_threads, starts, None)
        return (out, state_after(phi_k, v, table_len)) if output_final_state else out
    ring_k, ring_v, init = _continuation(initial_state, phi_q, v, table_len, method)
    zeros = phi_q.new_zeros(B, H, ring_k.shape[2], phi_q.shape[-1])
    k_all, v_all = torch.cat([ring_k.to(phi_k.dtype), phi_k], 2), torch.cat([ring_v.to(v.dtype), v], 2)
    out = _attention(torch.cat([zeros, phi_q], 2), k_all, v_all, rpe_bias, method, fft_dtype, tf32, cpu_threads,
                     None, init)[:, :, ring_k.shape[2]:]
    if not output_final_state:
        return out
    after = state_after(k_all, v_all, table_len)  # positions counted from the first ring key
    s = initial_state
    shift = (s.position - ring_k.shape[2]) % max(s.window, 1)  # ring slots are positions modulo the window
    if shift:  # (then the ring was full, so it is allocated whole)
        after = after._replace(ring_k=after.ring_k.roll(shift, 2), ring_v=after.ring_v.roll(shift, 2))
    return out, after._replace(position=s.position + N, far_kv=after.far_kv + s.far_kv.to(after.far_kv.dtype),
                               far_k=after.far_k + s.far_k.to(after.far_k.dtype))


def _continuation(state: RecurrentState, phi_q: torch.Tensor, v: torch.Tensor, table_len: int, method: str):
    """The ring's keys and values in position order ``(B, H, r, M)``, ``(B, H, r, D)`` (``r = min(position, R)``),
    and the far sums as ``(B, H, M, D + 1)`` (None while no key is that far)."""
    if not isinstance(state, RecurrentState):
        raise ValueError(f"initial_state must be an lm.ops.RecurrentState, got {type(state).__name__}")
    B, H, _, M = phi_q.shape
    D = v.shape[-1]
    if state.window != table_len - 1:
        raise ValueError(f"initial_state was built for an RPE table of {state.window + 1} entries, rpe_bias has "
                         f"{table_len}: pass the whole table")
    if tuple(state.far_kv.shape) != (B, H, M, D):
        raise ValueError(f"initial_state holds (B, H, M, D) = {tuple(state.far_kv.shape)}, the inputs "
                         f"({B}, {H}, {M}, {D})")
    if state.far_kv.device != v.device:
        raise ValueError(f"initial_state is on {state.far_kv.device} but v is on {v.device}")
    R, n0 = state.window, state.position
    r = min(n0, R)
    slots = (torch.arange(n0 - r, n0, device=v.device) % R) if r else torch.zeros(0, dtype=torch.long,
                                                                                  device=v.device)
    ring_k, ring_v = state.ring_k.index_select(2, slots), state.ring_v.index_select(2, slots)
    if n0 <= R:
        return ring_k, ring_v, None
    if method == "fft":
        raise ValueError("method='fft' cannot continue a state that holds far keys (its band weighs them with the "
                         "far residual's floor, not c[L-1]); use 'auto', 'fused', 'band' or 'dense'")
    return ring_k, ring_v, torch.cat([state.far_kv, state.far_k.unsqueeze(-1)], dim=-1)


def _attention(phi_q, phi_k, v, rpe_bias, method, fft_dtype, tf32, cpu_threads, starts, init) -> torch.Tensor:
    B, H, N, M = phi_q.shape
    dtypes = (phi_q.dtype, phi_k.dtype, v.dtype)
    compute = torch.float64 if torch.float64 in dtypes else torch.float32
    with no_autocast(v.device):
        bias = None
        if rpe_bias is not None:
            bias = rpe_bias.to(compute)
            bias = bias.expand(H, -1) if bias.dim() == 1 else bias
            if init is None:
                bias = bias[:, :N]  # offsets never exceed N - 1; a longer bias gets zero gradient there
            bias = bias - bias.amax(-1, keepdim=True).detach()
        if init is not None:
            init = init.to(compute)
        if method == "auto":
            method = choose_method(N, None if bias is None else min(bias.shape[-1], N), v.device,
                                   documents=starts is not None, continues=init is not None,
                                   batch_heads=B * H, features=M, head_dim=v.shape[-1],
                                   dtype=phi_q.dtype if len(set(dtypes)) == 1 else compute)
        if method == "fused":
            if not fused_available(v.device):
                raise ValueError(f"method='fused' runs Triton kernels: on CUDA with triton installed (on CPU only "
                                 f"under TRITON_INTERPRET=1, for tests); on {v.device} use 'auto'")
            half = len(set(dtypes)) == 1 and dtypes[0] in (torch.float16, torch.bfloat16)
            dt = dtypes[0] if half else compute
            c = torch.ones(H, 1, dtype=compute, device=v.device) if bias is None else bias.exp()
            return fused_attention(phi_q.to(dt), phi_k.to(dt), v.to(dt), c, starts, init, tf32=tf32).to(v.dtype)
        q, k, val = phi_q.to(compute), phi_k.to(compute), v.to(compute)
        if method == "dense":
            return dense_attention(q, k, val, bias, starts, init).to(v.dtype)
        if method in ("band", "prefix"):
            c = torch.ones(H, 1, dtype=compute, device=v.device) if bias is None else bias.exp()
            out, _ = torch.ops.lm.kernelized_mix(q, k, val, c, None, starts, init, compute, 0, cpu_threads)
            return out.to(v.dtype)
        if compute == torch.float64:
            fft_dtype = torch.float64
        elif fft_dtype is None:
            if torch.compiler.is_compiling() or v.device.type == "meta":
                raise RuntimeError(
                    "kernelized_attention(method='fft', fft_dtype=None) decides the FFT precision by reading "
                    "rpe_bias on the host, which torch.compile(fullgraph=True) and the meta device cannot do; "
                    "pass fft_dtype=torch.float32 or torch.float64 (the model passes its precision policy's "
                    "choice: lm.ops.precision, Transformer.refresh_precision_policy)")
            fft_dtype = auto_fft_dtype(bias, N, k, val)
        c_band, r = _near_far(bias, H, N, compute, v.device)
        out, _ = torch.ops.lm.kernelized_mix(q, k, val, c_band, r, None, None, fft_dtype, min(NEAR_BAND, N),
                                             cpu_threads)
    return out.to(v.dtype)


def choose_method(n: int, num_offsets: int | None, device: torch.device | str = "cpu", *, documents: bool = False,
                  continues: bool = False, batch_heads: int = 8, features: int = 64, head_dim: int = 64,
                  dtype: torch.dtype = torch.float32) -> str:
    """The fastest exact method for length ``n`` and ``num_offsets = min(L, n)`` (None: no RPE) on ``device``.

    On CPU: the crossovers measured there (:data:`DENSE_MAX_N` etc.; docs/op.md, "The auto rule"). On other
    devices: the cheapest by the GPU cost model (:func:`lm.ops.cost.cheapest`, an H100 SXM's bandwidth and peaks)
    among the methods that can run the call, for ``batch_heads = B * H`` items of ``features`` and ``head_dim`` in
    ``dtype``; ``fused`` only where Triton runs. ``documents``: the call has document boundaries;
    ``continues``: it continues a state holding far keys (neither can take the FFT)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        from lm.ops.cost import cheapest
        return cheapest(n, num_offsets, batch_heads, features, head_dim, dtype, documents, continues,
                        fused_available(dev))
    if num_offsets is None:
        return "dense" if n <= DENSE_MAX_N_NO_RPE else "prefix"
    if n <= DENSE_MAX_N and 4 * num_offsets > n:
        return "dense"
    if documents or continues or num_offsets + BAND_OVERHEAD <= BAND_COST_PER_LOG2N * math.log2(max(n, 2)):
        return "band"
    return "fft"


def _near_far(bias: torch.Tensor | None, H: int, N: int, dtype, device):
    """Weights of the FFT method: ``c_band (H, K + 1)`` = exact weights of offsets ``< K`` and the smallest far
    weight ``mu`` (band form: offsets ``>= K`` weigh ``mu``), and the far residual ``r (H, N)`` = ``c - mu >= 0``
    on offsets ``>= K``, 0 below (None when ``N <= K``). All parts are non-negative, so nothing cancels between
    the exact band and the FFT. Differentiable in ``bias``."""
    offsets = torch.arange(N, device=device)
    c = (torch.ones(H, N, dtype=dtype, device=device) if bias is None
         else bias[:, offsets.clamp(max=bias.shape[-1] - 1)].exp())
    K = NEAR_BAND
    if N <= K:
        return c, None
    far = c[:, K:]
    mu = far.amin(-1, keepdim=True)
    r = torch.cat([torch.zeros(H, K, dtype=dtype, device=device), far - mu], dim=-1)
    return torch.cat([c[:, :K], mu], dim=-1), r


def _validate(phi_q, phi_k, v, rpe_bias, method, fft_dtype, cpu_threads) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}")
    if fft_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"fft_dtype={fft_dtype}: use torch.float32, torch.float64 or None (decide from the bias)")
    if not isinstance(cpu_threads, int) or cpu_threads < 0:
        raise ValueError(f"cpu_threads={cpu_threads!r}: use 0 (torch.get_num_threads()) or a positive count")
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
        if method not in RPE_METHODS:
            raise ValueError(f"method={method!r} is plain causal linear attention and takes no rpe_bias; use one of "
                             f"{list(RPE_METHODS)} with an RPE")


# ------------------------------------------------------------------------------------------- the custom op

def _floor(q: torch.Tensor, k: torch.Tensor, far_field: bool, fft_dtype: torch.dtype, near: int) -> torch.Tensor:
    """Lower bound ``(B, H, N)`` for the normaliser: round-off can push a tiny one to <= 0. On rows that take
    the FFT far field (``>= near``), ``FLOOR_EPS * eps * q_i . sum_{j <= i} k_j`` (the scale of the FFT's
    round-off, every |weight| being <= 1; over past keys only, so that no later key moves an earlier row's
    floor); exact rows need only ``tiny`` (then an all-underflowed normaliser has a zero numerator too)."""
    tiny = torch.finfo(q.dtype).tiny
    floor = torch.full(q.shape[:-1], tiny, dtype=q.dtype, device=q.device)
    if far_field:
        scale = (q[:, :, near:] * k.cumsum(2)[:, :, near:]).sum(-1)
        floor[:, :, near:] += scale * (FLOOR_EPS * torch.finfo(fft_dtype).eps)
    return floor


def _mix_impl(q, k, v, c_band, r, starts, init, fft_dtype, near, cpu_threads):
    """Forward of the custom op: ``(out (B, H, N, D), normaliser (B, H, N))`` in ``q``'s dtype, contiguous."""
    y = band_forward(q, k, v, c_band, band_budget(q.device), starts=starts, init=init)
    if r is not None:
        workers = CPUThreads(cpu_threads).resolve(q.shape[0] * q.shape[1])
        wide = torch.promote_types(q.dtype, fft_dtype)
        y_far = fft_forward(q, k, v, r, fft_dtype, workers)
        y = y.to(wide)
        y[:, :, near:] += y_far[:, :, near:]  # rows < near have no offset >= near: only round-off there
    den = torch.maximum(y[..., -1], _floor(q, k, r is not None, fft_dtype, near).to(y.dtype))
    out = y[..., :-1] / den.unsqueeze(-1)
    return out.to(q.dtype).contiguous(), den.to(q.dtype).contiguous()


def _mix_backward_impl(q, k, v, c_band, r, starts, init, out, den, grad_out, fft_dtype, near, cpu_threads, need_dc,
                       need_dr):
    """Backward of the custom op: ``(dq, dk, dv, dc_band, dr, dinit)``, contiguous (as the fake says: inductor relies on
    it); an empty tensor where no gradient is needed."""
    clamped = den <= _floor(q, k, r is not None, fft_dtype, near)  # where the floor acted, den gets no gradient
    B, H, N, D = out.shape
    g = torch.empty(B, H, N, D + 1, dtype=q.dtype, device=q.device)  # d out / d [numerator, normaliser]
    g_num = torch.div(grad_out.to(q.dtype), den.unsqueeze(-1), out=g[..., :-1])
    g[..., -1] = -(g_num * out).sum(-1).masked_fill_(clamped, 0)
    dq, dk, dv, dc, dinit = band_backward(q, k, v, c_band, g, band_budget(q.device), need_dc, starts=starts,
                                          init=init)
    dr = None
    if r is not None:
        workers = CPUThreads(cpu_threads).resolve(B * H)
        g[:, :, :near] = 0  # the far field was not added to rows < near
        dq2, dk2, dv2, dr = fft_backward(q, k, v, r, g, fft_dtype, need_dr, workers)
        dq, dk, dv = dq + dq2.to(q.dtype), dk + dk2.to(q.dtype), dv + dv2.to(q.dtype)
        dr = dr.to(q.dtype) if need_dr else None
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(), dc.contiguous() if dc is not None else q.new_empty(0),
            dr.contiguous() if dr is not None else q.new_empty(0),
            dinit.contiguous() if dinit is not None else q.new_empty(0))


@torch.library.custom_op("lm::kernelized_mix", mutates_args=())
def _mix_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c_band: torch.Tensor, r: Optional[torch.Tensor],
            starts: Optional[torch.Tensor], init: Optional[torch.Tensor], fft_dtype: torch.dtype, near: int,
            cpu_threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Band (weights ``c_band (H, L)``) plus optional FFT far field (weights ``r (H, N)``, added to rows
    ``>= near``) mixing of ``[v, 1]``, normalised: ``(out (B, H, N, D), normaliser (B, H, N))``. ``starts``
    ``(B, N)``: document starts (band only); ``init`` ``(B, H, M, D + 1)``: far sums of keys before the sequence."""
    return _mix_impl(q, k, v, c_band, r, starts, init, fft_dtype, near, cpu_threads)


@_mix_op.register_fake
def _mix_fake(q, k, v, c_band, r, starts, init, fft_dtype, near, cpu_threads):
    return v.new_empty(v.shape), v.new_empty(v.shape[:-1])


@torch.library.custom_op("lm::kernelized_mix_backward", mutates_args=())
def _mix_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c_band: torch.Tensor,
                     r: Optional[torch.Tensor], starts: Optional[torch.Tensor], init: Optional[torch.Tensor],
                     out: torch.Tensor, den: torch.Tensor, grad_out: torch.Tensor, fft_dtype: torch.dtype, near: int,
                     cpu_threads: int, need_dc: bool, need_dr: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``lm::kernelized_mix`` by recomputation: ``(dq, dk, dv, dc_band, dr, dinit)`` (empty when
    not needed)."""
    return _mix_backward_impl(q, k, v, c_band, r, starts, init, out, den, grad_out, fft_dtype, near, cpu_threads,
                              need_dc, need_dr)


@_mix_backward_op.register_fake
def _mix_backward_fake(q, k, v, c_band, r, starts, init, out, den, grad_out, fft_dtype, near, cpu_threads, need_dc,
                       need_dr):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            c_band.new_empty(c_band.shape) if need_dc else q.new_empty(0),
            r.new_empty(r.shape) if (need_dr and r is not None) else q.new_empty(0),
            init.new_empty(init.shape) if init is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, c_band, r, starts, init, fft_dtype, near, cpu_threads = inputs
    out, den = output
    ctx.save_for_backward(q, k, v, c_band, r, starts, init, out, den)
    ctx.settings = (fft_dtype, near, cpu_threads)
    ctx.mark_non_differentiable(den)


def _backward(ctx, grad_out, _grad_den):
    q, k, v, c_band, r, starts, init, out, den = ctx.saved_tensors
    need_dc, need_dr = ctx.needs_input_grad[3], r is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dc, dr, dinit = torch.ops.lm.kernelized_mix_backward(q, k, v, c_band, r, starts, init, out, den,
                                                                     grad_out, *ctx.settings, need_dc, need_dr)
    return (dq, dk, dv, dc if need_dc else None, dr if need_dr else None, None,
            dinit if init is not None else None, None, None, None)


_mix_op.register_autograd(_backward, setup_context=_setup_context)
