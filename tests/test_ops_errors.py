"""Bad input to lm.ops.kernelized_attention: a ValueError that names the argument and the expected shape."""
import pytest
import torch

from lm.ops import kernelized_attention


def ok():
    return torch.rand(2, 3, 10, 4), torch.rand(2, 3, 10, 4), torch.randn(2, 3, 10, 5)


@pytest.mark.parametrize("change, needle", [
    (lambda q, k, v, b: (q[0], k, v, b), r"phi_q must have shape \(B, H, N, M\)"),
    (lambda q, k, v, b: (q, k[:, :, :9], v, b), r"phi_k must have the shape of phi_q"),
    (lambda q, k, v, b: (q, k, v[:, :2], b), r"v must have shape \(B, H, N, D\) = \(2, 3, 10, D\)"),
    (lambda q, k, v, b: (q, k, v[0], b), r"v must have shape"),
    (lambda q, k, v, b: (q, k, v, torch.zeros(2, 7)), r"rpe_bias must have shape \(H, L\) = \(3, L\) or \(L,\)"),
    (lambda q, k, v, b: (q, k, v, torch.zeros(3, 0)), r"rpe_bias must have shape"),
    (lambda q, k, v, b: (q, k, v, torch.zeros(1, 3, 7)), r"rpe_bias must have shape"),
    (lambda q, k, v, b: (q.long(), k, v, b), r"phi_q has dtype torch.int64"),
    (lambda q, k, v, b: (q, k, v, torch.zeros(3, 7, dtype=torch.int32)), r"rpe_bias has dtype"),
    (lambda q, k, v, b: (q, k, v.numpy(), b), r"v must be a torch.Tensor"),
    (lambda q, k, v, b: (q[:, :, :0], k[:, :, :0], v[:, :, :0], b), r"N, M and D must be >= 1"),
])
def test_bad_inputs_name_the_argument(change, needle):
    q, k, v = ok()
    with pytest.raises(ValueError, match=needle):
        kernelized_attention(*change(q, k, v, torch.zeros(3, 7)))


def test_bad_method():
    with pytest.raises(ValueError, match=r"method='flash' is not one of"):
        kernelized_attention(*ok(), method="flash")


def test_prefix_rejects_rpe():
    with pytest.raises(ValueError, match=r"method='prefix' .* takes no rpe_bias"):
        kernelized_attention(*ok(), torch.zeros(7), method="prefix")


def test_inputs_are_not_modified():
    q, k, v = ok()
    b = torch.randn(3, 7)
    copies = [x.clone() for x in (q, k, v, b)]
    for method in ("fft", "band", "dense"):
        kernelized_attention(q, k, v, b, method=method).sum()
    for x, c in zip((q, k, v, b), copies):
        assert torch.equal(x, c)
