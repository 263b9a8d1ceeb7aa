"""Shared test helpers for the attention op: inputs, bias families, error measures, and a dispatch mode that
counts (and, on ``meta``, executes) the kernels inside the op's custom ops."""
from __future__ import annotations

import collections
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# ---------------------------------------------------------------------------------------------- op inputs

def op_inputs(B, H, N, M, D, dtype=torch.float64, seed=0):
    """Uniform [0, 1) features ``phi_q``, ``phi_k`` ``(B, H, N, M)`` and Gaussian values ``v`` ``(B, H, N, D)``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    k = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    v = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    return q, k, v


def bias_of(shape, dtype=torch.float64, scale=1.0, seed=1):
    """Gaussian RPE bias of ``shape`` (None for None)."""
    if shape is None:
        return None
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def worst_relative(out, ref):
    """Worst per-position relative error ``|out_i - ref_i| / |ref_i|`` (norms over D)."""
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def bias_kind(kind, span, L, H=2, seed=1):
    """``(H, L)`` float32 biases of a shape whose values span ``span`` nats."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(L, dtype=torch.float64)
    if kind == "random":
        b = (torch.rand(H, L, generator=g, dtype=torch.float64) - 0.5) * span
    elif kind == "rising":  # far offsets weigh most: the hardest case for FFT round-off
        b = (t / max(L - 1, 1) * span).expand(H, L)
    elif kind == "decaying":
        b = (-span * torch.log1p(t) / math.log(L)).expand(H, L)
    elif kind == "spiky":
        b = torch.where(torch.rand(H, L, generator=g) < 0.02, 0.0, -span).double()
        b[:, 0] = 0.0
    elif kind == "clipped":  # short learned band, then one constant for all far offsets
        b = torch.full((H, L), -span, dtype=torch.float64)
        b[:, :32] = torch.linspace(0, -span / 2, 32, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return b.float().contiguous()


def lm_bias(kind, N, H=2, seed=1):
    """``(H, N)`` float32 biases of the families the FFT precision policy is judged on
    (``lm.ops.reference.bias_family``)."""
    from lm.ops.reference import bias_family
    return bias_family(kind, N, H, seed)


# ----------------------------------------------------------------------------- counting inside the custom op

def _custom_op_impls():
    from lm.ops import kernelized
    return {torch.ops.lm.kernelized_mix.default: kernelized._mix_impl,
            torch.ops.lm.kernelized_mix_backward.default: kernelized._mix_backward_impl}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched in its scope (this thread). A custom op is one opaque call to a dispatch
    mode, so for ``lm::`` ops the counter runs their Python implementation under itself instead: its kernels
    are counted, and on ``meta`` tensors they really run (a host read would fail there)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.custom = collections.Counter()
        self.impls = _custom_op_impls()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self.impls.get(func)
        if impl is not None:
            self.custom[str(func)] += 1
            with self:
                return impl(*args, **kwargs)
        self.ops[str(func)] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())
