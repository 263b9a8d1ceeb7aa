"""Numerics of lm.ops.kernelized_attention: wide biases (15 nats accurate; 30 and 80 nats finite and bounded),
the float32/float64 FFT switch, low-precision dtypes, autocast, and one long-sequence accuracy check.
(The FFT precision policy over bias families: tests/test_ops_precision.py.)"""

import pytest
import torch

from lm.ops import kernelized_attention
from lm.ops.precision import FP32_MAX_RISK, auto_fft_dtype, far_field_risk
from lm.ops.reference import kernelized_attention_reference, kernelized_attention_reference_rows

from conftest import bias_kind, worst_relative

H = 2


def inputs(N, M=16, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, H, N, M, generator=g).to(dtype), torch.rand(1, H, N, M, generator=g).to(dtype),
            torch.randn(1, H, N, D, generator=g).to(dtype))


KINDS = ["random", "rising", "decaying", "spiky", "clipped"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, N, L", [("fft", 1500, 1500), ("band", 1500, 130), ("auto", 1500, 1500),
                                          ("auto", 1500, 100), ("dense", 300, 300)])
def test_15_nat_biases_accurate_in_float32(kind, method, N, L):
    q, k, v = inputs(N)
    bias = bias_kind(kind, 15.0, L)
    out = kernelized_attention(q, k, v, bias, method=method)
    assert worst_relative(out, kernelized_attention_reference(q, k, v, bias)) <= 1e-4


def span_at_risk(kind, N, risk):
    """The span (nats) at which ``bias_kind(kind, span, N)`` has the far-field ``risk`` (bisection)."""
    lo, hi = 0.0, 40.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if far_field_risk(bias_kind(kind, mid, N), [N]).item() < risk else (lo, mid)
    return lo


@pytest.mark.parametrize("kind", ["random", "rising", "spiky"])
def test_float32_fft_just_below_its_risk_threshold(kind):
    """Biases of the shapes hardest for the FFT, scaled to just below the float32 threshold, choose float32
    and stay within 1e-4."""
    N = 4096
    q, k, v = inputs(N)
    bias = bias_kind(kind, span_at_risk(kind, N, FP32_MAX_RISK * 0.999), N)
    assert auto_fft_dtype(bias, N, k, v) == torch.float32
    out = kernelized_attention(q, k, v, bias, method="fft")
    rows = torch.cat([torch.arange(0, 300), torch.arange(N - 300, N),
                      torch.randint(300, N - 300, (200,), generator=torch.Generator().manual_seed(2))])
    assert worst_relative(out[:, :, rows], kernelized_attention_reference_rows(q, k, v, bias, rows)) <= 1e-4


def test_fft_precision_switch():
    """float32 exactly while the far-field risk is at most FP32_MAX_RISK (rising biases cross it as they steepen)."""
    N = 4096
    spans = torch.linspace(0.5, 8.0, 76)
    risks = torch.cat([far_field_risk(bias_kind("rising", float(s), N), [N]) for s in spans])
    assert risks.min() < FP32_MAX_RISK < risks.max() and bool((risks.diff() > 0).all())
    for s, r in zip(spans, risks):
        expected = torch.float32 if r <= FP32_MAX_RISK else torch.float64
        assert auto_fft_dtype(bias_kind("rising", float(s), N), N) == expected
    assert auto_fft_dtype(None, N) == torch.float32
    assert auto_fft_dtype(torch.zeros(2, 3), 10) == torch.float32  # no far field at all


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
