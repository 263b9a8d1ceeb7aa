"""Numerics of lm.ops.kernelized_attention: wide biases (15 nats accurate; 30 and 80 nats finite and bounded),
the float32/float64 FFT switch, low-precision dtypes, autocast, and one long-sequence accuracy check."""
import math

import pytest
import torch

from lm.ops import kernelized_attention
from lm.ops.kernelized import FP32_FFT_MAX_BIAS_RANGE, fft_precision
from lm.ops.reference import kernelized_attention_reference, kernelized_attention_reference_rows

H = 2


def inputs(N, M=16, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, H, N, M, generator=g).to(dtype), torch.rand(1, H, N, M, generator=g).to(dtype),
            torch.randn(1, H, N, D, generator=g).to(dtype))


def bias_kind(kind, span, L, seed=1):
    """(H, L) float32 biases whose values span ``span`` nats."""
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


def worst_relative(out, ref):
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


KINDS = ["random", "rising", "decaying", "spiky", "clipped"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, N, L", [("fft", 1500, 1500), ("band", 1500, 130), ("auto", 1500, 1500),
                                          ("auto", 1500, 100), ("dense", 300, 300)])
def test_15_nat_biases_accurate_in_float32(kind, method, N, L):
    q, k, v = inputs(N)
    bias = bias_kind(kind, 15.0, L)
    out = kernelized_attention(q, k, v, bias, method=method)
    assert worst_relative(out, kernelized_attention_reference(q, k, v, bias)) <= 1e-4


@pytest.mark.parametrize("kind", ["random", "rising", "spiky"])
def test_float32_fft_just_below_its_bias_range_threshold(kind):
    N = 4096
    q, k, v = inputs(N)
    bias = bias_kind(kind, FP32_FFT_MAX_BIAS_RANGE * 0.999, N)
    assert fft_precision(bias - bias.amax(-1, keepdim=True), torch.float32) == torch.float32
    out = kernelized_attention(q, k, v, bias, method="fft")
    rows = torch.cat([torch.arange(0, 300), torch.arange(N - 300, N),
                      torch.randint(300, N - 300, (200,), generator=torch.Generator().manual_seed(2))])
    assert worst_relative(out[:, :, rows], kernelized_attention_reference_rows(q, k, v, bias, rows)) <= 1e-4


def test_fft_precision_switch():
    assert fft_precision(torch.tensor([[0.0, -FP32_FFT_MAX_BIAS_RANGE]]), torch.float32) == torch.float32
    assert fft_precision(torch.tensor([[0.0, -FP32_FFT_MAX_BIAS_RANGE - 0.1]]), torch.float32) == torch.float64
    assert fft_precision(None, torch.float32) == torch.float32
    assert fft_precision(torch.zeros(1, 3), torch.float64) == torch.float64


@pytest.mark.parametrize("span", [30.0, 80.0, 200.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["fft", "band", "dense"])
def test_very_wide_biases_finite_and_bounded(span, kind, method):
    """Beyond 15 nats accuracy may degrade, but every output stays a (near) convex combination of the values:
    finite, no larger than max |v| (a normaliser <= 0 would break this)."""
    N = 600 if method != "dense" else 200
    q, k, v = inputs(N)
    bias = bias_kind(kind, span, N if method != "band" else 64)
    out = kernelized_attention(q, k, v, bias, method=method)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= v.abs().max() * 1.001
    ones = kernelized_attention(q, k, torch.ones_like(v), bias, method=method)
    assert torch.isfinite(ones).all() and ones.min() > -1e-3 and ones.max() < 1 + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["fft", "band", "dense", "prefix"])
def test_half_precision_inputs(dtype, method):
    N = 700
    q, k, v = inputs(N, dtype=dtype)
    bias = None if method == "prefix" else bias_kind("random", 6.0, N).to(dtype)
    out = kernelized_attention(q, k, v, bias, method=method)
    assert out.dtype == dtype
    assert worst_relative(out, kernelized_attention_reference(q, k, v, bias)) <= 3e-2
    q.requires_grad_()
    kernelized_attention(q, k, v, bias, method=method).float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_float64_in_float64_out():
    q, k, v = inputs(100, dtype=torch.float64)
    assert kernelized_attention(q, k, v, torch.zeros(H, 100, dtype=torch.float64)).dtype == torch.float64


def test_autocast_is_disabled_inside():
    N = 1200
    q, k, v = inputs(N)
    bias = bias_kind("random", 6.0, N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernelized_attention(q, k, v, bias, method="fft")
    assert out.dtype == torch.float32
    assert worst_relative(out, kernelized_attention_reference(q, k, v, bias)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method, L", [("fft", 16384), ("band", 257)])
@pytest.mark.parametrize("kind", ["random", "rising"])
def test_16k_tokens_15_nats(method, L, kind):
    N = 16384
    q, k, v = inputs(N)
    bias = bias_kind(kind, 15.0, L)
    out = kernelized_attention(q, k, v, bias, method=method)
    rows = torch.cat([torch.arange(0, 200), torch.arange(N - 100, N),
                      torch.randint(200, N - 100, (200,), generator=torch.Generator().manual_seed(4))])
    assert worst_relative(out[:, :, rows], kernelized_attention_reference_rows(q, k, v, bias, rows)) <= 1e-4
