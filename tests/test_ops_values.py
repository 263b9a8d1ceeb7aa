"""Values of lm.ops.kernelized_attention against the dense float64 reference: every method, odd sizes,
bias shapes (H, L) / (L,), L < N, L == N, L > N, no RPE, and no leakage from the future."""
import pytest
import torch

from lm.ops import kernelized_attention
from lm.ops.kernelized import choose_method
from lm.ops.reference import kernelized_attention_reference, kernelized_attention_reference_rows

from conftest import bias_of, worst_relative
from conftest import op_inputs as inputs



SIZES = [(1, 1), (2, 3), (7, 3), (7, 7), (63, 10), (63, 63), (63, 100), (500, 17), (500, 500), (500, 700)]


@pytest.mark.parametrize("method", ["fft", "band", "dense", "auto"])
@pytest.mark.parametrize("N, L", SIZES)
def test_values_match_reference_float64(method, N, L):
    q, k, v = inputs(2, 3, N, 5, 3)
    bias = bias_of((3, L))
    out = kernelized_attention(q, k, v, bias, method=method)
    assert out.shape == v.shape and out.dtype == torch.float64
    assert worst_relative(out, kernelized_attention_reference(q, k, v, bias)) < 1e-10


@pytest.mark.parametrize("method", ["fft", "band", "dense", "prefix", "auto"])
@pytest.mark.parametrize("N", [1, 2, 7, 63, 500])
def test_values_without_rpe(method, N):
    q, k, v = inputs(2, 2, N, 7, 9)
    out = kernelized_attention(q, k, v, None, method=method)
    assert worst_relative(out, kernelized_attention_reference(q, k, v)) < 1e-10


@pytest.mark.parametrize("method", ["fft", "band", "dense"])
@pytest.mark.parametrize("L", [1, 40, 300])
def test_shared_bias_of_shape_L(method, L):
    q, k, v = inputs(1, 4, 150, 3, 5)
    bias = bias_of((L,))
    out = kernelized_attention(q, k, v, bias, method=method)
    expected = kernelized_attention(q, k, v, bias.expand(4, L), method="dense")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert worst_relative(out, kernelized_attention_reference(q, k, v, bias)) < 1e-10


@pytest.mark.parametrize("method", ["fft", "band", "prefix", "auto"])
def test_float32_values_long_sequence(method):
    N, L = 3000, (None if method == "prefix" else 257)
    q, k, v = inputs(1, 2, N, 16, 8, dtype=torch.float32)
    bias = bias_of(None if L is None else (2, L), dtype=torch.float32, scale=0.5)
    out = kernelized_attention(q, k, v, bias, method=method)
    assert out.dtype == torch.float32
    rows = torch.cat([torch.arange(20), torch.randint(20, N, (60,), generator=torch.Generator().manual_seed(3))])
    ref = kernelized_attention_reference_rows(q, k, v, bias, rows)
    assert worst_relative(out[:, :, rows], ref) < 1e-4


def test_float32_fft_with_l_equal_n_matches_reference():
    q, k, v = inputs(2, 2, 1100, 6, 5, dtype=torch.float32)
    bias = bias_of((2, 1100), dtype=torch.float32, scale=0.3)
    out = kernelized_attention(q, k, v, bias, method="fft")
    assert worst_relative(out, kernelized_attention_reference(q, k, v, bias)) < 1e-4


@pytest.mark.parametrize("method", ["fft", "band", "dense", "prefix"])
def test_no_leakage_from_the_future(method):
    N, t = 700, 400
    q, k, v = inputs(1, 2, N, 8, 4, dtype=torch.float32)
    bias = None if method == "prefix" else bias_of((2, 600), dtype=torch.float32)
    out = kernelized_attention(q, k, v, bias, method=method)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t:] = 100 * torch.rand_like(k2[:, :, t:])
    v2[:, :, t:] = 1e3 * torch.randn_like(v2[:, :, t:])
    out2 = kernelized_attention(q, k2, v2, bias, method=method)
    assert worst_relative(out2[:, :, :t], out[:, :, :t].double()) < 1e-4
    assert not torch.allclose(out2[:, :, t:], out[:, :, t:])


@pytest.mark.parametrize("n, num_offsets, expected", [
    (100, None, "dense"), (8192, None, "prefix"), (100, 100, "dense"), (256, 256, "dense"), (512, 512, "band"),
    (512, 64, "band"), (8192, 257, "band"), (16384, 1024, "band"), (8192, 8192, "fft"), (1024, 1024, "band"),
    (2048, 2048, "fft"), (65536, 4096, "fft"), (16384, 2048, "band"), (4096, 2048, "fft"),
])
def test_auto_choice(n, num_offsets, expected):
    """The CPU crossovers measured in docs/op.md ("The auto rule")."""
    assert choose_method(n, num_offsets) == expected
    assert choose_method(n, num_offsets, "cpu") == expected


def test_auto_choice_on_gpus_is_the_cheapest_predicted():
    """On GPUs auto asks the cost model (tests/test_ops_cost.py checks its counts); every choice is the method of
    least predicted time among those that can run, and with Triton it is the fused one."""
    from lm.ops.cost import Shape, candidates, method_cost
    for n, L in [(512, None), (1024, 1024), (2048, 2048), (8192, 257)]:
        assert choose_method(n, L, "cuda", dtype=torch.bfloat16) == "fused"
        got = choose_method(n, L, "meta")  # no Triton on meta: the torch methods only
        shape = Shape(1, 8, n, 64, 64, L)
        times = {m: method_cost(m, shape).seconds for m in candidates(L, False, False, fused=False)}
        assert got == min(times, key=times.get), (n, L, times)
