"""``initial_state``: the parallel op continues a recurrent state. A sequence cut into chunks, each continuing the
state the previous one handed over, gives the rows (and the gradients) of one call over the whole sequence, for
every method and RPE kind; the state after the chunks is the state after the whole sequence; steps continue it."""
import pytest
import torch

from lm.ops import kernelized_attention, kernelized_attention_step, state_after
from lm.ops.fused import fused_available

from conftest import norm_relative

METHODS = ["dense", "band", "auto"] + (["fused"] if fused_available("cpu") else [])


def leaves(N, L, B=2, H=2, M=4, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, N, M, generator=g, dtype=torch.float64)
    k = torch.rand(B, H, N, M, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    b = None if L is None else torch.randn(H, L, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, b) if x is not None]


def chunked(xs, cuts, method):
    """The op over ``[0, cuts[0])``, then each next chunk from the state before it: outputs concatenated."""
    q, k, v, *b = xs
    outs, state, start = [], None, 0
    for stop in list(cuts) + [q.shape[2]]:
        sl = slice(start, stop)
        out, state = kernelized_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], *b, method=method,
                                          initial_state=state, output_final_state=True)
        outs.append(out)
        start = stop
    return torch.cat(outs, dim=2), state


# clipped RPE (the state holds far keys after 9 tokens), a table longer than the sequence (a ring only), no RPE
@pytest.mark.parametrize("L, cuts", [(10, (3, 40, 41)), (200, (70, 71)), (None, (1, 50))])
@pytest.mark.parametrize("method", METHODS)
def test_chunks_continuing_states_equal_one_call(method, L, cuts):
    if method == "fused" and L == 200:
        cuts = (70,)  # the interpreter is slow: one cut is enough for the ring-only case
    xs = leaves(90, L)
    whole = kernelized_attention(*xs, method="dense")
    got, state = chunked(xs, cuts, method)
    assert norm_relative(got, whole) < 1e-12
    g = torch.randn(whole.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, a, b in zip(("phi_q", "phi_k", "v", "rpe_bias"), torch.autograd.grad(got, xs, g, retain_graph=True),
                          torch.autograd.grad(whole, xs, g)):
        assert norm_relative(a, b) < 1e-10, name
    want = state_after(xs[1], xs[2], 1 if L is None else L)
    assert state.position == want.position == 90 and state.window == want.window
    for name in ("far_kv", "far_k"):
        assert norm_relative(getattr(state, name), getattr(want, name)) < 1e-12, name
    q1 = torch.rand(2, 2, 4, dtype=torch.float64)  # the next token, from the chunked state and from the whole one
    k1, v1 = torch.rand(2, 2, 4, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    y_chunked, _ = kernelized_attention_step(q1, k1, v1, state, *xs[3:])
    y_whole, _ = kernelized_attention_step(q1, k1, v1, want, *xs[3:])
    assert norm_relative(y_chunked, y_whole) < 1e-12


def test_fft_continues_a_ring_only_state_and_refuses_far_keys():
    xs = leaves(120, 300)
    whole = kernelized_attention(*xs, method="dense")
    assert norm_relative(chunked(xs, (64,), "fft")[0], whole) < 1e-12  # 64 tokens < the table: no far keys yet
    clipped = leaves(120, 10)
    with pytest.raises(ValueError, match="fft' cannot continue a state that holds far keys"):
        chunked(clipped, (64,), "fft")
    assert norm_relative(chunked(clipped, (64,), "auto")[0], kernelized_attention(*clipped, method="dense")) < 1e-12


def test_a_state_for_another_table_or_shape_is_refused():
    xs = leaves(20, 10)
    _, state = kernelized_attention(*xs, output_final_state=True)
    q, k, v, b = xs
    with pytest.raises(ValueError, match="built for an RPE table of 10 entries, rpe_bias has 12"):
        kernelized_attention(q, k, v, torch.zeros(2, 12, dtype=torch.float64), initial_state=state)
    with pytest.raises(ValueError, match=r"holds \(B, H, M, D\) = \(2, 2, 4, 3\)"):
        kernelized_attention(q[:1], k[:1], v[:1], b, initial_state=state)
    with pytest.raises(ValueError, match="document boundaries"):
        kernelized_attention(q, k, v, b, initial_state=state, document_starts=torch.zeros(2, 20, dtype=torch.long))
