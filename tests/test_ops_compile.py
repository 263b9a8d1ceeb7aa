"""torch.compile(fullgraph=True) traces the whole model (the op is a registered custom op with fake and autograd
implementations) and gives the eager loss and gradients for every attention kind and method; an unsupported
combination is an error that says which."""
import pytest
import torch
import torch.nn.functional as F

from lm.config import AttentionConfig, ModelConfig
from lm.model import Transformer
from lm.ops import kernelized_attention

from test_ops_meta import IDS, KINDS


def loss_and_grads(forward, model, ids):
    model.zero_grad(set_to_none=True)
    logits = forward(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("attn", KINDS, ids=IDS)
def test_compiled_model_matches_eager(attn):
    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                      attention=AttentionConfig(num_features=8, rpe_max_distance=512, **attn))
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    with torch.no_grad():  # a trained-looking RPE: decaying with noise
        for r in model.rpe:
            r.bias.copy_(-0.5 * torch.log1p(torch.arange(r.bias.shape[-1], dtype=torch.float32))
                         + 0.3 * torch.randn_like(r.bias))
    model.refresh_precision_policy()
    ids = torch.randint(0, 64, (2, 151), generator=torch.Generator().manual_seed(1))  # far field + 3 blocks
    eager_loss, eager_grads = loss_and_grads(model, model, ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(compiled, model, ids)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
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
