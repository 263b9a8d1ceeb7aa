"""Sampling (lm.inference.generation): filters against brute force, greedy against a full forward pass, seeds, EOS, streaming."""
import math

import pytest
import torch

from conftest import tiny_model
from lm.inference.generation import GenerationStats, Sampling, TextStream, filter_logits, generate, sample_next
from lm.model import Transformer
from lm.tokenizer import Tokenizer

VOCAB, BOS = 37, 1


def float64_sampling_model(kind: str, rpe: str = "per_offset", seed: int = 0) -> Transformer:
    rpe = "none" if kind == "kernelized" else rpe
    model = tiny_model(seed, vocab_size=VOCAB, n_heads=2, kind=kind, rpe=rpe, rpe_max_distance=6,
                             rpe_num_buckets=4)
    return model.double()  # float64: no argmax near-ties between the recurrent and parallel paths


# ----------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_invalid_sampling_parameters_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


# ----------------------------------------------------------------------------------------------- filters
def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


@pytest.mark.parametrize("k", [1, 3, 50, 64])
def test_top_k_keeps_the_k_largest_logits(k):
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(k))
    logits[0, :4] = 9.0  # a four-way tie for first place: ties at the k-th value are all kept
    got = kept(filter_logits(logits, top_k=k))
    for row, kept_set in zip(logits, got):
        values = sorted(row.tolist(), reverse=True)
        kth = values[min(k, len(values)) - 1]
        assert kept_set == {i for i, x in enumerate(row.tolist()) if x >= kth}
    assert torch.equal(filter_logits(logits, top_k=k)[torch.isfinite(filter_logits(logits, top_k=k))],
                       logits[torch.isfinite(filter_logits(logits, top_k=k))])  # kept logits unchanged


@pytest.mark.parametrize("p", [0.01, 0.3, 0.75, 0.95, 1.0])
def test_top_p_keeps_the_smallest_nucleus(p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(int(p * 100))) * 2
    got = kept(filter_logits(logits, top_p=p))
    for row, kept_set in zip(logits, got):
        probs = torch.softmax(row.double(), -1).tolist()
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        nucleus, mass = set(), 0.0
        for i in order:  # add tokens from the most likely until the mass reaches p
            nucleus.add(i)
            mass += probs[i]
            if mass >= p:
                break
        assert kept_set == nucleus if p < 1.0 else kept_set == set(range(len(probs)))


def test_top_k_then_top_p_renormalises_after_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # after top_k=2 the distribution is (4/7, 3/7): top_p=0.5 keeps only the first token
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == [{0}]
    assert kept(filter_logits(logits, top_p=0.5)) == [{0, 1}]


def test_greedy_is_argmax_and_sampling_follows_the_filtered_distribution():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, Sampling(temperature=0.0)), logits.argmax(-1))

    row = logits[:1]
    sampling = Sampling(temperature=0.7, top_k=5)
    expected = torch.softmax(filter_logits(row / 0.7, top_k=5), -1)[0]
    gen = torch.Generator().manual_seed(123)
    n = 20000
    draws = torch.stack([sample_next(row, sampling, gen) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=20).double() / n
    assert set(draws.tolist()) <= set(torch.topk(row[0], 5).indices.tolist())
    # binomial standard deviation <= sqrt(0.25 / 20000) = 0.0035: 0.02 is a > 5 sigma bound
    assert (freq - expected.double()).abs().max() < 0.02


# ----------------------------------------------------------------------------------------------- the loop
PROMPT = [5, 9, 2, 30, 7]


@pytest.mark.parametrize("kind, rpe", [
    ("kernelized_rpe", "per_offset"), ("kernelized_rpe", "bucketed"), ("kernelized", "none"),
    ("softmax", "per_offset"),
])
def test_greedy_generation_equals_argmax_of_a_full_forward_pass(kind, rpe):
    model = float64_sampling_model(kind, rpe)
    new = list(generate(model, PROMPT, 24, Sampling(temperature=0), bos_id=BOS))
    assert len(new) == 24  # 30 tokens in all: longer than rpe_max_distance and max_seq_len
    seq = torch.tensor([[BOS, *PROMPT, *new]])
    with torch.no_grad():
        argmax = model(seq[:, :-1])[0].argmax(-1)
    assert argmax[len(PROMPT):].tolist() == new


def test_seed_reproducibility_and_empty_prompt():
    model = float64_sampling_model("kernelized_rpe")
    sampling = Sampling(temperature=1.0, top_p=0.9)

    def run(seed, prompt=PROMPT):
        return list(generate(model, prompt, 30, sampling, bos_id=BOS, generator=torch.Generator().manual_seed(seed)))

    assert run(0) == run(0)
    assert run(0) != run(1)
    from_bos = run(3, prompt=[])
    assert len(from_bos) == 30 and from_bos == run(3, prompt=[])


def test_stops_at_eos_and_at_the_budget():
    model = float64_sampling_model("kernelized_rpe")
    greedy = Sampling(temperature=0)
    stats = GenerationStats()
    full = list(generate(model, PROMPT, 12, greedy, bos_id=BOS, stats=stats))
    assert len(full) == 12 and not stats.stopped_at_eos
    assert stats.new_tokens == 12 and stats.decode_steps == 11 and stats.prompt_tokens == len(PROMPT)
    eos = full[4]
    stats = GenerationStats()
    stopped = list(generate(model, PROMPT, 12, greedy, bos_id=BOS, eos_id=eos, stats=stats))
    assert stopped == full[:full.index(eos)] and stats.stopped_at_eos
    assert list(generate(model, PROMPT, 0, greedy, bos_id=BOS)) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(generate(model, PROMPT, -1, greedy, bos_id=BOS))


# ----------------------------------------------------------------------------------------------- streaming
def test_text_stream_releases_exactly_the_decoded_text():
    text = "naïve café ☕ 日本語 text\nwith ▁ marks and emoji 🙂 " * 3
    tok = Tokenizer.train(iter(text.split("\n") * 20), vocab_size=300)
    ids = tok.encode(text)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte pieces split characters
    stream = TextStream(tok.decode)
    chunks = [stream.push(i) for i in ids]
    chunks.append(stream.flush())
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
