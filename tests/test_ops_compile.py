"""torch.compile(fullgraph=True) traces the whole model (the op is a registered custom op with fake and autograd
implementations) and gives the eager loss and gradients for every attention kind and method; an unsupported
combination is an error that says which."""
import pytest
import torch

from conftest import compiled_and_eager
from lm.ops import kernelized_attention

from test_ops_meta import IDS, KINDS


@pytest.mark.slow
@pytest.mark.parametrize("attn", KINDS, ids=IDS)
def test_compiled_model_matches_eager(attn):
    (loss, grads), (eager_loss, eager_grads) = compiled_and_eager(torch.device("cpu"), attn, "aot_eager")
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fullgraph_with_automatic_fft_precision_is_an_error_that_says_why():
    """fft_dtype=None reads the bias on the host: under fullgraph that must fail loudly, not fall back."""
    torch._dynamo.reset()
    q, k, v, b = torch.rand(1, 2, 100, 4), torch.rand(1, 2, 100, 4), torch.randn(1, 2, 100, 3), torch.randn(2, 100)

    def attend(q, k, v, b, fft_dtype):
        return kernelized_attention(q, k, v, b, method="fft", fft_dtype=fft_dtype)

    with pytest.raises(RuntimeError, match=r"fft_dtype=None\) decides the FFT precision by reading rpe_bias"):
        torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v, b, None)
    torch._dynamo.reset()
    out = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v, b, torch.float32)
    torch.testing.assert_close(out, attend(q, k, v, b, torch.float32))


# --------------------------------------------------------------------------- the custom ops, one by one
def _mix_args(method: str, documents: bool = False, init: bool = False, n: int = 150):
    """Arguments of lm::kernelized_mix as kernelized_attention builds them (N not a multiple of 64)."""
    from lm.ops.kernelized import _near_far
    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(2, 2, n, 5, generator=g), torch.rand(2, 2, n, 5, generator=g)
    v = torch.randn(2, 2, n, 3, generator=g)
    bias = torch.randn(2, n, generator=g)
    starts = torch.tensor([[0] * 70 + [70] * (n - 70), [0] * n]) if documents else None
    state = torch.rand(2, 2, 5, 4, generator=g) if init else None
    if method == "fft":
        c, r = _near_far(bias - bias.amax(-1, keepdim=True), 2, n, torch.float32, "cpu")
        return q, k, v, c, r, None, None, torch.float32, 64, 1
    c = torch.ones(2, 1) if method == "prefix" else (bias[:, :20] - bias[:, :20].amax(-1, keepdim=True)).exp()
    return q, k, v, c, None, starts, state, torch.float32, 0, 1


@pytest.mark.parametrize("method, documents, init", [("band", False, False), ("prefix", False, False),
                                                     ("fft", False, False), ("band", True, False),
                                                     ("band", False, True)])
def test_mixing_ops_pass_opcheck(method, documents, init):
    """Fake implementations agree with the real ones, strides included (inductor relies on them), and autograd is
    registered right: torch.library.opcheck on the op and on its backward."""
    args = _mix_args(method, documents, init)
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.library.opcheck(torch.ops.lm.kernelized_mix, leaves)
    q, k, v, c, r, starts, state = args[:7]
    out, den = torch.ops.lm.kernelized_mix(*args)
    backward = (q, k, v, c, r, starts, state, out.detach(), den, torch.randn_like(out), *args[7:], True, r is not None)
    torch.library.opcheck(torch.ops.lm.kernelized_mix_backward, [a.detach() if isinstance(a, torch.Tensor) else a
                                                                 for a in backward])


def test_fused_op_passes_opcheck():
    from lm.ops.fused import fused_available
    if not fused_available("cpu"):
        pytest.skip("needs triton (TRITON_INTERPRET=1 on CPU)")
    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(1, 2, 40, 5, generator=g), torch.rand(1, 2, 40, 5, generator=g)
    v, c = torch.randn(1, 2, 40, 3, generator=g), torch.rand(2, 7, generator=g)
    torch.library.opcheck(torch.ops.lm.fused_chunk, [x.requires_grad_() for x in (q, k, v, c)] + [None, None, 16,
                                                                                                  False])


@pytest.mark.slow
@pytest.mark.parametrize("method, L", [("dense", 150), ("band", 20), ("prefix", None), ("fft", 150),
                                       ("fused", 20)])
def test_inductor_compiled_op_equals_eager(method, L):
    """torch.compile with inductor (not only aot_eager) at N = 150 (not a multiple of 64): values and gradients of
    every method equal eager's."""
    from lm.ops.fused import fused_available
    if method == "fused" and not fused_available("cpu"):
        pytest.skip("needs triton (TRITON_INTERPRET=1 on CPU)")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(2, 2, 150, 8, generator=g), torch.rand(2, 2, 150, 8, generator=g),
          torch.randn(2, 2, 150, 4, generator=g)] + ([] if L is None else [torch.randn(2, L, generator=g)])
    xs = [x.requires_grad_() for x in xs]

    def attend(*a):
        return kernelized_attention(*a, method=method, fft_dtype=torch.float32) * 2.0

    grad = torch.randn(2, 2, 150, 4, generator=g)
    eager = attend(*xs)
    compiled = torch.compile(attend, backend="inductor", fullgraph=True)(*xs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(compiled, xs, grad), torch.autograd.grad(eager, xs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
