"""Gradients of lm.ops.kernelized_attention in phi_q, phi_k, v and rpe_bias against float64 autograd through
the dense reference, for every method; gradcheck on tiny shapes."""
import pytest
import torch

from lm.ops import kernelized_attention
from lm.ops.reference import kernelized_attention_reference


def leaves(B, H, N, M, D, bias_shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    k = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    v = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    b = None if bias_shape is None else torch.randn(*bias_shape, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, b) if x is not None]


def grads(fn, xs, seed=5):
    out = fn(*xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, xs, g.to(out.dtype))


def relative(a, b):
    """Relative error in norm; gradients that are exactly 0 in theory (N = 1; the bias when L = 1, since a
    constant weight cancels) are compared absolutely."""
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-3)).item()


@pytest.mark.parametrize("method", ["fft", "band", "dense"])
@pytest.mark.parametrize("N, L, shared", [(1, 1, False), (2, 3, False), (7, 3, True), (63, 10, False),
                                          (63, 63, False), (63, 100, True), (500, 17, False), (500, 500, False),
                                          (130, 1, False)])
def test_all_four_gradients_float64(method, N, L, shared):
    xs = leaves(2, 3, N, 5, 3, (L,) if shared else (3, L))
    ours = grads(lambda *a: kernelized_attention(*a, method=method), xs)
    ref = grads(kernelized_attention_reference, xs)
    for name, a, b in zip(("phi_q", "phi_k", "v", "rpe_bias"), ours, ref):
        assert a.shape == b.shape, name
        assert relative(a, b) < 1e-9, name


@pytest.mark.parametrize("method", ["fft", "band", "dense", "prefix"])
@pytest.mark.parametrize("N", [1, 7, 500])
def test_gradients_without_rpe(method, N):
    xs = leaves(2, 2, N, 4, 7, None)
    ours = grads(lambda *a: kernelized_attention(*a, method=method), xs)
    ref = grads(kernelized_attention_reference, xs)
    for name, a, b in zip(("phi_q", "phi_k", "v"), ours, ref):
        assert relative(a, b) < 1e-9, name


@pytest.mark.parametrize("method, L", [("fft", 2000), ("band", 257), ("prefix", None), ("auto", 2000),
                                       ("auto", 100)])
def test_float32_gradients_within_1e_3(method, L):
    xs32 = leaves(1, 2, 2000, 16, 8, None if L is None else (2, L), dtype=torch.float32)
    ours = grads(lambda *a: kernelized_attention(*a, method=method), xs32)
    ref = grads(kernelized_attention_reference, [x.detach().double().requires_grad_() for x in xs32])
    for name, a, b in zip(("phi_q", "phi_k", "v", "rpe_bias"), ours, ref):
        assert a.dtype == torch.float32
        assert relative(a, b) < 1e-3, name


@pytest.mark.parametrize("method", ["fft", "band", "dense"])
def test_bias_gradient_zero_for_offsets_that_never_occur(method):
    N, L = 20, 50
    q, k, v, b = leaves(1, 2, N, 3, 2, (L,))
    (gb,) = torch.autograd.grad(kernelized_attention(q, k, v, b, method=method).square().sum(), [b])
    assert gb.shape == (L,)
    assert torch.all(gb[N:] == 0)
    assert gb[: N - 1].abs().min() > 0


@pytest.mark.parametrize("method, bias_shape", [("fft", (2, 6)), ("band", (2, 3)), ("dense", (6,)),
                                                ("prefix", None), ("fft", None)])
def test_gradcheck(method, bias_shape):
    xs = leaves(1, 2, 6, 3, 2, bias_shape)
    assert torch.autograd.gradcheck(lambda *a: kernelized_attention(*a, method=method), xs, eps=1e-6, atol=1e-7)


def test_gradcheck_band_with_far_field():
    """N well beyond L and beyond one block, so the prefix-sum state and the window folding are exercised."""
    xs = leaves(1, 1, 150, 2, 2, (1, 4))
    assert torch.autograd.gradcheck(lambda *a: kernelized_attention(*a, method="band"), xs, eps=1e-6, atol=1e-7)
