"""The FFT precision policy (lm.ops.precision): float32 for the biases LMs learn, float64 for those that need it,
decided on the host from the bias table; checked against float64 over bias families, and its mechanism (error
~ eps * risk) checked too."""
import pytest
import torch

from lm.config import AttentionConfig, ModelConfig
from lm.model import Transformer
from lm.ops import kernelized_attention
from lm.ops.precision import (FP32_MAX_RISK, LENGTHS, MAX_LENGTH, NEAR_BAND, auto_fft_dtype, data_range,
                              far_field_risk, fp32_max_lengths, safe_length, updated_policy)
from lm.ops.reference import kernelized_attention_reference_rows

from conftest import lm_bias, op_inputs, worst_relative

EPS32 = torch.finfo(torch.float32).eps
FP32_FAMILIES = ["flat", "init", "decay_0.25log", "decay_0.5log", "decay_1log", "decay_1.5log", "decay_0.01t",
                 "decay_0.001t", "noisy_decay", "rising_1"]
FP64_FAMILIES = ["rising_3", "rising_6", "spiky_15", "random_15"]


def policy_dtype(bias, n):
    """The dtype the model's policy gives a layer with this table at length n."""
    return torch.float32 if n <= fp32_max_lengths([bias])[0] else torch.float64


def check_family(kind, N):
    q, k, v = op_inputs(1, 2, N, 16, 8, dtype=torch.float32)
    bias = lm_bias(kind, N)
    rows = torch.cat([torch.arange(0, 400), torch.arange(N - 100, N),
                      torch.randint(400, N - 100, (300,), generator=torch.Generator().manual_seed(2))])
    ref = kernelized_attention_reference_rows(q, k, v, bias, rows)
    chosen = policy_dtype(bias, N)
    assert auto_fft_dtype(bias, N, k, v) == chosen  # direct callers decide the same on such data
    err = {dt: worst_relative(kernelized_attention(q, k, v, bias, method="fft", fft_dtype=dt)[:, :, rows], ref)
           for dt in (torch.float32, torch.float64)}
    risk = far_field_risk(bias, [N]).item()
    assert err[chosen] <= 1e-4, (kind, chosen, err)
    assert err[torch.float64] <= 1e-5, (kind, err)
    # The mechanism behind the threshold: float32 error ~ float32 floor + eps * risk (measured factor <= 1).
    assert err[torch.float32] <= 3e-6 + 1.5 * EPS32 * risk, (kind, risk, err)
    return chosen


@pytest.mark.slow
@pytest.mark.parametrize("kind", FP32_FAMILIES + FP64_FAMILIES)
def test_policy_over_bias_families_at_16k(kind):
    chosen = check_family(kind, 16384)
    assert chosen == (torch.float32 if kind in FP32_FAMILIES else torch.float64), kind


@pytest.mark.parametrize("kind", ["decay_0.5log", "noisy_decay", "decay_0.01t", "rising_6", "spiky_15"])
def test_policy_over_bias_families_at_4k(kind):
    chosen = check_family(kind, 4096)
    assert chosen == (torch.float64 if kind in ("rising_6", "spiky_15") else torch.float32), kind


@pytest.mark.parametrize("kind", ["decay_0.5log", "random_15", "rising_3", "init", "flat", "spiky_15"])
@pytest.mark.parametrize("L, n", [(5000, 3000), (300, 3000), (40, 1000), (5000, 5000), (100, 64), (65, 70)])
def test_risk_formula_matches_its_definition(kind, L, n):
    """The prefix-sum evaluation equals risk written out: sqrt(n sum (c - mu)^2) / sum of the near weights."""
    b = lm_bias(kind, L).double()
    c = torch.exp(b - b.amax(-1, keepdim=True))[:, torch.arange(n).clamp(max=L - 1)]
    expected = 0.0
    if n > NEAR_BAND:
        far = c[:, NEAR_BAND:]
        residual = ((far - far.amin(-1, keepdim=True)) ** 2).sum(-1)
        expected = (torch.sqrt(n * residual) / c[:, :NEAR_BAND].sum(-1)).max().item()
    got = far_field_risk(lm_bias(kind, L), [n]).item()
    assert abs(got - expected) <= 1e-6 + 1e-9 * expected


def test_safe_lengths_and_hysteresis():
    rising = lm_bias("rising_6", 1 << 15)
    risks = far_field_risk(rising).tolist()
    assert all(a <= b for a, b in zip(risks, risks[1:]))  # risk grows with N
    hi, lo = safe_length(risks), safe_length(risks, FP32_MAX_RISK / 2)
    assert NEAR_BAND < lo <= hi < 1 << 15
    assert far_field_risk(rising, [hi]).item() <= FP32_MAX_RISK < far_field_risk(rising, [2 * hi]).item()
    assert fp32_max_lengths([rising, lm_bias("flat", 100)]) == [hi, MAX_LENGTH]
    assert safe_length([FP32_MAX_RISK * 2] * len(LENGTHS)) == NEAR_BAND // 2  # nothing safe: always float64
    # Lowered at once when unsafe, raised only with a 2x margin, otherwise kept (no flip-flop near the edge).
    assert updated_policy(MAX_LENGTH, risks) == hi
    assert updated_policy(NEAR_BAND, risks) == lo
    assert updated_policy(hi, risks) == hi and updated_policy(lo, risks) == lo


def test_model_refreshes_its_policy_from_the_rpe():
    cfg = ModelConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                      attention=AttentionConfig(num_features=8, rpe_max_distance=1 << 14))
    model = Transformer(cfg)
    model.init_weights()
    assert [b.attn.fft_fp32_max_len for b in model.blocks] == [MAX_LENGTH] * 2  # zero tables: float32
    rising = lm_bias("rising_6", (1 << 14) + 1, H=4)
    with torch.no_grad():
        model.rpe[1].bias.copy_(rising)  # in place: the version counter moves, no value is read
    model(torch.randint(0, 50, (1, 10)))  # eager forward notices and refreshes
    expected = fp32_max_lengths([rising])[0]
    assert [b.attn.fft_fp32_max_len for b in model.blocks] == [MAX_LENGTH, expected] and expected < 1 << 14
    other = Transformer(cfg)
    other.load_state_dict(model.state_dict())  # loading refreshes too
    assert [b.attn.fft_fp32_max_len for b in other.blocks] == [MAX_LENGTH, expected]
    # The layer hands the op float64 beyond its length and float32 within it.
    attn = other.blocks[1].attn
    n = 2 * expected
    x = torch.randn(1, n, 32)
    table = other.rpe_tables(n)[1]
    phi_q, phi_k, v = attn.features(x)
    for dtype, length in ((torch.float64, n), (torch.float32, expected)):
        got = attn.attend(phi_q[:, :, :length], phi_k[:, :, :length], v[:, :, :length], table[:, :length])
        want = kernelized_attention(phi_q[:, :, :length], phi_k[:, :, :length], v[:, :, :length],
                                    table[:, :length], method="fft", fft_dtype=dtype)
        assert attn.method == "auto" and torch.equal(got, want)


def test_auto_mode_reads_the_data_range_too():
    """Direct callers get float64 when some positions dwarf others (FFT round-off follows the largest)."""
    N = 2000
    q, k, v = op_inputs(1, 2, N, 8, 4, dtype=torch.float32)
    bias = lm_bias("decay_0.5log", N)
    assert data_range(k, v).item() < 1.2 and auto_fft_dtype(bias, N, k, v) == torch.float32
    k[:, :, N // 2:] *= 100
    v[:, :, N // 2:] *= 1000
    assert data_range(k, v).item() > 1e3 and auto_fft_dtype(bias, N, k, v) == torch.float64
