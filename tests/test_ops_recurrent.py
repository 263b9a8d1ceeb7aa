"""The recurrent form of the op (lm.ops.recurrent) against the parallel op and the float64 reference: the state
the parallel op hands over, then steps, give every later row; the state after n tokens is the same whether
built at once or step by step; padding keys with zero features change nothing."""
import pytest
import torch

from conftest import bias_of, op_inputs
from lm.ops import initial_state, kernelized_attention, kernelized_attention_step, state_after
from lm.ops.recurrent import MIN_RING_CAPACITY
from lm.ops.reference import kernelized_attention_reference

# (N, L or None): no RPE, a ring of 1, clipped, a table longer than the sequence (general RPE), one ring larger
# than the minimum capacity so that it grows while it fills
CASES = [(37, None), (37, 2), (37, 7), (23, 40), (2 * MIN_RING_CAPACITY + 5, 3 * MIN_RING_CAPACITY)]


def steps_from(prefix: int, q, k, v, bias, in_place=False):
    """The parallel op over the first ``prefix`` tokens, then one step per remaining token: every row's output."""
    n = q.shape[2]
    if prefix:
        out, state = kernelized_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], bias,
                                          output_final_state=True)
        rows = [out]
    else:
        B, H, _, M = q.shape
        state = initial_state(B, H, M, v.shape[-1], 1 if bias is None else bias.shape[-1], dtype=q.dtype)
        rows = []
    for t in range(prefix, n):
        o, state = kernelized_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, bias, in_place=in_place)
        rows.append(o[:, :, None])
    return torch.cat(rows, dim=2), state


@pytest.mark.parametrize("n, L", CASES)
@pytest.mark.parametrize("shared", [False, True])
def test_prefill_state_then_steps_equal_the_reference(n, L, shared):
    q, k, v = op_inputs(2, 3, n, 5, 4)
    bias = None if L is None else bias_of((L,) if shared else (3, L))
    want = kernelized_attention_reference(q, k, v, bias)
    for prefix in (0, 1, L or 1, n // 2, n):
        got, state = steps_from(min(prefix, n), q, k, v, bias)
        assert state.position == n
        assert (got - want).abs().max() < 1e-12, f"prefix {prefix}"


@pytest.mark.parametrize("n, L", CASES)
def test_the_state_after_n_tokens_is_the_same_built_at_once_or_by_steps(n, L):
    q, k, v = op_inputs(1, 2, n, 3, 4, seed=3)
    bias = None if L is None else bias_of((2, L))
    whole = state_after(k, v, 1 if L is None else L)
    _, stepped = steps_from(1, q, k, v, bias)
    assert whole.position == stepped.position == n and whole.window == stepped.window
    for name in ("far_kv", "far_k"):
        assert torch.allclose(getattr(whole, name), getattr(stepped, name), rtol=1e-12, atol=1e-12), name
    cap = min(whole.ring_k.shape[2], stepped.ring_k.shape[2])  # capacities may differ; the filled slots agree
    filled = min(n, whole.window)
    assert cap >= filled
    assert torch.equal(whole.ring_k[:, :, :filled], stepped.ring_k[:, :, :filled])
    assert torch.equal(whole.ring_v[:, :, :filled], stepped.ring_v[:, :, :filled])


def test_a_clipped_state_is_constant_in_size_and_in_place_steps_reuse_it():
    q, k, v = op_inputs(1, 2, 300, 4, 3)
    bias = bias_of((2, 9))
    _, state = steps_from(10, q, k, v, bias, in_place=True)
    assert state.ring_k.shape == (1, 2, 8, 4) and state.far_kv.shape == (1, 2, 4, 3)
    ring = state.ring_k.data_ptr()
    _, after = kernelized_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, bias, in_place=True)
    assert after.ring_k.data_ptr() == ring
    before = state_after(k[:, :, :20], v[:, :, :20], 9)
    copy = before.ring_k.clone()
    kernelized_attention_step(q[:, :, 20], k[:, :, 20], v[:, :, 20], before, bias)  # pure: the input is untouched
    assert torch.equal(before.ring_k, copy)


def test_keys_with_zero_features_take_no_part():
    """What padding relies on: zeroing the features (and values) of some keys equals removing them."""
    q, k, v = op_inputs(1, 2, 30, 4, 3, seed=5)
    bias = bias_of((2, 6))
    pad = 7  # left padding: the first 7 positions are pads
    k_pad, v_pad = k.clone(), v.clone()
    k_pad[:, :, :pad], v_pad[:, :, :pad] = 0, float("nan")  # whatever a pad computed: zero features hide it
    v_pad = torch.where(k_pad.sum(-1, keepdim=True) > 0, v_pad, 0)
    alone = kernelized_attention_reference(q[:, :, pad:], k[:, :, pad:], v[:, :, pad:], bias)
    got, _ = steps_from(pad + 3, q, k_pad, v_pad, bias)
    assert (got[:, :, pad:] - alone).abs().max() < 1e-12


def test_step_errors_name_what_to_change():
    q, k, v = op_inputs(1, 2, 4, 3, 5)
    state = state_after(k, v, 5)
    with pytest.raises(ValueError, match="built for an RPE table of 5 entries, rpe_bias has 3"):
        kernelized_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, bias_of((2, 3)))
    with pytest.raises(ValueError, match="one token per sequence"):
        kernelized_attention_step(q, k, v, state, bias_of((2, 5)))


@pytest.mark.parametrize("L", [1, 5, 40])
def test_a_graphable_state_steps_like_the_pure_one_and_launches_the_same_kernels_at_every_position(L):
    """graphable(): the position on the device, the ring whole, the state advanced in place. Its steps give the pure
    steps' outputs and states; and a step traced at two positions is the same graph (the same kernels with the same
    arguments: what a CUDA graph captures once and replays), where the pure step's differs (a host slot index)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lm.ops import graphable
    g = torch.Generator().manual_seed(0)
    B, H, M, D, n0, steps = 2, 3, 4, 5, 7, 16
    bias = torch.randn(H, L, generator=g, dtype=torch.float64) if L > 1 else None
    k0, v0 = torch.rand(B, H, n0, M, generator=g, dtype=torch.float64), torch.randn(B, H, n0, D, generator=g,
                                                                                     dtype=torch.float64)
    pure = state_after(k0, v0, L)
    fast = graphable(pure)
    for _ in range(steps):
        q, k = torch.rand(B, H, M, generator=g, dtype=torch.float64), torch.rand(B, H, M, generator=g,
                                                                                dtype=torch.float64)
        v = torch.randn(B, H, D, generator=g, dtype=torch.float64)
        want, pure = kernelized_attention_step(q, k, v, pure, bias)
        got, fast = kernelized_attention_step(q, k, v, fast, bias)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
        assert fast.position == pure.position and int(fast.step) == pure.position
        assert torch.allclose(fast.far_kv, pure.far_kv, rtol=1e-12, atol=1e-14)

    def traced(state):
        def step(q, k, v, ring_k, ring_v, far_kv, far_k, *device_step):
            s = state._replace(ring_k=ring_k, ring_v=ring_v, far_kv=far_kv, far_k=far_k,
                               step=device_step[0] if device_step else None)
            return kernelized_attention_step(q, k, v, s, bias)[0]
        args = [q, k, v, state.ring_k, state.ring_v, state.far_kv, state.far_k]
        return make_fx(step)(*args, *([state.step.clone()] if state.step is not None else [])).code

    later = graphable(state_after(torch.cat([k0, k0], 2), torch.cat([v0, v0], 2), L))
    assert traced(fast) == traced(later)
    if L > 1:
        assert traced(pure) != traced(state_after(torch.cat([k0, k0], 2)[:, :, :n0 + 1],
                                                  torch.cat([v0, v0], 2)[:, :, :n0 + 1], L))
