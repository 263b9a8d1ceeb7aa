"""GPU rules checked on CPU: the model runs forward + backward on the ``meta`` device for every attention kind
and method (so nothing reads tensor values on the host), and the batched path dispatches few kernels.

``OpCounter`` (conftest) runs the custom op's own implementation under the dispatch mode, so on ``meta`` the
op's kernels really execute (the batched, non-CPU schedule) and are counted."""
import pytest
import torch
import torch.nn.functional as F

from lm.config import AttentionConfig, ModelConfig
from lm.model import Transformer
from lm.ops.kernelized import choose_method

from conftest import OpCounter

# kernelized_rpe x {dense, fft, band, auto}, kernelized x {dense, prefix}, softmax with and without RPE.
KINDS = [
    *[dict(kind="kernelized_rpe", method=m) for m in ("dense", "fft", "band", "auto")],
    dict(kind="kernelized_rpe", method="auto", rpe="bucketed", rpe_num_buckets=8, rpe_shared=True),
    *[dict(kind="kernelized", rpe="none", method=m) for m in ("dense", "prefix")],
    dict(kind="softmax"),
    dict(kind="softmax", rpe="none"),
]
IDS = ["-".join(str(v) for v in k.values()) for k in KINDS]


def model_cfg(vocab=64, n_layers=2, d_model=32, n_heads=4, num_features=8, **attn) -> ModelConfig:
    attn.setdefault("rpe_max_distance", 4096)
    return ModelConfig(vocab_size=vocab, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_ff=4 * d_model,
                       dropout=0.0, attention=AttentionConfig(num_features=num_features, **attn))


def meta_step(cfg: ModelConfig, batch: int, n: int) -> OpCounter:
    """Build the model on ``meta``, run forward + cross-entropy + backward under an ``OpCounter``."""
    with torch.device("meta"):
        model = Transformer(cfg)
        model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (batch, n + 1), device="meta")
    counter = OpCounter()
    with counter:
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert logits.device.type == "meta" and logits.shape == (batch, n, cfg.vocab_size)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    return counter


@pytest.mark.parametrize("attn", KINDS, ids=IDS)
def test_model_forward_backward_on_meta(attn):
    # 300 tokens: several band blocks and an FFT far field; auto at 2048 picks fft / band on a GPU-like device.
    n = 2048 if attn.get("method") == "auto" else 300
    cfg = model_cfg(**attn)
    counter = meta_step(cfg, batch=2, n=n)
    method = attn.get("method")
    if method == "auto":
        with torch.device("meta"):
            table_len = Transformer(cfg).rpe_tables(n)[0].shape[-1]
        method = choose_method(n, min(table_len, n), "meta", batch_heads=2 * cfg.n_heads,
                               features=cfg.attention.num_features, head_dim=cfg.d_model // cfg.n_heads)
        assert method in ("fft", "band", "dense")  # the cost model's pick (no Triton on meta)
    uses_op = attn["kind"] != "softmax" and method != "dense"
    n_layers = 2
    assert counter.custom["lm.kernelized_mix.default"] == (n_layers if uses_op else 0)
    assert counter.custom["lm.kernelized_mix_backward.default"] == (n_layers if uses_op else 0)
    assert (counter.ops["aten.fft_rfft.default"] > 0) == (method == "fft")  # the far field ran on meta too


def op_count(batch: int, **attn) -> int:
    """Dispatched ops of one forward + backward of a 1-layer model: H=8, N=4096, M=64, D=64."""
    cfg = model_cfg(vocab=1000, n_layers=1, d_model=512, n_heads=8, num_features=64, **attn)
    return meta_step(cfg, batch, 4096).total


def test_op_count_general_rpe_fft_path():
    """General per-offset RPE (FFT path) at B=8: at most 3,000 ops (the rest of the model takes ~500), and
    growing with B only as tiles fill the memory budget (never one loop turn per batch element or head)."""
    small, large = op_count(2, rpe_max_distance=4096, method="fft"), op_count(8, rpe_max_distance=4096, method="fft")
    assert large <= 3000, large
    assert large < 2.5 * small, (small, large)


def test_op_count_band_and_prefix_do_not_grow_with_batch():
    for attn in (dict(rpe_max_distance=256, method="band"), dict(kind="kernelized", rpe="none", method="prefix")):
        small, large = op_count(1, **attn), op_count(8, **attn)
        assert large <= 1000 and abs(large - small) <= 10, (attn, small, large)
