"""Prefill + incremental decoding reproduce the full forward's logits at every step, for every attention
kind and RPE form, past the RPE distance and the training context; cache memory stays constant when clipped."""
import pytest
import torch

from conftest import assert_close, trained_looking_model
from lm.inference.decoding import DecodeCache, decode_step, prefill

TRAIN_CONTEXT = 16  # the tests' notional training length; decoding runs well past it
TOTAL = 3 * TRAIN_CONTEXT

FORMS = {
    "rpe-per-offset-general": dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=TOTAL + 10),
    "rpe-per-offset-clipped": dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=6),
    "rpe-per-offset-ring1": dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=1),
    "rpe-bucketed": dict(kind="kernelized_rpe", rpe="bucketed", rpe_num_buckets=8, rpe_max_distance=20),
    "rpe-shared": dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=9, rpe_shared=True),
    "rpe-prf-bucketed-shared": dict(kind="kernelized_rpe", feature_map="prf", rpe="bucketed", rpe_num_buckets=6,
                                    rpe_max_distance=12, rpe_shared=True),
    "kernelized-nprf": dict(kind="kernelized", rpe="none"),
    "kernelized-elu": dict(kind="kernelized", rpe="none", feature_map="elu"),
    "softmax-per-offset": dict(kind="softmax", rpe="per_offset", rpe_max_distance=6),
    "softmax-bucketed-shared": dict(kind="softmax", rpe="bucketed", rpe_num_buckets=8, rpe_max_distance=20,
                                    rpe_shared=True),
    "softmax-none": dict(kind="softmax", rpe="none"),
}



@pytest.mark.parametrize("prompt_len", [0, 1, 5, TRAIN_CONTEXT + 3])
@pytest.mark.parametrize("form", list(FORMS))
def test_prefill_then_decode_equals_full_forward(form, prompt_len):
    m = trained_looking_model(**FORMS[form])
    ids = torch.randint(0, 50, (3, TOTAL))
    with torch.no_grad():
        full = m(ids)
    logits, cache = prefill(m, ids[:, :prompt_len])
    assert logits.shape == (3, prompt_len, 50) and cache.position == prompt_len
    if prompt_len:
        assert_close(logits, full[:, :prompt_len], rtol=5e-5)
        last, _ = prefill(m, ids[:, :prompt_len], last_only=True)
        assert last.shape == (3, 1, 50)
        assert_close(last[:, 0], full[:, prompt_len - 1], rtol=5e-5)
    for t in range(prompt_len, TOTAL):
        step = decode_step(m, cache, ids[:, t])
        assert step.shape == (3, 50) and step.dtype == torch.float32
        assert_close(step, full[:, t], rtol=5e-5)
    assert cache.position == TOTAL


@pytest.mark.parametrize("form", ["rpe-per-offset-general", "rpe-per-offset-clipped", "kernelized-nprf",
                                  "softmax-per-offset"])
def test_several_tokens_appended_to_a_cache_at_once(form):
    """A prompt prefilled, then chunks of 7 and 9 tokens in one call each (a prompt appended to a conversation,
    speculative verification): the parallel op continues the cached state, and the logits are the full forward's;
    decoding one token at a time continues from there."""
    m = trained_looking_model(**FORMS[form])
    ids = torch.randint(0, 50, (2, TOTAL))
    with torch.no_grad():
        full = m(ids)
        _, cache = prefill(m, ids[:, :5])
        chunk1 = m(ids[:, 5:12], cache=cache)
        chunk2 = m(ids[:, 12:21], cache=cache)
    assert_close(chunk1, full[:, 5:12], rtol=5e-5)
    assert_close(chunk2, full[:, 12:21], rtol=5e-5)
    assert cache.position == 21
    for t in range(21, 26):
        assert_close(decode_step(m, cache, ids[:, t]), full[:, t], rtol=5e-5)


@pytest.mark.parametrize("method, max_distance, n", [
    ("fft", TOTAL + 50, 70), ("band", 6, 70), ("dense", 6, 70), ("auto", 1000, 600), ("auto", 32, 600)])
def test_prefill_with_each_op_method_then_decode(method, max_distance, n):
    """Prefill runs the parallel op (whichever method), decoding the recurrence: they must agree."""
    m = trained_looking_model(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=max_distance, method=method)
    ids = torch.randint(0, 50, (2, n))
    with torch.no_grad():
        full = m(ids)
    logits, cache = prefill(m, ids[:, :n - 10])
    assert_close(logits, full[:, :n - 10], rtol=2e-4)  # the op's FFT accuracy is 1e-4 per position
    for t in range(n - 10, n):
        assert_close(decode_step(m, cache, ids[:, t]), full[:, t], rtol=2e-4)


def test_clipped_cache_memory_is_constant_and_kv_cache_grows():
    clipped = trained_looking_model(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=6)
    softmax = trained_looking_model(kind="softmax", rpe="per_offset", rpe_max_distance=6)
    ids = torch.randint(0, 50, (1, 200))
    sizes = {}
    for name, m in (("clipped", clipped), ("softmax", softmax)):
        _, cache = prefill(m, ids[:, :10])
        after_prefill = cache.nbytes()
        for t in range(10, 200):
            decode_step(m, cache, ids[:, t])
        sizes[name] = (after_prefill, cache.nbytes())
        if name == "clipped":  # a full ring is updated in place, never reallocated per step
            rings = [layer.state.ring_k.data_ptr() for layer in cache.layers]
            decode_step(m, cache, ids[:, 0])
            assert [layer.state.ring_k.data_ptr() for layer in cache.layers] == rings
    assert sizes["clipped"][0] == sizes["clipped"][1] > 0
    # The constant state is: M x D prefix state + M normaliser + (L - 1) ring slots of M + D, per layer and head.
    layers, heads, m_feat, d_head, ring = 2, 4, 16, 8, 6
    state_floats = layers * heads * (m_feat * d_head + m_feat + ring * (m_feat + d_head))
    assert sizes["clipped"][1] == 4 * state_floats
    assert sizes["softmax"][1] >= 2 * layers * heads * 200 * d_head * 4 > sizes["softmax"][0]


def test_decoding_needs_eval_mode_and_the_right_inputs():
    m = trained_looking_model()
    _, cache = prefill(m, torch.randint(0, 50, (2, 4)))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        decode_step(m, cache, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cache holds 2 layers x 2 sequences, the call 2 layers x 3"):
        decode_step(m, cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache holds 0 layers"):
        decode_step(m, DecodeCache([], 0, 2), torch.zeros(2, dtype=torch.long))
    m.train()
    with pytest.raises(ValueError, match="eval"):
        prefill(m, torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("form", list(FORMS))
def test_a_left_padded_batch_gives_each_row_what_it_gets_alone(form):
    """Padding keys take no part (key_mask), positions count real tokens only, RPE offsets are unchanged: the
    full forward and prefill + decode of a left-padded batch equal each row's own, at every real position."""
    m = trained_looking_model(**FORMS[form]).double()
    lengths, extra = [9, 4, 13], 6
    n = max(lengths)
    rows = [torch.randint(3, 50, (length + extra,), generator=torch.Generator().manual_seed(length))
            for length in lengths]
    ids = torch.zeros(len(rows), n, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        ids[b, n - length:], mask[b, n - length:] = rows[b][:length], True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = m(ids, key_mask=mask, positions=positions)
        cache = m.new_cache(len(rows))
        prompt = m(ids, cache=cache, key_mask=mask, positions=positions)
        steps = [m(torch.stack([r[length + t] for r, length in zip(rows, lengths)])[:, None], cache=cache,
                   positions=positions[:, -1:] + 1 + t) for t in range(extra)]
    for b, length in enumerate(lengths):
        with torch.no_grad():
            alone = m(rows[b][None])[0]
        assert_close(full[b, n - length:], alone[:length], rtol=1e-10, what=f"row {b} full forward")
        assert_close(prompt[b, n - length:], alone[:length], rtol=1e-10, what=f"row {b} prefill")
        got = torch.stack([s[b, 0] for s in steps])
        assert_close(got, alone[length:], rtol=1e-10, what=f"row {b} decoding")
