"""Documents that do not attend to each other (data.document_mask): document starts from the EOS tokens; a packed
batch through the model equals each document run alone (float64, logits and gradients) for every attention kind
and every method the model can pick; scoring with the mask equals scoring the documents apart; bad combinations
are one-line errors; a run on a documents corpus trains, resumes and reports with the mask."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import (copy_run, sample_documents, scalars, smoke_argv, tiny_model, tiny_train_config,
                      write_documents)
from lm.config import ConfigError
from lm.data.batches import document_starts

EOS = 2


def test_document_starts_from_eos_tokens():
    ids = torch.tensor([[5, 6, 2, 7, 2, 2, 8, 9],
                        [2, 5, 5, 5, 5, 5, 5, 2]])
    want = torch.tensor([[0, 0, 2, 2, 4, 5, 5, 5],
                         [0, 0, 0, 0, 0, 0, 0, 7]])
    assert torch.equal(document_starts(ids, EOS), want)
    assert document_starts(ids[:, :0], EOS).shape == (2, 0)
    # on the meta device too: no value is read on the host
    assert document_starts(ids.to("meta"), EOS).shape == ids.shape


def segments(row: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each document of one row: a document begins at each EOS (and at position 0)."""
    cuts = sorted({0, *(i for i, t in enumerate(row.tolist()) if t == EOS)})
    return list(zip(cuts, cuts[1:] + [len(row)]))


def packed_batch(n=40, seed=0) -> torch.Tensor:
    """Two rows of ``n`` tokens with EOS tokens at different places (documents of 1 to 20 tokens, one row starting
    with an EOS, two EOS in a row)."""
    ids = torch.randint(3, 50, (2, n), generator=torch.Generator().manual_seed(seed))
    ids[0, [7, 8, 25, 39]] = EOS
    ids[1, [0, 12, 31]] = EOS
    return ids


MODELS = {
    "rpe-dense": dict(kind="kernelized_rpe", rpe_max_distance=64, method="dense"),
    "rpe-band": dict(kind="kernelized_rpe", rpe_max_distance=6, method="band"),
    "rpe-auto": dict(kind="kernelized_rpe", rpe_max_distance=6, method="auto"),
    "bucketed-auto": dict(kind="kernelized_rpe", rpe="bucketed", rpe_num_buckets=8, rpe_max_distance=20),
    "absolute-prefix": dict(kind="kernelized", rpe="none", method="prefix", feature_map="prf"),
    "absolute-dense": dict(kind="kernelized", rpe="none", method="dense"),
    "softmax-rpe": dict(kind="softmax", rpe_max_distance=16),
    "softmax-plain": dict(kind="softmax", rpe="none"),
}


@pytest.mark.parametrize("name", MODELS)
def test_a_packed_batch_equals_each_document_alone(name):
    model = tiny_model(4, looks_trained=True, **MODELS[name]).double().train()  # dropout 0: train mode is exact
    model.activation_checkpointing = name == "rpe-band"  # the blocks recomputed in backward get the starts too
    if name == "softmax-rpe":  # queries in chunks of a few rows: the masks of each chunk
        for block in model.blocks:
            block.attn.max_bias_elements = 2 * 4 * 40 * 3
    ids = packed_batch()
    weights = torch.randn(*ids.shape, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = list(model.parameters())

    packed = model(ids, document_starts=document_starts(ids, EOS))
    grads_packed = torch.autograd.grad((packed * weights).sum(), params, allow_unused=True)
    alone = torch.zeros_like(packed)
    total = 0.0
    for b in range(ids.shape[0]):
        for a, e in segments(ids[b]):
            out = model(ids[b:b + 1, a:e])[0]
            alone[b, a:e] = out.detach()
            total = total + (out * weights[b, a:e]).sum()
    grads_alone = torch.autograd.grad(total, params, allow_unused=True)

    scale = alone.abs().max()
    assert ((packed - alone).abs().max() / scale).item() < 1e-12
    for p, g, w in zip(model.named_parameters(), grads_packed, grads_alone):
        if w is None:
            assert g is None or g.abs().max() == 0, p[0]
            continue
        assert ((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item() < 1e-10, p[0]
    # and the mask matters: without it the documents after the first see the ones before
    assert (model(ids).detach() - alone).abs().max() / scale > 1e-3


@pytest.mark.parametrize("name", ["rpe-auto", "absolute-prefix", "softmax-rpe"])
def test_document_masks_read_no_values_on_the_host(name):
    """The model on the meta device, starts from the ids there too: forward and backward run (a host read of a
    value would fail), the op's custom kernels included."""
    from conftest import OpCounter, tiny_model_config
    from lm.model import Transformer

    with torch.device("meta"):
        model = Transformer(tiny_model_config(**MODELS[name]))
    ids = torch.randint(0, 50, (2, 301), device="meta")
    counter = OpCounter()
    with counter:
        logits = model(ids[:, :-1], document_starts=document_starts(ids[:, :-1], EOS))
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert logits.device.type == "meta" and all(p.grad is not None for p in model.parameters())
    assert counter.custom["lm.kernelized_mix.default"] == (0 if name == "softmax-rpe" else 2)


def test_the_model_refuses_document_starts_it_cannot_honour():
    model = tiny_model(0)
    ids = packed_batch()
    starts = document_starts(ids, EOS)
    with pytest.raises(ValueError, match="shape"):
        model(ids, document_starts=starts[:, :-1])
    with pytest.raises(ValueError, match="decoding cache"):
        model(ids, cache=model.new_cache(2), document_starts=starts)
    with pytest.raises(ValueError, match="key_mask"):
        model(ids, key_mask=torch.ones_like(ids, dtype=torch.bool), document_starts=starts)
    fft = tiny_model(0, method="fft", rpe_max_distance=64)
    with pytest.raises(ValueError, match="fft"):
        fft(ids, document_starts=starts)


def test_config_refuses_the_fft_with_document_masks():
    with pytest.raises(ConfigError, match="model.attention.method=auto") as e:
        tiny_train_config("data.document_mask=true", "model.attention.method=fft")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- scoring
def test_scoring_with_the_mask_equals_scoring_the_documents_apart():
    from lm.eval.perplexity import score_tokens
    from lm.eval.position import loss_by_position

    model = tiny_model(5, looks_trained=True, rpe_max_distance=8)
    stream = packed_batch(n=60, seed=3).flatten()  # 120 tokens, 7 EOS
    context = 32
    got = score_tokens(model, stream, context, context, batch_size=3, bos_id=1, document_eos=EOS)
    # by hand: windows of [BOS] + stream, each cut into its documents, each run alone
    s = torch.cat([torch.tensor([1]), stream])
    total, count, per_window = 0.0, 0, []
    with torch.no_grad():
        for w in range(0, len(stream), context):
            end = min(w + context, len(stream))
            start = end - context if end - w < context else w  # the last window is shifted back to a full one
            inputs, targets = s[start:end], stream[start:end]
            logits = torch.cat([model(inputs[None, a:e])[0] for a, e in segments(inputs)])
            nll = F.cross_entropy(logits.double(), targets, reduction="none")
            per_window.append(nll.sum().item())
            total += nll[w - start:].sum().item()
            count += end - w
    assert got.num_tokens == count == len(stream)
    assert got.nll_sum == pytest.approx(total, rel=1e-6)
    # loss by position with the mask: its 3 full windows are the first 3 above, every position scored
    positions = loss_by_position(model, stream, context, 1, batch_size=2, document_eos=EOS)
    assert positions.num_windows == 3
    assert sum(positions.position_loss) * 3 == pytest.approx(sum(per_window[:3]), rel=1e-6)
    assert abs(score_tokens(model, stream, context, context, 3, 1).nll_sum - total) > 1e-6 * total  # the mask acts


# ---------------------------------------------------------------------------------------------- training
def test_a_text_of_lines_cannot_mask_documents(tmp_path, capsys):
    from lm.cli.train import main
    assert main(smoke_argv(tmp_path / "run", tmp_path / "cache", "data.document_mask=true", "max_steps=1")) != 0
    err = capsys.readouterr().err
    assert "data.document_mask=true needs a corpus of documents" in err and "synthetic" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_training_with_document_masks_runs_resumes_and_reports(tmp_path):
    from lm.checkpoint import checkpoint_step, find_checkpoint
    from lm.cli.eval_ppl import main as eval_main
    from lm.cli.train import main as train_main
    from lm.eval.perplexity import score_tokens, tokenize_split
    from lm.inference.loading import load_for_inference

    corpus = tmp_path / "corpus"
    write_documents(corpus / "train.jsonl", sample_documents(160, seed=1))
    write_documents(corpus / "valid.jsonl", sample_documents(12, seed=2))
    write_documents(corpus / "test.jsonl", sample_documents(4, seed=3))
    common = ["data.source=files", f"data.files.train={corpus / 'train.jsonl'}",
              f"data.files.valid={corpus / 'valid.jsonl'}", f"data.files.test={corpus / 'test.jsonl'}",
              "data.document_mask=true", "data.seq_len=64", "data.tokenizer.vocab_size=400", "save_every=4",
              "eval_every=4", "eval_batches=0", "batch_size=8", "micro_batch_size=4"]
    run = tmp_path / "run"
    assert train_main(smoke_argv(run, tmp_path / "cache", *common, "max_steps=4")) == 0
    resumed = copy_run(run, tmp_path / "resumed")
    assert train_main(smoke_argv(resumed, tmp_path / "cache", *common, "max_steps=8")) == 0
    straight = tmp_path / "straight" / "run"
    assert train_main(smoke_argv(straight, tmp_path / "cache", *common, "max_steps=8")) == 0
    assert checkpoint_step(find_checkpoint(resumed)) == 8
    a, b = (torch.load(find_checkpoint(r) / "model.pt", weights_only=True) for r in (resumed, straight))
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must continue exactly"

    # validation at step 8 logged eval_ppl's number with the mask, which differs from the unmasked one
    out = tmp_path / "ppl.json"
    assert eval_main([str(straight), "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["results"][0]
    run_ = load_for_inference(straight)
    split = tokenize_split(run_.cfg.data, run_.tokenizer, "valid")
    masked = score_tokens(run_.model, split.tokens, 64, 64, 4, run_.tokenizer.bos_id,
                          document_eos=run_.tokenizer.eos_id)
    unmasked = score_tokens(run_.model, split.tokens, 64, 64, 4, run_.tokenizer.bos_id)
    assert report["nll_sum"] == pytest.approx(masked.nll_sum, rel=1e-6) and report["num_tokens"] == split.num_tokens
    assert report["document_mask"] is True and report["per_document"] is False
    assert abs(masked.nll_sum - unmasked.nll_sum) > 1e-4 * masked.nll_sum
    assert scalars(straight, "valid/loss")[8] == pytest.approx(masked.mean, rel=1e-5)

    # the first step's loss is that of the masked batch under the initial weights (and not the unmasked one's)
    from lm.data import global_batch, prepare_corpus
    from lm.model import Transformer
    from lm.training.engine import token_nll_sum
    from lm.training.steplog import read_steps

    cfg = run_.cfg
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model)
    model.init_weights()
    corpus_ = prepare_corpus(cfg.data)
    batch = global_batch(corpus_.split("train"), cfg.data.seq_len, cfg.batch_size, 0, cfg.seed)
    with torch.no_grad():
        want = token_nll_sum(model, batch, document_eos=corpus_.tokenizer.eos_id).item() / batch[:, 1:].numel()
        plain = token_nll_sum(model, batch).item() / batch[:, 1:].numel()
    first = read_steps(straight / "steps.jsonl")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=2e-6)
    assert abs(plain - want) > 2e-5 * want  # near-uniform logits at initialisation: small, but far above round-off
