"""Document boundaries in lm.ops.kernelized_attention: a packed row equals each document run alone (float64, values
and all four gradients), for every method that keeps documents apart; cu_seqlens and document_starts agree; the
FFT refuses; auto never picks it."""
import pytest
import torch

from lm.ops import kernelized_attention
from lm.ops.documents import starts_from_cu_seqlens
from lm.ops.kernelized import choose_method

from conftest import norm_relative

METHODS_WITH_DOCUMENTS = ["dense", "band", "auto"]


def packed_leaves(lengths, H=2, M=5, D=3, L=None, seed=0, batch=1):
    """Leaves for ``batch`` rows of the packed documents ``lengths`` (each row its own draw)."""
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    q = torch.rand(batch, H, N, M, generator=g, dtype=torch.float64)
    k = torch.rand(batch, H, N, M, generator=g, dtype=torch.float64)
    v = torch.randn(batch, H, N, D, generator=g, dtype=torch.float64)
    b = None if L is None else torch.randn(H, L, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, b) if x is not None]


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


def separately(xs, lengths, method):
    """Each document alone through the same method (no boundaries): outputs concatenated along N."""
    q, k, v, *b = xs
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(kernelized_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], *b,
                                         method="dense" if method == "auto" else method))
        start += n
    return torch.cat(outs, dim=2)


CASES = [  # (document lengths, L): boundaries inside blocks, on block edges, one-token documents, L < / > N
    ([5, 1, 9], 4), ([64, 64, 3], 10), ([70, 130, 1, 40], 33), ([150], 20), ([1, 1, 1, 200], 300),
    ([100, 29, 63], None), ([3, 200], None),
]


@pytest.mark.parametrize("method", METHODS_WITH_DOCUMENTS + ["prefix"])
@pytest.mark.parametrize("lengths, L", CASES)
def test_packed_documents_equal_each_document_alone(method, lengths, L):
    if method == "prefix" and L is not None:
        pytest.skip("prefix takes no RPE")
    xs = packed_leaves(lengths, L=L)
    g = torch.randn(xs[2].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = kernelized_attention(*xs[:3], *xs[3:], method=method, cu_seqlens=cu(lengths))
    want = separately(xs, lengths, method)
    assert norm_relative(got, want) < 1e-12
    grads_got = torch.autograd.grad(got, xs, g)
    grads_want = torch.autograd.grad(want, xs, g)
    for name, a, b in zip(("phi_q", "phi_k", "v", "rpe_bias"), grads_got, grads_want):
        assert norm_relative(a, b) < 1e-11, name


@pytest.mark.parametrize("method", ["dense", "band"])
def test_document_starts_per_row_of_a_batch(method):
    """Rows with different boundaries in one batch: each row equals its own cu_seqlens call."""
    rows = [[40, 60, 30], [130], [1, 128, 1]]
    xs = packed_leaves([130], L=17, batch=3, seed=3)
    starts = torch.cat([starts_from_cu_seqlens(cu(r), 130) for r in rows])
    got = kernelized_attention(*xs, method=method, document_starts=starts)
    for i, r in enumerate(rows):
        one = [x[i:i + 1] for x in xs[:3]] + xs[3:]
        want = kernelized_attention(*one, method=method, cu_seqlens=cu(r))
        assert norm_relative(got[i:i + 1], want) < 1e-12


def test_starts_from_cu_seqlens_skips_empty_sequences():
    got = starts_from_cu_seqlens(torch.tensor([0, 3, 3, 5, 7, 7, 7]), 7)
    assert got.tolist() == [[0, 0, 0, 3, 3, 5, 5]]


def test_fft_refuses_documents_and_auto_never_picks_it():
    xs = packed_leaves([50, 50], L=100)
    with pytest.raises(ValueError, match="fft.*cannot keep documents apart"):
        kernelized_attention(*xs, method="fft", cu_seqlens=cu([50, 50]))
    for device in ("cpu", "cuda"):
        assert choose_method(1 << 16, 1 << 16, device) == "fft"
        assert choose_method(1 << 16, 1 << 16, device, documents=True) != "fft"


@pytest.mark.parametrize("kwargs, match", [
    (dict(cu_seqlens=torch.tensor([[0, 5]])), "1-D int32/int64"),
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), "1-D int32/int64"),
    (dict(document_starts=torch.zeros(1, 4, dtype=torch.long)), r"shape \(B, N\) = \(2, 5\)"),
    (dict(document_starts=torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5])), "not both"),
    (dict(cu_seqlens=torch.tensor([0, 5])), "B = 1"),
])
def test_bad_document_arguments_are_one_line_errors(kwargs, match):
    q = torch.rand(2, 1, 5, 3)
    with pytest.raises(ValueError, match=match):
        kernelized_attention(q, q, torch.randn(2, 1, 5, 2), **kwargs)
