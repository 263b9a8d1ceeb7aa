"""Feature maps: unbiased kernel estimates, orthogonal draws, positivity, and the stabiliser's exactness."""
import math

import pytest
import torch

from lm.ops.feature_maps import (RELU_EPS, elu_features, nprf_features, positive_random_features,
                                 random_projection, relu_features)
from lm.ops.reference import kernelized_attention_reference


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("m, d", [(16, 16), (40, 16), (7, 5)])
def test_orthogonal_projection_blocks_are_orthogonal_with_chi_norms(m, d):
    w = random_projection(m, d, orthogonal=True, generator=_gen(0), dtype=torch.float64)
    assert w.shape == (m, d)
    for start in range(0, m, d):
        block = w[start:start + d]
        gram = block @ block.T
        off_diag = gram - torch.diag(torch.diagonal(gram))
        assert off_diag.abs().max() < 1e-10 * gram.diagonal().max()
    # Rows are not unit vectors: their norms are rescaled like Gaussian vectors' norms (chi with d dof).
    norms = w.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))


def test_projection_row_norms_follow_chi_distribution():
    d, m = 8, 8 * 2000
    w = random_projection(m, d, orthogonal=True, generator=_gen(1), dtype=torch.float64)
    sq = (w * w).sum(1)  # chi-square with d dof: mean d, variance 2d
    se = math.sqrt(2 * d / m)
    assert abs(sq.mean().item() - d) < 5 * se
    assert abs(sq.var().item() - 2 * d) < 0.1 * 2 * d


def test_projection_is_deterministic_from_generator():
    a = random_projection(32, 16, generator=_gen(5))
    b = random_projection(32, 16, generator=_gen(5))
    c = random_projection(32, 16, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random_projection(10, 4, orthogonal=False, generator=_gen(1)).shape == (10, 4)
    with pytest.raises(ValueError, match="num_features"):
        random_projection(0, 4)


def _mc_check(estimates: torch.Tensor, target: torch.Tensor, block: int):
    """Per-feature estimates (..., M) whose mean should be `target` (...): |mean - target| < 5 standard errors.

    Orthogonal features are dependent within a block of `block` rows, so the standard error is taken over
    block means (independent draws)."""
    blocks = estimates.reshape(*estimates.shape[:-1], -1, block).mean(-1)
    mean = blocks.mean(-1)
    se = blocks.std(-1) / math.sqrt(blocks.shape[-1])
    assert (se / target).max() < 0.03, "too few features for the test to detect a bias"
    z = (mean - target).abs() / se
    assert z.max() < 5.0, f"bias of {z.max():.1f} standard errors"


@pytest.mark.parametrize("orthogonal", [False, True])
def test_prf_estimates_exp_dot_product_without_bias(orthogonal):
    d, m = 4, 40000
    torch.manual_seed(0)
    q, k = 0.4 * torch.randn(6, d, dtype=torch.float64), 0.5 * torch.randn(6, d, dtype=torch.float64)
    w = random_projection(m, d, orthogonal=orthogonal, generator=_gen(2), dtype=torch.float64)
    pq = positive_random_features(q, w, stabilise=False)
    pk = positive_random_features(k, w, stabilise=False)
    per_feature = m * pq[:, None, :] * pk[None, :, :]  # (6, 6, M); their mean is phi(q).phi(k)
    _mc_check(per_feature, torch.exp(q @ k.T), d)
    assert torch.allclose(per_feature.mean(-1), pq @ pk.T)


def test_nprf_estimates_exp_of_cosine():
    d, m = 4, 40000
    torch.manual_seed(1)
    q, k = 3 * torch.randn(5, d, dtype=torch.float64), 3 * torch.randn(5, d, dtype=torch.float64)
    w = random_projection(m, d, generator=_gen(3), dtype=torch.float64)
    per_feature = m * nprf_features(q, w, stabilise=False)[:, None] * nprf_features(k, w, stabilise=False)[None]
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).T
    _mc_check(per_feature, torch.exp(cos), d)


def test_features_are_positive_and_finite():
    torch.manual_seed(2)
    w = random_projection(64, 16, generator=_gen(4))
    x = torch.randn(2, 3, 50, 16)
    for feats in (positive_random_features(x * 0.5, w, stabilise=True),
                  positive_random_features(x * 0.5, w, stabilise=False),
                  nprf_features(x * 100, w, stabilise=False), nprf_features(x, w, stabilise=True),
                  elu_features(x * 10), relu_features(x)):
        assert feats.shape[:-1] == x.shape[:-1] and torch.isfinite(feats).all() and (feats > 0).all()
    assert torch.allclose(elu_features(x), torch.where(x > 0, x + 1, torch.exp(x)))
    assert torch.allclose(relu_features(x), x.clamp(min=0) + RELU_EPS)


def test_key_exponent_is_bounded_without_a_stabiliser():
    """Keys take no stabiliser; the exponent w.k - |k|^2/2 <= |w|^2/2 keeps them finite for any k."""
    w = random_projection(64, 32, generator=_gen(7))
    k = torch.randn(1000, 32) * torch.logspace(-2, 3, 1000)[:, None]
    feats = positive_random_features(k, w, stabilise=False)
    bound = torch.exp(0.5 * (w * w).sum(1)) / math.sqrt(64)
    assert torch.isfinite(feats).all() and (feats <= bound * (1 + 1e-5)).all()
    # NPRF: |w.k| <= |w| for unit k.
    nf = nprf_features(k, w, stabilise=False)
    assert (nf <= torch.exp(w.norm(dim=1) - 0.5) / 8 * (1 + 1e-5)).all()


def test_query_stabiliser_cancels_exactly_in_normalised_attention():
    """Per-query max subtraction changes phi(q_i) by a factor of query i only: the attention is unchanged."""
    torch.manual_seed(3)
    b, h, n, d, m = 2, 2, 20, 8, 32
    w = random_projection(m, d, generator=_gen(8), dtype=torch.float64)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    rpe = torch.randn(h, 7, dtype=torch.float64)
    pk = positive_random_features(k, w, stabilise=False)
    stable = positive_random_features(q, w, stabilise=True)
    raw = positive_random_features(q, w, stabilise=False)
    assert not torch.allclose(stable, raw)
    assert torch.allclose(stable.amax(-1), torch.full((b, h, n), m ** -0.5, dtype=torch.float64))
    out_stable = kernelized_attention_reference(stable, pk, v, rpe)
    out_raw = kernelized_attention_reference(raw, pk, v, rpe)
    assert torch.allclose(out_stable, out_raw, rtol=1e-12, atol=1e-12)


def test_a_per_key_stabiliser_would_change_attention():
    """Why keys are not stabilised: a per-key constant reweights the keys (the outputs move)."""
    torch.manual_seed(4)
    b, h, n, d, m = 1, 1, 12, 8, 32
    w = random_projection(m, d, generator=_gen(9), dtype=torch.float64)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    pq = positive_random_features(q, w, stabilise=True)
    pk = positive_random_features(k, w, stabilise=False)
    pk_rowmax = positive_random_features(k, w, stabilise=True)
    out = kernelized_attention_reference(pq, pk, v)
    assert (kernelized_attention_reference(pq, pk_rowmax, v) - out).abs().max() > 1e-3


def test_key_features_do_not_depend_on_other_keys():
    """Causality in decoding: a key's features are known without any later key."""
    w = random_projection(16, 8, generator=_gen(10))
    k = torch.randn(1, 1, 30, 8)
    k2 = k.clone()
    k2[..., 20:, :] *= 50
    for fn in (positive_random_features, nprf_features):
        assert torch.equal(fn(k, w, stabilise=False)[..., :20, :], fn(k2, w, stabilise=False)[..., :20, :])


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="agree on d"):
        positive_random_features(torch.randn(3, 8), torch.randn(4, 6), stabilise=False)


@pytest.mark.parametrize("fmap", ["prf", "nprf"])
def test_feature_maps_run_in_float32_under_bf16_autocast(fmap):
    """Autocast would run x @ w.T in bf16 (phi off by up to ~2e-2); the feature maps switch it off."""
    torch.manual_seed(11)
    x, w = torch.randn(2, 3, 200, 16), random_projection(64, 16, generator=_gen(11))
    fn = positive_random_features if fmap == "prf" else nprf_features
    scale = 0.5 if fmap == "prf" else 1.0  # PRF inputs as the layer scales them (|x| ~ 1)
    ref = fn(x.double() * scale, w.double(), stabilise=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(x * scale, w, stabilise=True)
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max() < 1e-5


@pytest.mark.parametrize("feature_map", ["nprf", "prf", "elu"])
def test_kernelized_layer_features_are_float32_under_bf16_autocast(feature_map):
    """The layer's q/k/v projection follows autocast (bf16); the features computed from it do not."""
    from lm.model.attention import KernelizedAttention
    from lm.config import AttentionConfig, ModelConfig
    cfg = ModelConfig(vocab_size=10, n_layers=1, d_model=32, n_heads=2, d_ff=64,
                      attention=AttentionConfig(feature_map=feature_map, num_features=32, kind="kernelized",
                                                rpe="none"))
    torch.manual_seed(12)
    attn = KernelizedAttention(cfg)
    x = torch.randn(2, 50, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = attn.qkv(x)
        phi_q, phi_k, v32 = attn.features(x)
    assert q.dtype == torch.bfloat16 and phi_q.dtype == phi_k.dtype == v32.dtype == torch.float32
    qd, kd = q.double(), k.double()
    if feature_map == "nprf":
        w = attn.projection.double()
        want = nprf_features(qd, w, stabilise=True), nprf_features(kd, w, stabilise=False)
    elif feature_map == "prf":
        w, s = attn.projection.double(), 16 ** -0.25
        want = positive_random_features(qd * s, w, stabilise=True), positive_random_features(kd * s, w, stabilise=False)
    else:
        want = elu_features(qd), elu_features(kd)
    for got, ref in zip((phi_q, phi_k), want):
        assert ((got.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max() < 1e-5
