"""lm-evaluation-harness adapter (lm/eval/harness.py, lm/cli/harness.py) and the local tasks
(lm/eval/harness_tasks.py, lm/cli/harness_tasks.py).

The adapter's numbers are checked against direct scoring with the model (one sequence, one forward pass, the
joined text tokenized as a whole) and, end to end through lm-eval, against tools/eval_ppl.py.

Conventions that differ between the rolling task and eval_ppl (see docs/evaluation.md, "lm-evaluation-harness"):
- documents vs one stream: the task scores each article on its own (BOS, then fresh windows), eval_ppl scores
  the split as one stream (BOS once; windows cross article boundaries);
- word counts: the task's ``word_perplexity`` divides by words + line ends (the WikiText-103 convention, as
  eval_ppl does); lm-eval's stock ``wikitext`` task divides by ``len(re.split(r"\\s+", page))``
  (words + 2 per page here: the page's leading space and trailing newline each give an empty "word"), reported
  here as ``lm_eval_word_perplexity``.
The expected value is computed from eval_ppl's ``nll_sum`` and explicit counts of the text, so the test does not
depend on which word count eval_ppl's own ``word_perplexity`` field uses.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm.eval
from conftest import REPO
from lm.cli.harness import main as harness_main
from lm.cli.harness_tasks import main as harness_tasks_main
from lm.inference.generation import Sampling, generate
from lm.eval.harness import HarnessError, HarnessLM, json_safe, run_tasks
from lm.eval.harness_tasks import lm_eval_word_count, wikitext_articles, wikitext_word_count, write_tasks
from lm_eval.api.instance import Instance


@pytest.fixture(scope="module")
def synthetic_run(trained_run) -> Path:
    """The suite's small model trained on the built-in synthetic corpus."""
    return trained_run


@pytest.fixture(scope="module")
def model(synthetic_run) -> HarnessLM:
    return HarnessLM(synthetic_run, batch_size=3, device="cpu")


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def direct_loglikelihood(lm_: HarnessLM, context: str, continuation: str) -> tuple[float, bool]:
    """Reference: tokenize ``context + continuation`` as a whole, run ``model`` once on ``[BOS] + ids`` (the last
    ``max_length`` inputs) and sum the continuation tokens' log-probs. The continuation's tokens are the joined
    text's tokens after those of the context (with its trailing whitespace moved over, as lm-eval does)."""
    tok = lm_.tokenizer
    stripped = context.rstrip()
    ids = [tok.bos_id, *tok.encode(context + continuation)]
    n_context = 1 + len(tok.encode(stripped))
    assert ids[:n_context] == [tok.bos_id, *tok.encode(stripped)], "boundary inside a piece: no canonical split"
    inputs = torch.tensor(ids[:-1][-lm_.max_length:])[None]
    targets = torch.tensor(ids[n_context:])
    logp = torch.log_softmax(lm_.model(inputs)[0, -len(targets):].double(), dim=-1)
    return logp.gather(-1, targets[:, None]).sum().item(), bool((logp.argmax(-1) == targets).all())


# ------------------------------------------------------------------------------------------ loglikelihood
def test_loglikelihood_equals_direct_scoring_at_the_context_boundary(model):
    long_context = " ".join(["the red fox sees a small bird ."] * 40)  # ~280 tokens > max_length=128: truncated
    pairs = [("the red fox", " sees"),
             ("the red fox ", "sees a bird"),           # trailing space moves to the continuation
             ("", "the cat"),                           # empty context: BOS alone
             ("facts : kelo is", " 37 ."),
             ("the old house\n", "the tall tree"),      # newline at the boundary
             (long_context, " the quiet river ."),
             ("questions : what is vadu ?", " 12")]
    got = model.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    assert len(model.tokenizer.encode(long_context)) > model.max_length
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        want_ll, want_greedy = direct_loglikelihood(model, context, continuation)
        assert ll == pytest.approx(want_ll, abs=1e-4), (context[-30:], continuation)
        assert greedy == want_greedy
        assert ll < 0


def test_a_boundary_inside_a_word_scores_the_continuations_own_tokens(model):
    """'the ca' + 't': the joined text has the piece '▁cat' across the boundary; the continuation is scored as
    its own tokens after the context's (lm-eval's encode(whole)[len(encode(context)):] would score none)."""
    tok = model.tokenizer
    context, continuation = "the ca", "t"
    assert tok.encode(context + continuation)[: len(tok.encode(context))] != tok.encode(context)  # precondition
    ctx_ids, cont_ids = model.encode_pair(context, continuation)
    assert cont_ids == tok.encode("t") and tok.decode(ctx_ids + cont_ids) == context + continuation
    ((ll, _),) = model.loglikelihood([request("loglikelihood", context, continuation)], disable_tqdm=True)
    ids = torch.tensor([[tok.bos_id, *ctx_ids, *cont_ids]])
    with torch.no_grad():
        logp = torch.log_softmax(model.model(ids[:, :-1])[0].double(), dim=-1)
    want = sum(logp[len(ctx_ids) + i, t].item() for i, t in enumerate(cont_ids))
    assert ll == pytest.approx(want, abs=1e-4)


def test_greedy_flag_and_batching(model):
    tok = model.tokenizer
    context = tok.encode("facts : kelo is 37 . the red fox")
    greedy = list(generate(model.model, context, 4, Sampling(temperature=0.0), bos_id=tok.bos_id))
    other = greedy[:-1] + [(greedy[-1] + 1) % tok.vocab_size]
    (ll_greedy, is_greedy), (ll_other, is_other) = model.score_pairs([(context, greedy), (context, other)])
    assert is_greedy and not is_other and ll_greedy > ll_other
    pairs = [(tok.encode("the red fox " * k), tok.encode(" sees a bird" * (1 + k % 3))) for k in range(9)]
    one_by_one = HarnessLM(inference=model.inference, batch_size=1, device="cpu").score_pairs(pairs)
    batched = HarnessLM(inference=model.inference, batch_size=7, device="cpu").score_pairs(pairs)
    for (a, ga), (b, gb) in zip(one_by_one, batched):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert model.score_pairs([(context, [])]) == [(0.0, True)]
    with pytest.raises(HarnessError, match="max_length"):
        model.score_pairs([([], list(range(model.max_length + 1)))])


def test_loglikelihood_rolling_is_our_sliding_window_scorer(model):
    from lm.eval.perplexity import score_tokens

    text = "\n".join(["the red fox sees a small bird . the old ship passes the road ."] * 12)
    stride_model = HarnessLM(inference=model.inference, batch_size=2, device="cpu", max_length=64,
                             rolling_stride=48)
    got = stride_model.loglikelihood_rolling([request("loglikelihood_rolling", text),
                                              request("loglikelihood_rolling", "")], disable_tqdm=True)
    tokens = model.tokenizer.encode_array(text)
    assert len(tokens) > 3 * 64
    want = score_tokens(model.model, tokens, 64, 48, 1, model.tokenizer.bos_id)
    assert got[0] == pytest.approx(-want.nll_sum, rel=1e-6) and got[1] == 0.0


# ------------------------------------------------------------------------------------------ generation
def greedy_text(lm_: HarnessLM, context: str, n: int) -> str:
    tok = lm_.tokenizer
    return tok.decode(list(generate(lm_.model, tok.encode(context), n, Sampling(temperature=0.0),
                                    bos_id=tok.bos_id, eos_id=tok.eos_id)))


def test_generate_until_cuts_before_the_first_stop_sequence(model):
    context = "facts : kelo is 37 . the red fox"
    reference = greedy_text(model, context, 30)
    assert len(reference) > 12
    stop = reference[6:9]
    expected = reference[: reference.index(stop)]
    outs = model.generate_until([
        request("generate_until", context, {"until": [stop, "\u2603never"], "max_gen_toks": 30, "do_sample": False}),
        request("generate_until", context, {"until": stop, "max_gen_toks": 30, "temperature": 0.0}),
        request("generate_until", context, {"max_gen_toks": 5}),
    ], disable_tqdm=True)
    assert outs[0] == outs[1] == expected and stop not in outs[0]
    assert outs[2] == greedy_text(model, context, 5)
    # generation stops as soon as the stop sequence appears (one embedding call per decoded token)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(1) if isinstance(module, torch.nn.Embedding) else None)
    try:
        model.generate_text(context, {"until": [stop], "max_gen_toks": 30})
    finally:
        hook.remove()
    tok = model.tokenizer
    ids = list(generate(model.model, tok.encode(context), 30, Sampling(temperature=0.0), bos_id=tok.bos_id))
    needed = next(k for k in range(1, 31) if stop in tok.decode(ids[:k]))
    assert len(calls) == needed < 30  # the prefill makes the first token, each decode step one more


def test_sampled_generation_repeats_with_the_seed_and_bad_arguments_are_clear(model):
    kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    a = model.generate_text("the red fox", dict(kwargs), seed=3)
    assert a == model.generate_text("the red fox", dict(kwargs), seed=3)
    assert "\n" not in a
    with pytest.raises(HarnessError, match="num_beams"):
        model.generate_text("the red fox", {"num_beams": 4})
    with pytest.raises(HarnessError, match="max_gen_toks=200"):
        model.generate_text("the red fox", {"max_gen_toks": 200})  # does not fit max_length=128


def test_registered_with_lm_eval_and_built_from_its_argument_string(synthetic_run):
    from lm_eval.api.registry import get_model

    assert get_model("lm-kernelized") is HarnessLM
    built = HarnessLM.create_from_arg_string(f"path={synthetic_run},max_length=64,rolling_stride=32",
                                             {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert (built.max_length, built.rolling_stride, built.batch_size) == (64, 32, 2)
    assert built.get_model_info()["step"] == 6


# ------------------------------------------------------------------------------------------ tasks and CLI
def test_wikitext_articles_and_word_counts(sample_dir):
    text = (sample_dir / "wiki.test.tokens").read_text(encoding="utf-8")
    docs = wikitext_articles(text)
    assert len(docs) == 62 and "".join(docs) == text
    assert all(re.match(r"( \n)* = [^=].* = \n", d) for d in docs)
    # WikiText-103's own token count of the test set (words + one end-of-line per line)
    assert sum(map(wikitext_word_count, docs)) == 245_569
    # lm-eval's stock count: every page begins with a space and ends with a newline -> two empty "words" each
    assert sum(map(lm_eval_word_count, docs)) == 241_211 + 2 * 62
    assert wikitext_word_count(" a b \n c") == wikitext_word_count(" a b \n c\n") == 5
    assert wikitext_word_count("") == 0 and wikitext_word_count("\n\n") == 2 and wikitext_word_count("a") == 2


def test_without_lm_eval_the_tool_says_how_to_install_it(monkeypatch, capsys, synthetic_run):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # every `import lm_eval...` now fails
    monkeypatch.delitem(sys.modules, "lm.eval.harness")
    monkeypatch.delattr(lm.eval, "harness")
    assert harness_main([str(synthetic_run), "--tasks", "anything"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[eval]'" in err and "Traceback" not in err


def test_tool_errors_are_one_line(synthetic_run, tmp_path, capsys):
    assert harness_main([str(synthetic_run), "--tasks", "x", "--include-path", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert harness_main([str(tmp_path), "--tasks", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert harness_main([str(synthetic_run), "--tasks", "x", "--batch-size", "0"]) == 2
    assert "batch_size=0" in capsys.readouterr().err
    assert harness_main([str(synthetic_run), "--tasks", "x", "--device", "gpu"]) == 2
    assert "--device='gpu' is not a device" in capsys.readouterr().err
    assert harness_main([str(synthetic_run), "--tasks", "x", "--limit", "0"]) == 2
    assert "--limit=0 must be > 0" in capsys.readouterr().err
    assert harness_main([str(synthetic_run), "--tasks", "sample_rolling", "--include-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task(s): 'sample_rolling'" in err


def test_tool_applies_the_checkpoints_tf32_setting(synthetic_run, tmp_path, monkeypatch, capsys):
    import lm.cli.harness
    calls = []
    monkeypatch.setattr(lm.cli.harness, "set_tf32", lambda enabled, device: calls.append((enabled, str(device))))
    for tf32 in ("true", "false"):  # stops at "no tasks given", after the model is loaded
        assert harness_main([str(synthetic_run), "--tasks", ",", "--device", "cpu",
                             f"compute.tf32={tf32}"]) == 2
    assert calls == [(True, "cpu"), (False, "cpu")]


def test_task_writer_tool_writes_the_tasks_and_reports_bad_input_in_one_line(tmp_path, capsys):
    text = "".join(f" = Article {a} = \n" + "".join(f" the red fox sees a small bird near the old house number {i} "
                                                  f"and the quiet river . \n" for i in range(12)) for a in range(3))
    (tmp_path / "wiki.test.tokens").write_text(text, encoding="utf-8")
    out = tmp_path / "tasks"
    assert harness_tasks_main([str(tmp_path / "wiki.test.tokens"), str(out), "--prefix", "t",
                               "--num-questions", "5"]) == 0
    assert f"--include-path {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["t_next_word.jsonl", "t_next_word.yaml", "t_rolling.jsonl",
                                                      "t_rolling.yaml", "utils.py"]
    docs = [json.loads(line)["text"] for line in (out / "t_rolling.jsonl").read_text().splitlines()]
    assert len(docs) == 3 and "".join(docs) == text
    assert len((out / "t_next_word.jsonl").read_text().splitlines()) == 5

    (tmp_path / "short.txt").write_text(" = A = \n a few words \n", encoding="utf-8")
    for argv, message in [([str(tmp_path / "short.txt"), str(tmp_path / "none")], "too short"),
                          ([str(tmp_path / "missing.txt"), str(tmp_path / "none")], "cannot write the tasks"),
                          ([str(tmp_path / "wiki.test.tokens"), str(tmp_path / "none"), "--num-choices", "1"],
                           "--num-choices=1 must be >= 2")]:
        assert harness_tasks_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()  # nothing written for a request that fails


# ------------------------------------------------------------------------------------------ WikiText sample
@pytest.mark.slow
def test_rolling_word_perplexity_agrees_with_eval_ppl(wikitext_run, five_test_articles, tmp_path, capsys):
    text = (five_test_articles / "wiki.test.tokens").read_text(encoding="utf-8")
    tasks = tmp_path / "tasks"
    rolling, _ = write_tasks(five_test_articles / "wiki.test.tokens", tasks, prefix="sample", num_questions=10)
    out = tmp_path / "harness.json"
    assert harness_main([str(wikitext_run), "--tasks", rolling, "--include-path", str(tasks),
                              "--output", str(out), "--batch-size", "16"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    metrics = report["results"][rolling]
    assert metrics["sample_len"] == len(wikitext_articles(text)) == 5
    assert report["config"]["max_length"] == 128 and report["config"]["rolling_stride"] == 128
    assert f"{metrics['word_perplexity,none']:.4f}" in table

    ppl_json = tmp_path / "eval_ppl.json"
    subprocess.run([sys.executable, str(REPO / "tools/eval_ppl.py"), str(wikitext_run), "--split", "test",
                    "--context", "128", "--json", str(ppl_json), "--no-progress", f"data.path={five_test_articles}",
                    f"data.cache_dir={tmp_path / 'cache'}"], check=True, capture_output=True)
    (row,) = json.loads(ppl_json.read_text())["results"]
    words, line_ends = len(text.split()), text.count("\n")
    expected = math.exp(row["nll_sum"] / (words + line_ends))  # WikiText-103 convention, one continuous stream
    harness_ppl = metrics["word_perplexity,none"]
    print(f"word ppl: harness {harness_ppl:.2f}, eval_ppl nll_sum/(words+line ends) {expected:.2f}, "
          f"ratio {harness_ppl / expected:.5f}")
    assert harness_ppl == pytest.approx(expected, rel=0.01)
    assert harness_ppl != pytest.approx(expected, rel=1e-6)  # documents vs one stream: not the same windows
    # the same log-likelihood over lm-eval's stock word count
    harness_nll = math.log(harness_ppl) * (words + line_ends)
    stock_words = sum(len(re.split(r"\s+", d)) for d in wikitext_articles(text))
    assert metrics["lm_eval_word_perplexity,none"] == pytest.approx(math.exp(harness_nll / stock_words), rel=1e-9)
    assert metrics["bits_per_byte,none"] == pytest.approx(row["bits_per_byte"], rel=0.01)


@pytest.mark.slow
def test_multiple_choice_task_matches_direct_scoring(wikitext_run, five_test_articles, tmp_path, monkeypatch, capfd):
    tasks = tmp_path / "tasks"
    _, choice = write_tasks(five_test_articles / "wiki.test.tokens", tasks, prefix="sample", num_questions=12)
    lm_ = HarnessLM(wikitext_run, batch_size=5, device="cpu")
    monkeypatch.chdir(tmp_path)  # outside any git repository, where lm-eval's own `git describe` complains
    capfd.readouterr()
    results = run_tasks(lm_, [choice], [tasks], log_samples=True)
    assert "fatal" not in capfd.readouterr().err  # nothing printed by a git run in the wrong place
    assert results["git_hash"] == subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                                 capture_output=True, text=True).stdout.strip()
    samples = results["samples"][choice]
    assert len(samples) == 12
    correct = 0
    for s in samples:
        lls = []
        for (context, continuation), ((ll, greedy),) in zip(s["arguments"], s["resps"]):
            assert continuation == " " + s["doc"]["choices"][len(lls)]
            want_ll, want_greedy = direct_loglikelihood(lm_, context, continuation)
            assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
            lls.append(ll)
        correct += max(range(len(lls)), key=lls.__getitem__) == s["doc"]["label"]
    assert results["results"][choice]["acc,none"] == pytest.approx(correct / len(samples))
    json.dumps(json_safe(results))  # the whole result, samples included, is JSON
