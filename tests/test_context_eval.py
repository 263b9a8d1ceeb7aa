"""Evaluations of context use: loss by position (lm.eval.position, eval_ppl --by-position) against a per-token
cross-entropy computed window by window; passkey retrieval (lm.eval.passkey, tools/eval_passkey.py): prompts hold
the needle at the depth asked, scoring counts exactly (an oracle that is right on chosen trials only), and a small
model's answers equal its own cached greedy decoding; both on an exported Hugging Face model give our model's
figures."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_model
from lm.eval.passkey import (PasskeyError, build_prompt, evaluate_passkey, greedy_answers, passkey_task,
                             records_task, trial_rng)
from lm.eval.perplexity import score_tokens
from lm.eval.position import bucket_edges, loss_by_position

BOS = 1


def manual_position_loss(model, tokens: np.ndarray, context: int) -> np.ndarray:
    """(windows, context) per-token NLL, float64, one window at a time: window k reads [BOS] + tokens from
    k * context and predicts tokens[k * context : (k + 1) * context]."""
    stream = np.concatenate([[BOS], tokens])
    rows = []
    with torch.no_grad():
        for k in range(len(tokens) // context):
            ids = torch.as_tensor(stream[k * context:(k + 1) * context], dtype=torch.long)[None]
            logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
            target = torch.as_tensor(tokens[k * context:(k + 1) * context], dtype=torch.long)
            rows.append((-logp[torch.arange(context), target]).numpy())
    return np.stack(rows)


def test_bucket_edges():
    assert bucket_edges(1) == [0, 1]
    assert bucket_edges(16) == [0, 1, 2, 4, 8, 16]
    assert bucket_edges(20) == [0, 1, 2, 4, 8, 16, 20]
    assert bucket_edges(10, width=4) == [0, 4, 8, 10]
    with pytest.raises(ValueError):
        bucket_edges(8, width=0)


@pytest.mark.parametrize("width", [None, 5])
def test_loss_by_position_equals_a_manual_cross_entropy(width):
    model = tiny_model(3, vocab_size=50, looks_trained=True, rpe_max_distance=8)
    tokens = np.random.default_rng(0).integers(3, 50, size=77)
    context = 16
    got = loss_by_position(model, tokens, context, BOS, batch_size=3, bucket_width=width)
    want = manual_position_loss(model, tokens, context)  # 4 full windows; the last 13 tokens are left out
    assert got.num_windows == 4 == len(want)
    np.testing.assert_allclose(got.position_loss, want.mean(0), rtol=1e-5)
    edges = bucket_edges(context, width)
    assert got.edges == edges
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        assert got.bucket_loss[k] == pytest.approx(want[:, lo:hi].mean(), rel=1e-5)
        assert got.bucket_tokens[k] == 4 * (hi - lo)
    # the same tokens through the sliding-window scorer (non-overlapping windows over the same 64 tokens)
    nll = score_tokens(model, tokens[:64], context, context, batch_size=2, bos_id=BOS)
    assert got.mean_loss == pytest.approx(nll.mean, rel=1e-5)
    # max_windows: windows spread over the stream (the first and the last)
    two = loss_by_position(model, tokens, context, BOS, max_windows=2)
    np.testing.assert_allclose(two.position_loss, want[[0, 3]].mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="no full window"):
        loss_by_position(model, tokens[:10], context, BOS)


# ---------------------------------------------------------------------------------------------- passkey prompts
def char_encode(text: str) -> list[int]:
    """A character tokenizer of ASCII text (id = 3 + code point): pieces apart give the ids of the joined text."""
    return [3 + ord(c) for c in text]


@pytest.mark.parametrize("filler", ["stream", "builtin"])
def test_passkey_prompts_hold_the_needle_at_the_depth_asked(filler):
    stream = np.random.default_rng(1).integers(3, 93, size=500) if filler == "stream" else None
    task = passkey_task(char_encode, BOS, stream, digits=5)
    context = 400
    prompts = {d: build_prompt(task, context, d, trial_rng(7, context, 0)) for d in (0.0, 0.3, 0.5, 1.0)}
    prefix, question = char_encode(task.prefix), char_encode(task.question)
    unit = 1 if filler == "stream" else max(len(char_encode(" " + s)) for s in task_sentences())
    for depth, p in prompts.items():
        needle = char_encode(task.needle.format(key=p.key, value=p.value))
        assert len(p.value) == 5 and p.answer_ids == char_encode(" " + p.value)
        assert context - unit < len(p.ids) <= context
        assert p.ids[:1 + len(prefix)] == [BOS, *prefix] and p.ids[-len(question):] == question
        assert p.ids[p.needle_start:p.needle_start + len(needle)] == needle
        assert p.filler_before == p.needle_start - 1 - len(prefix)
        assert p.filler_tokens == len(p.ids) - 1 - len(prefix) - len(needle) - len(question)
        assert abs(p.filler_before - depth * p.filler_tokens) <= unit / 2
    # one trial: the same value and filler at every depth, the needle moved
    first, last = prompts[0.0], prompts[1.0]
    assert {p.value for p in prompts.values()} == {first.value}
    needle_len = len(char_encode(task.needle.format(key=first.key, value=first.value)))
    assert first.filler_before == 0 and last.filler_before == last.filler_tokens
    assert first.ids[first.needle_start + needle_len:] == last.ids[1 + len(prefix):last.needle_start] + question
    # another trial draws another value
    assert build_prompt(task, context, 0.5, trial_rng(7, context, 1)).value != first.value
    with pytest.raises(PasskeyError, match="too short"):
        build_prompt(task, 40, 0.5, trial_rng(7, 40, 0))


def task_sentences():
    from lm.eval.passkey import BUILTIN_FILLER
    return BUILTIN_FILLER


def test_records_prompts_are_in_the_corpus_format():
    from lm.data.synthetic import filler_sentence, make_keys
    keys = make_keys(16, 3)
    task = records_task(char_encode, BOS, keys, 100, filler_sentence)
    p = build_prompt(task, 300, 0.5, trial_rng(0, 300, 0))
    text = "".join(chr(i - 3) for i in p.ids[1:])  # char_encode is invertible on this text
    assert p.key in keys and 0 <= int(p.value) < 100
    assert text.startswith("= record =") and text.endswith(f"\nquestions : what is {p.key} ?")
    assert text.count(" is ") == 2 and f"\nfacts : {p.key} is {p.value} . the " in text  # the one fact, asked once
    assert not any(c.isdigit() for c in text.replace(p.value, ""))  # no other number in the filler


def test_records_prompts_in_the_pairs_style_end_as_a_record_of_that_corpus():
    from lm.config import SyntheticConfig
    from lm.data.synthetic import STYLES, filler_sentence, make_keys, split_text
    keys = make_keys(16, 3)
    task = records_task(char_encode, BOS, keys, 100, filler_sentence, *STYLES["pairs"])
    p = build_prompt(task, 300, 1.0, trial_rng(0, 300, 0))
    text = "".join(chr(i - 3) for i in p.ids[1:])
    tail = "\nfacts : {k} {v} .\nquestions : {k}"
    assert text.startswith("= record = the ") and text.endswith(tail.format(k=p.key, v=p.value))
    assert text.count(p.value) == 1
    # the same two lines as in the corpus's records without filler, up to the answer
    corpus = split_text(SyntheticConfig(train_tokens=300, num_pairs=1, filler_sentences=0, style="pairs"), "valid")
    record = corpus.split("\n\n")[0]
    key, value = record.split("\n")[1].split()[2:4]
    assert record.endswith(tail.format(k=key, v=value) + f" {value} .")


# ---------------------------------------------------------------------------------------------- passkey scoring
class Oracle:
    """A causal LM that answers each prompt's value token by token, except on the trials in ``wrong`` where its
    last answer token is off by one: logits one-hot on the token it means."""

    def __init__(self, task, contexts, depths, trials, seed, wrong, vocab=140):
        self.next, self.vocab = {}, vocab
        for c in contexts:
            for t in range(trials):
                for d in depths:
                    p = build_prompt(task, c, d, trial_rng(seed, c, t))
                    answer = list(p.answer_ids)
                    if (c, d, t) in wrong:
                        answer[-1] = answer[-1] + 1
                    for i, token in enumerate(answer):
                        self.next[tuple(p.ids + answer[:i])] = token

    def __call__(self, ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        for row, seq in enumerate(ids.tolist()):
            logits[row, -1, self.next[tuple(seq)]] = 1.0
        return logits


def test_passkey_scoring_counts_exactly():
    task = passkey_task(char_encode, BOS, None, digits=3)
    contexts, depths, trials = [250, 360], [0.0, 0.5, 1.0], 4
    wrong = {(250, 0.5, 1), (360, 0.0, 0), (360, 0.0, 3), (360, 1.0, 2)}
    oracle = Oracle(task, contexts, depths, trials, 5, wrong)
    report = evaluate_passkey(oracle, task, contexts, depths, trials, seed=5, batch_size=3)
    want = np.array([[1, 0.75, 1], [0.5, 1, 0.75]])
    np.testing.assert_array_equal(report.accuracy(), want)
    assert {(s["context"], s["depth"], s["trial"]) for s in report.samples if not s["correct"]} == wrong
    cell = report.cells[0]
    assert (cell.context, cell.depth, cell.trials, cell.correct) == (250, 0.0, 4, 4)
    for cell in report.cells:  # every figure of a cell, from its own trials
        trials_of_cell = [build_prompt(task, cell.context, cell.depth, trial_rng(5, cell.context, t))
                          for t in range(trials)]
        assert cell.mean_prompt_tokens == pytest.approx(np.mean([len(p.ids) for p in trials_of_cell]))
        assert cell.mean_prompt_tokens <= cell.context
        assert cell.mean_actual_depth == pytest.approx(np.mean([p.filler_before / p.filler_tokens
                                                                for p in trials_of_cell]))
        nlls = [s["answer_nll"] for s in report.samples if (s["context"], s["depth"]) == (cell.context, cell.depth)]
        assert cell.mean_answer_nll == pytest.approx(np.mean(nlls))
    assert json.loads(json.dumps(report.to_dict()))["accuracy"] == want.tolist()


def test_greedy_answers_batch_equals_one_at_a_time():
    model = tiny_model(1, vocab_size=50, looks_trained=True)
    prompts = np.random.default_rng(2).integers(3, 50, size=(3, 20)).tolist()
    together = greedy_answers(model, prompts, 4)
    for p, got in zip(prompts, together):
        ids = torch.tensor([p])
        for token in got:
            with torch.no_grad():
                assert model(ids)[0, -1].argmax().item() == token
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    with pytest.raises(ValueError, match="one length"):
        greedy_answers(model, [[1, 2], [1, 2, 3]], 1)


# ---------------------------------------------------------------------------------------------- a trained run
def test_a_trained_model_answers_what_its_own_greedy_decoding_gives(trained_run):
    from lm.data.synthetic import filler_sentence, make_keys
    from lm.inference.generation import Sampling, generate
    from lm.inference.loading import load_for_inference

    run = load_for_inference(trained_run)
    tok, s = run.tokenizer, run.cfg.data.synthetic
    task = records_task(tok.encode, tok.bos_id, make_keys(s.num_keys, s.seed), s.num_values, filler_sentence)
    report = evaluate_passkey(run.model, task, [60, 150], [0.0, 1.0], trials=2, seed=3, batch_size=2,
                              decode=tok.decode)
    for sample in report.samples:
        prompt = build_prompt(task, sample["context"], sample["depth"], trial_rng(3, sample["context"],
                                                                                  sample["trial"]))
        # prefill + recurrent decoding: another path through the model than the batched full forwards
        want = list(generate(run.model, prompt.ids[1:], len(prompt.answer_ids), Sampling(temperature=0),
                             bos_id=tok.bos_id))
        assert sample["answer_ids"] == want and sample["answer"] == tok.decode(want)
        assert sample["correct"] == (want == prompt.answer_ids) and sample["value"] == prompt.value
        with torch.no_grad():  # the true answer's NLL from one full forward pass
            ids = torch.tensor([prompt.ids + prompt.answer_ids])
            logp = torch.log_softmax(run.model(ids)[0].double(), -1)
        k = len(prompt.answer_ids)
        nll = -logp[torch.arange(len(prompt.ids) - 1, len(prompt.ids) - 1 + k), ids[0, -k:]].sum().item()
        assert sample["answer_nll"] == pytest.approx(nll, rel=1e-5)
    assert report.accuracy().shape == (2, 2)


def test_eval_ppl_by_position_command(trained_run, tmp_path, capsys):
    from lm.cli.eval_ppl import main
    from lm.eval.perplexity import tokenize_split
    from lm.inference.loading import load_for_inference

    out = tmp_path / "positions.json"
    assert main([str(trained_run), "--by-position", "--contexts", "32,64", "--max-windows", "5", "--no-progress",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    run = load_for_inference(trained_run)
    tokens = tokenize_split(run.cfg.data, run.tokenizer, "valid").tokens
    for result, context in zip(report["results"], [32, 64]):
        want = loss_by_position(run.model, tokens, context, run.tokenizer.bos_id, max_windows=5)
        assert result["context"] == context and result["num_windows"] == 5
        np.testing.assert_allclose(result["position_loss"], want.position_loss, rtol=1e-6)
        assert result["edges"] == bucket_edges(context)
    assert "32-63" in table and f"{report['results'][1]['bucket_loss'][-1]:.4f}" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main([str(trained_run), "--by-position", "--stride", "8"]) == 2
    assert "--stride" in capsys.readouterr().err


def test_eval_passkey_command(trained_run, tmp_path, capsys):
    from lm.cli.eval_passkey import main

    out = tmp_path / "passkey.json"
    assert main([str(trained_run), "--contexts", "48,96", "--depths", "0,1", "--trials", "2", "--no-progress",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["task"] == "records" and report["contexts"] == [48, 96] and report["depths"] == [0.0, 1.0]
    assert len(report["samples"]) == 8
    for row, context in zip(report["accuracy"], [48, 96]):
        cells = [s for s in report["samples"] if s["context"] == context]
        assert row == [np.mean([s["correct"] for s in cells if s["depth"] == d]) for d in (0.0, 1.0)]
        assert f"{context}  " in table
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main([str(trained_run), "--contexts", "10", "--no-progress", "--json", str(out)]) == 2
    assert "too short" in capsys.readouterr().err
    assert main([str(trained_run), "--task", "records", "--filler", "builtin"]) == 2
    assert main([str(trained_run), "--depths", "0,1.5"]) == 2


def test_passkey_task_from_the_validation_split(trained_run, tmp_path):
    from lm.cli.eval_passkey import main

    out = tmp_path / "passkey.json"
    assert main([str(trained_run), "--task", "passkey", "--contexts", "256", "--depths", "0.5", "--trials", "2",
                 "--digits", "3", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "passkey" and "validation" in report["description"]
    assert all(len(s["value"]) == 3 for s in report["samples"])


# ---------------------------------------------------------------------------------------------- Hugging Face
def test_an_exported_model_gives_the_same_figures(trained_run, tmp_path):
    pytest.importorskip("transformers")
    import lm.hf  # noqa: F401  (registers the classes with the Auto factories)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm.cli.export_hf import main as export_main
    from lm.data.synthetic import filler_sentence, make_keys
    from lm.inference.loading import load_for_inference

    assert export_main([str(trained_run), str(tmp_path / "hf")]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    run = load_for_inference(trained_run)
    tokens = np.array(run.tokenizer.encode("what is kelo ? 37 . the red fox sees a small bird . " * 12))
    ours = loss_by_position(run.model, tokens, 64, run.tokenizer.bos_id)
    theirs = loss_by_position(hf_model, tokens, 64, hf_tok.bos_token_id)
    np.testing.assert_allclose(theirs.position_loss, ours.position_loss, rtol=1e-5)

    s = run.cfg.data.synthetic
    keys = make_keys(s.num_keys, s.seed)
    hf_encode = lambda text: hf_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    report = [evaluate_passkey(model, records_task(encode, bos, keys, s.num_values, filler_sentence), [80],
                               [0.0, 1.0], trials=2, seed=1)
              for model, encode, bos in [(run.model, run.tokenizer.encode, run.tokenizer.bos_id),
                                         (hf_model, hf_encode, hf_tok.bos_token_id)]]
    assert [x["answer_ids"] for x in report[0].samples] == [x["answer_ids"] for x in report[1].samples]
    assert math.isclose(report[0].accuracy().mean(), report[1].accuracy().mean())
