"""The fused method (Triton kernels of the chunk form) against the float64 dense reference: values and all four
gradients at odd sizes for every RPE kind, document boundaries, bfloat16 against SDPA's own bfloat16 error, and
what auto picks for CUDA shapes. On CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so sizes stay small; blocks of 16 rows give many blocks at small N."""
import pytest
import torch
import torch.nn.functional as F

from lm.ops import kernelized_attention
from lm.ops.feature_maps import nprf_features, random_projection
from lm.ops.fused import fused_attention, fused_available
from lm.ops.kernelized import choose_method
from lm.ops.reference import kernelized_attention_reference

from conftest import norm_relative, worst_relative

pytestmark = pytest.mark.skipif(not fused_available("cpu"), reason="needs triton (TRITON_INTERPRET=1 on CPU)")


def leaves(B, H, N, M, D, L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    k = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    v = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    b = None if L is None else torch.randn(H, L, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, b) if x is not None]


def weights(bias, N, H, dtype):
    """What the op hands the kernels: ``exp(b - max)`` of the table cut to ``N`` (ones without RPE)."""
    if bias is None:
        return torch.ones(H, 1, dtype=dtype)
    b = bias[:, :N]
    return (b - b.amax(-1, keepdim=True).detach()).exp()


def check_against_reference(xs, out, tol_out, tol_grad, seed=5):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = kernelized_attention_reference(*xs)
    assert worst_relative(out, ref) < tol_out
    ours = torch.autograd.grad(out, xs, g.to(out.dtype))
    want = torch.autograd.grad(ref, xs, g)
    for name, a, b in zip(("phi_q", "phi_k", "v", "rpe_bias"), ours, want):
        assert a.shape == b.shape and a.dtype == xs[0].dtype, name
        assert norm_relative(a, b) < tol_grad, name


# (B, H, N, M, D, L) with blocks of 16: one block; a far field (L < N); general RPE over 5 blocks with
# D not a power of two; no RPE (prefix); a table longer than the sequence.
CASES = [(1, 2, 9, 3, 2, 4), (2, 2, 63, 5, 3, 10), (1, 2, 70, 5, 17, 70), (2, 1, 50, 20, 3, None),
         (1, 1, 40, 3, 2, 100)]


@pytest.mark.parametrize("B, H, N, M, D, L", CASES)
def test_fused_kernels_match_float64_reference(B, H, N, M, D, L):
    xs = leaves(B, H, N, M, D, L)
    c = weights(xs[3] if L else None, N, H, torch.float64)
    out = fused_attention(*xs[:3], c, block=16)
    assert out.dtype == torch.float64
    check_against_reference(xs, out, 1e-12, 1e-10)


def test_fused_method_float32_through_the_op():
    """Default 64-row blocks, float32: the contract's 1e-4 on values and 1e-3 on gradients."""
    xs = leaves(2, 2, 200, 16, 8, 33, dtype=torch.float32, seed=3)
    out = kernelized_attention(*xs, method="fused")
    assert out.dtype == torch.float32
    check_against_reference(xs, out, 1e-4, 1e-3)


def check_each_document_alone(xs, lengths, got, seed):
    """``got`` (a packed row of the documents ``lengths``) equals the float64 reference of each document alone,
    values and all four gradients."""
    parts, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        parts.append(kernelized_attention_reference(xs[0][:, :, sl], xs[1][:, :, sl], xs[2][:, :, sl], xs[3]))
        start += n
    want = torch.cat(parts, dim=2)
    assert norm_relative(got, want) < 1e-12
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for name, a, b in zip(("phi_q", "phi_k", "v", "rpe_bias"), torch.autograd.grad(got, xs, g),
                          torch.autograd.grad(want, xs, g)):
        assert norm_relative(a, b) < 1e-10, name


def test_fused_packed_documents_equal_each_document_alone():
    lengths = [20, 1, 33, 17]
    xs = leaves(1, 2, sum(lengths), 4, 3, 12, seed=2)
    cu = torch.tensor([0, 20, 21, 54, 71], dtype=torch.int32)
    got = kernelized_attention(*xs, method="fused", cu_seqlens=cu)
    check_each_document_alone(xs, lengths, got, seed=1)


def test_fused_documents_with_a_far_field_in_small_blocks():
    """Blocks of 16, clipped RPE (two blocks of exact tiles): documents of 23, 16, 9 and 32 tokens, so boundaries
    fall inside blocks, inside the far field and on a block edge (48)."""
    lengths = [23, 16, 9, 32]
    starts = torch.cat([torch.full((n,), s) for n, s in zip(lengths, [0, 23, 39, 48])])[None]
    xs = leaves(1, 2, 80, 4, 3, 9, seed=4)
    out = fused_attention(*xs[:3], weights(xs[3], 80, 2, torch.float64), starts, block=16)
    check_each_document_alone(xs, lengths, out, seed=2)


def test_bfloat16_error_within_twice_sdpa():
    """bfloat16 NPRF features and values: the fused method's error against float64 (on the same rounded inputs)
    is at most twice what SDPA's bfloat16 attention makes against its own float64 on inputs of the same shapes."""
    g = torch.Generator().manual_seed(0)
    B, H, N, M, D = 1, 2, 256, 64, 64
    w = random_projection(M, D, orthogonal=True, generator=g)
    q = nprf_features(torch.randn(B, H, N, D, generator=g), w, stabilise=True).bfloat16()
    k = nprf_features(torch.randn(B, H, N, D, generator=g), w, stabilise=False).bfloat16()
    v = torch.randn(B, H, N, D, generator=g).bfloat16()
    bias = -0.5 * torch.log1p(torch.arange(N, dtype=torch.float32)).expand(H, N).contiguous()
    ours = kernelized_attention(q, k, v, bias, method="fused")
    assert ours.dtype == torch.bfloat16
    err = norm_relative(ours, kernelized_attention_reference(q, k, v, bias))
    sq, sk = torch.randn(B, H, N, D, generator=g).bfloat16(), torch.randn(B, H, N, D, generator=g).bfloat16()
    sdpa = F.scaled_dot_product_attention(sq, sk, v, is_causal=True)
    sdpa_err = norm_relative(sdpa, F.scaled_dot_product_attention(sq.double(), sk.double(), v.double(),
                                                                    is_causal=True))
    print(f"bfloat16 error against float64: fused {err:.2e}, SDPA {sdpa_err:.2e}")  # (shown with pytest -s)
    assert 0 < err <= 2 * sdpa_err, (err, sdpa_err)


@pytest.mark.parametrize("n, L", [(150, 150), (150, 20), (150, None)])
def test_auto_for_cuda_shapes_runs_exactly_on_cpu(n, L):
    """What auto picks for a GPU (Triton available: the fused method) gives the reference's numbers."""
    method = choose_method(n, L, "cuda", batch_heads=2, features=5, head_dim=3)
    assert method == "fused"
    xs = leaves(1, 2, n, 5, 3, L, seed=6)
    check_against_reference(xs, kernelized_attention(*xs, method=method), 1e-12, 1e-10)


def test_fused_method_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q = torch.rand(1, 1, 5, 3)
    with pytest.raises(ValueError, match="method='fused' runs Triton kernels"):
        kernelized_attention(q, q, torch.randn(1, 1, 5, 2), method="fused")
