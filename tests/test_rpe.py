"""Relative position encodings: tables vs explicit loops, clamping, buckets, dense bias, sharing in the model."""
import math

import pytest
import torch

from conftest import tiny_model_config
from lm.model import Transformer
from lm.model.rpe import BucketedRPE, PerOffsetRPE, relative_bias, t5_causal_buckets


def _t5_bucket_loop(t: int, num_buckets: int, max_distance: int) -> int:
    """T5's unidirectional relative_position_bucket, written out for one offset."""
    exact = num_buckets // 2
    if t < exact:
        return t
    b = exact + int(math.log(t / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return min(b, num_buckets - 1)


def _op_value(table: torch.Tensor, t: int) -> torch.Tensor:
    """What the op reads for offset t: table[..., min(t, L - 1)]."""
    return table[..., min(t, table.shape[-1] - 1)]


@pytest.mark.parametrize("heads", [None, 3])
def test_per_offset_table_matches_explicit_clamping(heads):
    rpe = PerOffsetRPE(heads, max_distance=6)
    with torch.no_grad():
        rpe.bias.normal_()
    assert rpe.full_table().shape == ((7,) if heads is None else (3, 7))
    for n in (1, 2, 5, 7, 8, 30):
        table = rpe.table(n)
        assert table.shape[-1] == min(n, 7)
        for t in range(n):
            assert torch.equal(_op_value(table, t), rpe.bias[..., min(t, 6)])


@pytest.mark.parametrize("num_buckets, max_distance", [(8, 20), (32, 128), (6, 7), (2, 5)])
def test_t5_buckets_match_the_reference_formula(num_buckets, max_distance):
    t = torch.arange(3 * max_distance)
    got = t5_causal_buckets(t, num_buckets, max_distance)
    want = [_t5_bucket_loop(int(i), num_buckets, max_distance) for i in t]
    assert got.tolist() == want
    assert (got[1:] >= got[:-1]).all() and got[0] == 0
    assert (got[max_distance:] == num_buckets - 1).all()


@pytest.mark.parametrize("heads", [None, 4])
def test_bucketed_table_matches_explicit_lookup(heads):
    nb, md = 8, 40
    rpe = BucketedRPE(heads, nb, md)
    with torch.no_grad():
        rpe.bias.normal_()
    L = rpe.table_len
    buckets = [_t5_bucket_loop(t, nb, md) for t in range(md + 1)]
    assert buckets[L - 1] == nb - 1 and buckets[L - 2] != nb - 1  # L is as short as the buckets allow
    for n in (1, 3, L - 1, L, L + 1, 100):
        table = rpe.table(n)
        assert table.shape == ((min(n, L),) if heads is None else (heads, min(n, L)))
        for t in range(n):
            assert torch.equal(_op_value(table, t), rpe.bias[..., _t5_bucket_loop(t, nb, md)])


def test_bucketed_rejects_impossible_settings():
    with pytest.raises(ValueError, match="rpe_max_distance"):
        BucketedRPE(2, 32, 10)


def test_tables_carry_gradients_to_the_parameters():
    for rpe in (PerOffsetRPE(2, 5), BucketedRPE(2, 6, 12)):
        (rpe.table(30) * torch.arange(rpe.table(30).shape[-1])).sum().backward()
        assert rpe.bias.grad is not None and rpe.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("shared", [True, False])
def test_dense_bias_matches_explicit_loops(shared):
    torch.manual_seed(0)
    table = torch.randn(5) if shared else torch.randn(2, 5)
    n = 9
    bias = relative_bias(table, torch.arange(n), torch.arange(n))
    assert bias.shape == ((n, n) if shared else (2, n, n))
    for i in range(n):
        for j in range(n):
            if j > i:
                assert torch.isinf(bias[..., i, j]).all() and (bias[..., i, j] < 0).all()
            else:
                assert torch.equal(bias[..., i, j], table[..., min(i - j, 4)])


def test_relative_bias_for_a_decoding_query():
    table = torch.randn(3, 4)
    q_pos, k_pos = torch.tensor([10]), torch.arange(12)
    bias = relative_bias(table, q_pos, k_pos)
    assert bias.shape == (3, 1, 12)
    for j in range(12):
        want = table[:, min(10 - j, 3)] if j <= 10 else torch.full((3,), float("-inf"))
        assert torch.equal(bias[:, 0, j], want)


def _cfg(**attn):
    return tiny_model_config(vocab_size=20, n_layers=3, d_model=16, n_heads=2, d_ff=32, num_features=8, **attn)


def test_model_shares_one_rpe_across_layers_and_heads_when_asked():
    m = Transformer(_cfg(rpe="per_offset", rpe_max_distance=10, rpe_shared=True))
    assert len(m.rpe) == 1
    tables = m.rpe_tables(50)
    assert all(t is tables[0] for t in tables) and tables[0].shape == (11,)
    assert sum("rpe" in k for k in m.state_dict()) == 1


def test_model_has_one_rpe_per_layer_by_default():
    m = Transformer(_cfg(rpe="bucketed", rpe_num_buckets=8, rpe_max_distance=30))
    assert len(m.rpe) == 3
    tables = m.rpe_tables(4)
    assert [t.shape for t in tables] == [(2, 4)] * 3
    assert m.rpe_tables(None)[0].shape == (2, m.rpe[0].table_len)


def test_models_without_rpe_have_none():
    assert Transformer(_cfg(kind="kernelized", rpe="none")).rpe_tables(8) == [None] * 3
    assert Transformer(_cfg(kind="softmax", rpe="none")).rpe_tables(8) == [None] * 3


def test_config_rejects_impossible_buckets_naming_the_keys():
    from lm.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"model\.attention\.rpe_max_distance"):
        load_config([], ["model.attention.rpe=bucketed", "model.attention.rpe_max_distance=10"])
    with pytest.raises(ConfigError, match=r"model\.attention\.method=prefix"):
        load_config([], ["model.attention.method=prefix"])
