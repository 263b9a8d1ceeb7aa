"""Sliding-window scoring (lm.eval.perplexity) against a brute-force loop over single tokens with their exact history."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from lm.eval.perplexity import NLL, plan_windows, score_tokens
from lm.model import Transformer

VOCAB, BOS = 37, 1


def float64_scoring_model(kind: str, seed: int = 0) -> Transformer:
    rpe = "none" if kind == "kernelized" else "per_offset"
    # PyTorch's default init and a random RPE: every token of history shifts the logits
    model = tiny_model(seed, init_weights=False, vocab_size=VOCAB, n_heads=2, dropout=0.1, kind=kind, rpe=rpe,
                             rpe_max_distance=5)
    with torch.no_grad():
        for p in model.rpe.parameters():
            p.normal_(0.0, 1.0)
    return model.double()  # float64 weights (logits come back float32)


def expected_window_start(t: int, num_tokens: int, context: int, stride: int) -> int:
    """Start (in s = [BOS] + tokens) of the window that scores target t, from the documented rule."""
    if t < context:
        return 0
    k = math.ceil((t + 1 - context) / stride)  # t is scored by the k-th window after the first
    end = min(context + k * stride, num_tokens)
    return end - context


def target_nll(model, tokens: np.ndarray, start: int, t: int) -> float:
    """-log p(tokens[t] | s[start:t+1]) from one forward pass, where s = [BOS] + tokens."""
    s = torch.tensor([BOS, *tokens.tolist()])
    with torch.no_grad():
        logp = F.log_softmax(model(s[start:t + 1][None])[0, -1].double(), -1)
    return -logp[int(tokens[t])].item()


def brute_force_nll(model, tokens: np.ndarray, context: int, stride: int) -> float:
    """Every target's log-probability from its own forward pass over exactly its history."""
    total = 0.0
    for t in range(len(tokens)):
        a = expected_window_start(t, len(tokens), context, stride)
        assert 1 <= t + 1 - a <= context
        assert a == 0 or t + 1 - a >= context - stride + 1
        total += target_nll(model, tokens, a, t)
    return total


@pytest.mark.parametrize("num_tokens, context, stride", [
    (1, 8, 8), (5, 8, 3), (8, 8, 8), (29, 8, 3), (29, 8, 8), (30, 7, 1), (31, 9, 4), (17, 16, 15),
])
def test_plan_scores_every_target_once_with_enough_history(num_tokens, context, stride):
    windows = plan_windows(num_tokens, context, stride)
    scored = np.concatenate([np.arange(w.score_from, w.end) for w in windows])
    np.testing.assert_array_equal(scored, np.arange(num_tokens))  # each exactly once, in order
    for i, w in enumerate(windows):
        assert 0 <= w.start <= w.score_from < w.end <= num_tokens
        assert w.length == (min(context, num_tokens) if i == 0 else context)
        if i > 0:
            assert w.score_from - w.start >= context - stride  # history of the first scored target
            assert w.end - w.score_from <= stride


@pytest.mark.parametrize("kind", ["kernelized_rpe", "kernelized", "softmax"])
@pytest.mark.parametrize("num_tokens, context, stride, batch_size", [
    (29, 8, 3, 4),    # overlapping windows, odd sizes, a short last window
    (29, 8, 8, 2),    # non-overlapping mode; the last window shifted back
    (6, 8, 2, 3),     # stream shorter than one window
    (23, 7, 1, 5),    # stride 1: every target sees a full context
])
def test_score_tokens_equals_brute_force(kind, num_tokens, context, stride, batch_size):
    model = float64_scoring_model(kind)
    model.train()  # score_tokens must switch dropout off and restore the mode
    tokens = np.random.default_rng(num_tokens).integers(0, VOCAB, size=num_tokens).astype(np.uint16)
    got = score_tokens(model, tokens, context, stride, batch_size, BOS)
    assert model.training
    model.eval()
    want = brute_force_nll(model, tokens, context, stride)
    assert got.num_tokens == num_tokens
    assert got.nll_sum == pytest.approx(want, rel=1e-6)


def test_batch_size_and_progress_do_not_change_the_result():
    model = float64_scoring_model("kernelized_rpe").float()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=101)
    a = score_tokens(model, tokens, 16, 5, 1, BOS)
    b = score_tokens(model, torch.as_tensor(tokens), 16, 5, 7, BOS, progress=True)
    assert a.num_tokens == b.num_tokens == 101
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-5)
    assert isinstance(a.nll_sum, float) and a.perplexity == pytest.approx(math.exp(a.nll_sum / 101))


def test_max_windows_scores_an_even_spread_of_windows():
    model = float64_scoring_model("kernelized_rpe")
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=105)
    windows = plan_windows(105, 10, 10)
    assert len(windows) == 11
    full = score_tokens(model, tokens, 10, 10, 4, BOS)
    assert score_tokens(model, tokens, 10, 10, 4, BOS, max_windows=len(windows)) == full
    part = score_tokens(model, tokens, 10, 10, 4, BOS, max_windows=3)
    picked = [windows[0], windows[len(windows) // 2], windows[-1]]  # first, middle, last
    assert part.num_tokens == sum(w.end - w.score_from for w in picked)
    want = sum(target_nll(model, tokens, w.start, t) for w in picked for t in range(w.score_from, w.end))
    assert part.nll_sum == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(context=0), "context=0"),
    (dict(stride=0), "stride=0"),
    (dict(stride=9), "stride=9"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(max_windows=0), "max_windows=0"),
    (dict(tokens=np.zeros(0, dtype=np.int64)), "empty"),
    (dict(tokens=np.zeros((2, 3), dtype=np.int64)), "1-D"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    model = float64_scoring_model("softmax")
    args = dict(model=model, tokens=np.arange(20) % VOCAB, context=8, stride=4, batch_size=2, bos_id=BOS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        score_tokens(**args)


def test_nll_perplexity_of_a_diverged_model_is_inf():
    assert NLL(1e6, 1).perplexity == math.inf
