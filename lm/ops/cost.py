"""What each method of the op costs on a GPU, predicted from the shapes: kernels, bytes, flops, time.

A roofline model: every kernel takes ``max(bytes / bandwidth, matmul flops / (efficiency * peak))``, summed over the
kernels of one forward + backward (the default efficiency, 40% of the tensor-core peak, is the figure used for
FlashAttention-2 in ``fa2_cost``). Bytes are what each kernel must read and write once; tiles a fused kernel re-reads
from L2 are not counted, nor is launch latency (the kernel count is reported beside the time for that). The GPU's
bandwidth and peaks are parameters (:class:`GPU`, an H100 SXM by default); ``tools/gpu_check.sh`` measures the
methods on a real GPU next to these predictions.

Two sources, one per kind of method:

- ``fused`` (Triton kernels, :mod:`lm.ops.fused`): counted from the kernels' loops (:func:`fused_cost`);
- ``dense``, ``band``, ``prefix``, ``fft`` (torch kernels): counted by running the method forward + backward on the
  ``meta`` device under a dispatch mode that adds up every kernel's tensors and flops (:func:`counted_cost`).

:func:`cheapest` is how ``method="auto"`` chooses on GPUs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from lm.ops.band import window_blocks
from lm.ops.fused import FUSED_BLOCK

__all__ = ["GPU", "H100_SXM", "Shape", "Cost", "fused_cost", "counted_cost", "method_cost", "fa2_cost", "cheapest",
           "CostCounter"]


@dataclasses.dataclass(frozen=True)
class GPU:
    """Bandwidth (bytes/s) and dense peaks (flop/s) of one GPU; ``efficiency``: the fraction of a peak that tiled
    matmul kernels reach."""

    name: str = "H100 SXM"
    bandwidth: float = 3.35e12
    bf16: float = 989e12
    tf32: float = 494e12
    fp32: float = 67e12
    fp64: float = 67e12
    efficiency: float = 0.4

    def peak(self, dtype: torch.dtype, tf32: bool = False) -> float:
        """Matmul peak for inputs of ``dtype``."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16
        if dtype == torch.float64:
            return self.fp64
        return self.tf32 if tf32 else self.fp32


H100_SXM = GPU()


class Shape(NamedTuple):
    """One call of the op: ``B, H, N, M, D``; ``L`` the RPE table length cut to ``N`` (None: no RPE); ``dtype`` of
    the inputs; ``documents``: with document boundaries."""

    B: int
    H: int
    N: int
    M: int
    D: int
    L: int | None
    dtype: torch.dtype = torch.float32
    documents: bool = False


@dataclasses.dataclass
class Cost:
    """Kernels, bytes read + written, flops (all of them) and the predicted seconds of a forward + backward."""

    kernels: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0

    def add(self, gpu: GPU, nbytes: float, mm_flops: float = 0.0, peak: float = 1.0, other_flops: float = 0.0,
            kernels: int = 1) -> None:
        """One kernel (or ``kernels`` alike, ``nbytes`` and flops in total): ``mm_flops`` on matmul units of
        ``peak``; ``other_flops`` (elementwise, reductions, transforms) are counted but bandwidth-bound."""
        self.kernels += kernels
        self.bytes += nbytes
        self.flops += mm_flops + other_flops
        self.seconds += max(nbytes / gpu.bandwidth, mm_flops / (gpu.efficiency * peak) if mm_flops else 0.0)

    @property
    def ms(self) -> float:
        return 1e3 * self.seconds


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def fused_cost(s: Shape, gpu: GPU = H100_SXM, *, tf32: bool = False, block: int = FUSED_BLOCK) -> Cost:
    """The fused method's kernels (:mod:`lm.ops.fused_kernels`) and their torch prologue and epilogue, forward +
    backward, counted from their loops."""
    B, H, N, M, D = s.B, s.H, s.N, s.M, s.D
    L = 1 if s.L is None else s.L
    half = s.dtype in (torch.float16, torch.bfloat16)
    x = _itemsize(s.dtype)
    a = 8 if s.dtype == torch.float64 else 4  # accumulators, states, normaliser, c
    T, BH, E = block, B * H, D + 1
    nb = -(-N // T)
    nw = window_blocks(L, T)
    nb_far = max(nb - nw, 0)
    pairs = sum(min(nw, g + 1) for g in range(nb)) if nw < nb else nb * (nb + 1) // 2  # (query, key) tiles
    peak = gpu.peak(s.dtype, tf32)
    far_peak = gpu.tf32 if (half or tf32) else gpu.peak(s.dtype)
    row = BH * N * x  # one input element per (batch, head, position)
    vec = BH * N * a  # one accumulator-precision number per (batch, head, position)
    starts = B * N * 8 if s.documents else 0
    states = BH * (nb_far + 1) * M * E * a
    far = nb_far > 0
    c = Cost()
    c.add(gpu, 4 * H * L * a, kernels=4)  # the weights c = exp(bias - max): cast, max, subtract, exp

    def far_states():
        if far or s.documents:
            c.add(gpu, states)  # zeros (entry 0: no initial state)
        if far:
            c.add(gpu, row * (M + D) + states + starts, 2 * BH * nb_far * T * M * E, far_peak)

    read_states = BH * nb * M * E * a if far else 0
    far_states()
    c.add(gpu, row * (2 * M + 2 * D) + vec + read_states + starts,  # forward: q, k, v, out, den
          BH * pairs * 2 * T * T * (M + D), peak, BH * pairs * 4 * T * T + (2 * BH * N * M * E if far else 0))
    c.add(gpu, 2 * row * D + 2 * vec, other_flops=3 * BH * N * D)  # delta: out, d out, den -> gd
    far_states()
    if far:
        c.add(gpu, row * (M + D) + 2 * vec + BH * nb_far * M * E * a + starts, 2 * BH * nb_far * T * M * E, far_peak)
    c.add(gpu, BH * L * a)  # dc zeros
    c.add(gpu, row * (3 * M + 2 * D) + 2 * vec + read_states + starts + BH * a,  # dq: q, k, v, d out, den, gd
          BH * pairs * 2 * T * T * (M + D), peak, BH * pairs * 4 * T * T)
    c.add(gpu, row * (3 * M + 4 * D) + 2 * vec + BH * nb_far * M * E * a + starts + BH * L * a,  # dk, dv, dc
          BH * pairs * 4 * T * T * (M + D), peak, BH * pairs * 10 * T * T)
    c.add(gpu, BH * L * a + 4 * H * L * a, kernels=4)  # dc summed over the batch; the bias gradient
    return c


# ------------------------------------------------------------------------------------- counting on meta

_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh", "detach",
              "_to_copy_meta"}


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)


class CostCounter(TorchDispatchMode):
    """Adds up the kernels dispatched in its scope: bytes of every tensor each reads and writes, matmul flops
    (``mm``, ``bmm``, ``baddbmm``, ``addmm``) at the inputs' peak, transforms and elementwise work as other flops.
    Views and allocations launch nothing and are skipped. The op's own custom ops (``lm::``) are run through their
    Python implementation under the counter, so their kernels are counted (on ``meta`` they really run)."""

    def __init__(self, gpu: GPU = H100_SXM, tf32: bool = False):
        super().__init__()
        from lm.ops.kernelized import _mix_backward_impl, _mix_impl
        self.impls = {torch.ops.lm.kernelized_mix.default: _mix_impl,
                      torch.ops.lm.kernelized_mix_backward.default: _mix_backward_impl}
        self.gpu, self.tf32, self.cost = gpu, tf32, Cost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self.impls.get(func)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_KERNEL:
            return out
        ins = list(_tensors(list(args) + list(kwargs.values())))
        outs = list(_tensors(out))
        nbytes = sum(map(_nbytes, ins)) + sum(map(_nbytes, outs))
        mm = 0.0
        if name in ("mm", "bmm", "addmm", "baddbmm", "matmul"):
            a, b = (args[-2], args[-1]) if name in ("mm", "bmm", "matmul") else (args[1], args[2])
            mm = 2.0 * a.numel() * b.shape[-1]
        other = 0.0
        if name.startswith("_fft"):
            n = max(1, max(outs[0].shape[-1], ins[0].shape[-1]))
            other = 2.5 * max(ins[0].numel(), outs[0].numel()) * math.log2(max(n, 2))
        elif not mm:
            other = float(max([t.numel() for t in ins + outs] or [0]))
        dtype = ins[0].dtype if ins else torch.float32
        self.cost.add(self.gpu, nbytes, mm, self.gpu.peak(dtype, self.tf32), other)
        return out


@functools.lru_cache(maxsize=1024)
def counted_cost(method: str, s: Shape, gpu: GPU = H100_SXM) -> Cost:
    """``method`` (a torch-kernel method) forward + backward on ``meta``, counted by :class:`CostCounter`, apart
    from whatever the caller runs under (no_grad, inference mode, autocast, its own dispatch modes)."""
    from lm.ops.kernelized import kernelized_attention
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
            _disable_current_modes():
        with torch.device("meta"):
            q = torch.empty(s.B, s.H, s.N, s.M, dtype=s.dtype, requires_grad=True)
            k = torch.empty(s.B, s.H, s.N, s.M, dtype=s.dtype, requires_grad=True)
            v = torch.empty(s.B, s.H, s.N, s.D, dtype=s.dtype, requires_grad=True)
            bias = None if s.L is None else torch.empty(s.H, s.L, requires_grad=True)
            starts = torch.zeros(s.B, s.N, dtype=torch.long) if s.documents else None
        counter = CostCounter(gpu)
        with counter:
            out = kernelized_attention(q, k, v, bias, method=method, fft_dtype=torch.float32,
                                       document_starts=starts)
            out.backward(torch.empty_like(out))
    return counter.cost


def method_cost(method: str, s: Shape, gpu: GPU = H100_SXM, *, tf32: bool = False) -> Cost:
    """Predicted cost of ``method`` for one forward + backward of shape ``s``."""
    if method == "fused":
        return fused_cost(s, gpu, tf32=tf32)
    return counted_cost(method, s, gpu)


def fa2_cost(B: int, H: int, N: int, D: int, gpu: GPU = H100_SXM) -> Cost:
    """FlashAttention-2, causal, forward + backward: ``7 B H N^2 D`` flops at ``efficiency`` of the bfloat16 peak
    (no bytes: a lower bound on its time)."""
    c = Cost()
    flops = 7.0 * B * H * N * N * D
    c.kernels, c.flops, c.seconds = 3, flops, flops / (gpu.efficiency * gpu.bf16)
    return c


def candidates(num_offsets: int | None, documents: bool, continues: bool, fused: bool) -> list[str]:
    """The exact methods that can run a call: ``fused`` where it is available; ``fft`` not with documents or a
    continued state; ``prefix`` instead of ``band`` without RPE."""
    out = ["fused"] if fused else []
    out += ["dense", "prefix" if num_offsets is None else "band"]
    if num_offsets is not None and not (documents or continues):
        out.append("fft")
    return out


def _bucket(n: int) -> int:
    """``n`` rounded up to a power of two or three times one: at most ~2 lookups per octave of lengths."""
    p = 1 << max(0, (n - 1).bit_length())
    return min(p, 3 * p // 4) if 3 * p // 4 >= n else p


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=4096)
def cheapest(n: int, num_offsets: int | None, batch_heads: int, features: int, head_dim: int,
             dtype: torch.dtype = torch.float32, documents: bool = False, continues: bool = False,
             fused: bool = True, gpu: GPU = H100_SXM) -> str:
    """The method with the smallest predicted time for these shapes (lengths and batch rounded up by
    :func:`_bucket`, so a new length rarely costs a new count). Cached; constant under ``torch.compile``."""
    N = _bucket(n)
    L = None if num_offsets is None else (N if num_offsets >= n else num_offsets)
    s = Shape(1, _bucket(batch_heads), N, features, head_dim, L, dtype, documents)
    costs = {m: method_cost(m, s, gpu).seconds for m in candidates(num_offsets, documents, continues, fused)}
    return min(costs, key=costs.get)
