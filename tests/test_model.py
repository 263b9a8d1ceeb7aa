"""Attention layers against float64 dense references, and the Transformer: shapes, causality, init,
feature redraw, state_dict round trip, activation checkpointing, bf16."""
import math

import pytest
import torch

from conftest import tiny_model_config, trained_looking_model
from lm.model.attention import KernelizedAttention, SoftmaxAttention
from lm.model import INIT_STD, Transformer, sinusoidal_positions
from lm.ops.feature_maps import nprf_features, positive_random_features
from lm.ops.reference import kernelized_attention_reference

KINDS = [
    dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=6),
    dict(kind="kernelized_rpe", rpe="bucketed", rpe_num_buckets=6, rpe_max_distance=12, rpe_shared=True),
    dict(kind="kernelized", rpe="none", feature_map="prf"),
    dict(kind="kernelized", rpe="none", feature_map="elu"),
    dict(kind="softmax", rpe="per_offset", rpe_max_distance=6),
    dict(kind="softmax", rpe="none"),
]
IDS = [f"{a['kind']}-{a['rpe']}-{a.get('feature_map', 'nprf')}" for a in KINDS]



# ---------------------------------------------------------------- attention layers vs dense float64 references

def _layer_input(cfg, n=11, b=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(b, n, cfg.d_model)


@pytest.mark.parametrize("feature_map", ["nprf", "prf", "elu", "relu"])
@pytest.mark.parametrize("table_shape", [None, (4, 5), (30,)])
def test_kernelized_layer_matches_dense_reference(feature_map, table_shape):
    cfg = tiny_model_config(feature_map=feature_map, kind="kernelized_rpe" if table_shape else "kernelized",
                   rpe="per_offset" if table_shape else "none")
    attn = KernelizedAttention(cfg)
    x = _layer_input(cfg)
    table = None if table_shape is None else torch.randn(table_shape)
    got = attn(x, table)
    # Reference: the layer's maths written out in float64.
    xd = x.double()
    qkv = xd @ attn.qkv_proj.weight.double().T + attn.qkv_proj.bias.double()
    q, k, v = (t.view(2, 11, 4, 8).transpose(1, 2) for t in qkv.split(32, dim=-1))
    if feature_map in ("nprf", "prf"):
        w = attn.projection.double()
        if feature_map == "nprf":
            pq, pk = nprf_features(q, w, stabilise=True), nprf_features(k, w, stabilise=False)
        else:
            s = 8 ** -0.25
            pq, pk = (positive_random_features(q * s, w, stabilise=True),
                      positive_random_features(k * s, w, stabilise=False))
        # The kernel is what the features estimate: check one pair exactly against its definition.
        qq = torch.nn.functional.normalize(q, dim=-1) if feature_map == "nprf" else q * s
        kk = torch.nn.functional.normalize(k, dim=-1) if feature_map == "nprf" else k * s
        est = (torch.exp(qq @ w.T - (qq * qq).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])) @ \
              (torch.exp(kk @ w.T - (kk * kk).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])).transpose(-1, -2)
        ratio = (pq @ pk.transpose(-1, -2)) / est  # per-query constant only
        assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio))
    elif feature_map == "elu":
        pq, pk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    else:
        pq, pk = q.clamp(min=0) + 1e-6, k.clamp(min=0) + 1e-6
    o = kernelized_attention_reference(pq, pk, v, table)
    want = o.transpose(1, 2).reshape(2, 11, 32) @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_bias_elements", [2 ** 26, 4 * 9 * 4])  # the whole bias, or query chunks of 4
@pytest.mark.parametrize("shared", [True, False, None])
def test_softmax_layer_matches_dense_reference(shared, max_bias_elements):
    cfg = tiny_model_config(kind="softmax", rpe="none" if shared is None else "per_offset")
    attn = SoftmaxAttention(cfg)
    attn.max_bias_elements = max_bias_elements
    x = _layer_input(cfg, n=9)
    table = None if shared is None else (torch.randn(4) if shared else torch.randn(4, 4))
    got = attn(x, table)
    xd = x.double()
    qkv = xd @ attn.qkv_proj.weight.double().T + attn.qkv_proj.bias.double()
    q, k, v = (t.view(2, 9, 4, 8).transpose(1, 2) for t in qkv.split(32, dim=-1))
    out = torch.zeros(2, 4, 9, 8, dtype=torch.float64)
    for i in range(9):
        scores = torch.stack([(q[:, :, i] * k[:, :, j]).sum(-1) / math.sqrt(8)
                              + (0.0 if table is None else table.double()[..., min(i - j, 3)])
                              for j in range(i + 1)], dim=-1)
        out[:, :, i] = (torch.softmax(scores, -1)[..., None] * v[:, :, :i + 1]).sum(2)
    want = out.transpose(1, 2).reshape(2, 9, 32) @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the model

@pytest.mark.parametrize("attn", KINDS, ids=IDS)
def test_forward_shape_dtype_and_causality(attn):
    m = trained_looking_model(**attn)
    ids = torch.randint(0, 50, (3, 21))
    logits = m(ids)
    assert logits.shape == (3, 21, 50) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    changed = ids.clone()
    changed[:, 13:] = torch.randint(0, 50, (3, 8))
    logits2 = m(changed)
    assert torch.equal(logits[:, :13], logits2[:, :13]) or \
        (logits[:, :13] - logits2[:, :13]).abs().max() < 1e-5 * logits.abs().max()
    assert (logits[:, 13:] - logits2[:, 13:]).abs().max() > 1e-3  # the future did change


@pytest.mark.parametrize("attn", KINDS[:1] + KINDS[2:3] + KINDS[4:5], ids=IDS[:1] + IDS[2:3] + IDS[4:5])
def test_runs_beyond_rpe_distance_and_on_empty_or_single_tokens(attn):
    m = trained_looking_model(**attn)
    assert m(torch.randint(0, 50, (1, 100))).shape == (1, 100, 50)
    assert m(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 50)
    assert m(torch.zeros(2, 1, dtype=torch.long)).shape == (2, 1, 50)


def test_bad_config_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny_model_config(vocab_size=0))
    m = trained_looking_model()
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype long"):
        m(torch.zeros(1, 5))


def test_init_statistics():
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=500, n_layers=4, d_model=128, n_heads=4, d_ff=512)
    m = Transformer(cfg)
    m.init_weights()
    out_std = INIT_STD / math.sqrt(2 * 4)
    for w, std in [(m.tok_emb.weight, INIT_STD), (m.blocks[0].attn.qkv_proj.weight, INIT_STD),
                   (m.blocks[1].mlp.fc.weight, INIT_STD), (m.blocks[2].attn.out_proj.weight, out_std),
                   (m.blocks[3].mlp.proj.weight, out_std)]:
        assert abs(w.std().item() - std) < 0.03 * std and abs(w.mean().item()) < 0.05 * std
    for name, p in m.named_parameters():
        if name.endswith(".bias") and "rpe" not in name and "norm" not in name:
            assert torch.count_nonzero(p) == 0, name
    assert all(torch.count_nonzero(r.bias) == 0 for r in m.rpe)
    assert torch.equal(m.norm.weight, torch.ones(128)) and torch.count_nonzero(m.norm.bias) == 0
    # Tied output: the logits' weight is the embedding itself (one parameter).
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in set(m.parameters()))


def test_redraw_is_deterministic_from_a_seed_and_changes_the_features():
    m = trained_looking_model()
    before = [b.attn.projection.clone() for b in m.blocks]
    ids = torch.randint(0, 50, (2, 12))
    logits = m(ids)
    m.redraw_features(torch.Generator().manual_seed(7))
    after = [b.attn.projection.clone() for b in m.blocks]
    assert not torch.equal(before[0], after[0]) and not torch.equal(after[0], after[1])
    assert (m(ids) - logits).abs().max() > 1e-4
    m.redraw_features(torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b.attn.projection) for a, b in zip(after, m.blocks))
    m.redraw_features(torch.Generator().manual_seed(8))
    assert not torch.equal(after[0], m.blocks[0].attn.projection)
    assert "blocks.0.attn.projection" in m.state_dict()


@pytest.mark.parametrize("attn", KINDS, ids=IDS)
def test_state_dict_round_trip_gives_identical_logits(attn):
    m = trained_looking_model(seed=0, **attn)
    other = Transformer(tiny_model_config(**attn))  # different random weights and features
    ids = torch.randint(0, 50, (2, 15))
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.eval()(ids), m(ids))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    m = trained_looking_model(dropout=0.0)
    m.train()
    ids = torch.randint(0, 50, (2, 17))

    def loss_and_grads():
        m.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    loss, grads = loss_and_grads()
    m.activation_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert torch.allclose(loss, loss_ckpt)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_ckpt))
    assert all(g.abs().sum() > 0 for g, (n, _) in zip(grads, m.named_parameters()) if "rpe" in n)


def test_dropout_acts_in_training_only():
    m = trained_looking_model(dropout=0.5)
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(m(ids), m(ids))
    m.train()
    assert not torch.equal(m(ids), m(ids))


@pytest.mark.parametrize("attn", KINDS[:1] + KINDS[2:3] + KINDS[4:5], ids=IDS[:1] + IDS[2:3] + IDS[4:5])
def test_bf16_cast_forward_is_close_to_fp32(attn):
    m = trained_looking_model(**attn)
    ids = torch.randint(0, 50, (2, 24))
    ref = m(ids)
    m16 = trained_looking_model(**attn).to(torch.bfloat16)
    logits = m16(ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - ref).abs().max() < 5e-2 * ref.abs().max()
    loss = torch.nn.functional.cross_entropy(m16.train()(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m16.parameters() if p.grad is not None)


def test_sinusoidal_positions_match_the_formula_and_only_kernelized_uses_them():
    pos = torch.tensor([0, 3, 1000])
    pe = sinusoidal_positions(pos, 6)
    scale = INIT_STD * math.sqrt(2)
    for r, p in enumerate(pos.tolist()):
        for i in range(3):
            f = 10000 ** (-i / 3)
            assert math.isclose(pe[r, 2 * i].item(), scale * math.sin(p * f), rel_tol=1e-5, abs_tol=1e-9)
            assert math.isclose(pe[r, 2 * i + 1].item(), scale * math.cos(p * f), rel_tol=1e-5, abs_tol=1e-9)
    assert trained_looking_model(kind="kernelized", rpe="none").absolute_positions
    assert not trained_looking_model().absolute_positions and not trained_looking_model(kind="softmax").absolute_positions
    # Repeated tokens: without positions or RPE every position would see identical keys and values.
    m = trained_looking_model(kind="kernelized", rpe="none")
    ids = torch.tensor([[5, 5, 5, 5]])
    logits = m(ids)[0]
    assert (logits[0] - logits[3]).abs().max() > 1e-4
    m.absolute_positions = False
    logits = m(ids)[0]
    assert torch.allclose(logits[0], logits[3], atol=1e-6)


def test_softmax_query_chunks_give_the_same_gradients():
    cfg = tiny_model_config(kind="softmax", rpe="per_offset", rpe_max_distance=5)
    torch.manual_seed(3)
    attn, table = SoftmaxAttention(cfg), torch.randn(4, 6, requires_grad=True)
    x = torch.randn(2, 13, 32, requires_grad=True)
    grads = []
    for budget in (2 ** 26, 4 * 13 * 5):  # whole, then chunks of 5 queries
        attn.max_bias_elements = budget
        attn.zero_grad()
        x.grad = table.grad = None
        (attn(x, table) ** 2).sum().backward()
        grads.append([x.grad.clone(), table.grad.clone(), attn.qkv_proj.weight.grad.clone()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
