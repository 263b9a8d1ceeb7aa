"""Documents corpora (lm/data/files.py, hub_documents.py, documents.py, packing.py, document_cache.py): every
format and a hub-layout dataset saved to disk, an EOS after every document, the carve-out of missing splits,
token files that span several shards, resumable preparation, and evaluation on such a corpus."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lm.data.documents
import lm.data.source
from conftest import sample_documents, tiny_model, write_documents
from lm.config import load_config
from lm.data import ShardedTokens, global_batch, prepare_corpus
from lm.data.documents import text_position
from lm.eval.perplexity import evaluate_split, score_tokens, tokenize_split


def doc_cfg(cache: Path, *overrides: str):
    return load_config([], [f"data.cache_dir={cache}", "data.num_proc=1", "data.progress=false",
                            "data.tokenizer.vocab_size=400", *overrides]).data


def packed(tok, docs: list[str]) -> np.ndarray:
    """The expected stream: each document encoded on its own, then EOS."""
    return np.concatenate([np.append(tok.encode_array(d), tok.eos_id) for d in docs])


def documents_in(tok, tokens) -> list[str]:
    """The texts between the EOS ids of a stream (every document ends with one)."""
    ids = np.asarray(tokens)
    assert ids[-1] == tok.eos_id
    ends = np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[a:b]) for a, b in zip([0, *(ends[:-1] + 1)], ends)]


def files_corpus(root: Path, ext: str, docs: dict[str, list[str]], per_file: int) -> list[str]:
    """``docs`` of each split written as ``root/<split>/part-<k><ext>`` files of ``per_file`` documents; the
    data.files overrides for them."""
    overrides = []
    for split, split_docs in docs.items():
        for k in range(0, len(split_docs), per_file):
            write_documents(root / split / f"part-{k // per_file:03d}{ext}", split_docs[k:k + per_file])
        overrides.append(f"data.files.{split}={root / split}/*{ext}")
    return overrides


# ------------------------------------------------------------------ every format
@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet", ".txt", ".txt.gz"])
def test_every_format_gives_its_documents_each_followed_by_eos(tmp_path, monkeypatch, ext):
    monkeypatch.setattr(lm.data.source, "CHUNK_CHARS", 300)  # long documents come in several pieces and tasks
    whole_files = ext.startswith(".txt")
    docs = {"train": sample_documents(120, seed=1, max_lines=20 if whole_files else 4),
            "valid": sample_documents(6, seed=2), "test": sample_documents(5, seed=3)}
    if whole_files:  # a text file is one document
        docs = {s: ["".join(d[k:k + 10]) for k in range(0, len(d), 10)] for s, d in docs.items()}
    overrides = files_corpus(tmp_path / "src", ext, docs, per_file=1 if whole_files else 50)
    corpus = prepare_corpus(doc_cfg(tmp_path / "cache", *overrides))
    tok = corpus.tokenizer
    for name, split_docs in docs.items():
        split = corpus.split(name)
        assert np.array_equal(np.asarray(split.tokens), packed(tok, split_docs)), name
        assert documents_in(tok, split.tokens) == split_docs
        assert split.num_documents == len(split_docs) and split.num_word_level_tokens == 0
        assert split.num_bytes == sum(len(d.encode()) for d in split_docs)
        assert split.num_words == sum(len(d.split()) for d in split_docs)
        assert split.tokens.dtype == np.uint16


def test_hub_layout_dataset_saved_to_disk_by_column(tmp_path):
    from datasets import Dataset, DatasetDict

    train, valid = sample_documents(200, seed=4), sample_documents(8, seed=5)
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict({"content": train, "id": list(range(200))}),
                 "validation": Dataset.from_dict({"content": valid, "id": list(range(8))})}).save_to_disk(saved)
    cfg = doc_cfg(tmp_path / "cache", f"data.hf_name={saved}", "data.hf_config=null", "data.text_field=content",
                  "data.valid_fraction=0.1")
    corpus = prepare_corpus(cfg)
    tok = corpus.tokenizer
    assert documents_in(tok, corpus.split("valid").tokens) == valid  # the dataset's own validation split
    test_docs = documents_in(tok, corpus.split("test").tokens)  # no test split: carved out of train
    assert test_docs == [d for d in train if text_position(d) >= 0.9]
    assert documents_in(tok, corpus.split("train").tokens) == [d for d in train if text_position(d) < 0.9]
    assert prepare_corpus(cfg).built == ()

    rows = doc_cfg(tmp_path / "cache", f"data.hf_name={saved}", "data.hf_config=null", "data.text_field=content",
                   "data.hf_rows=lines", "data.hf_splits.test=validation")  # rows as lines of one text: no EOS
    lines = prepare_corpus(rows, splits=("valid",)).split("valid")
    assert lines.num_documents == 0 and lines.num_word_level_tokens > 0
    assert corpus.tokenizer.eos_id not in np.asarray(lines.tokens)


# ------------------------------------------------------------------ carve-out
def test_carve_out_is_deterministic_disjoint_and_recorded(tmp_path):
    docs = sample_documents(400, seed=6)
    docs += docs[:20]  # duplicates always land in the same split as their first copy
    one = files_corpus(tmp_path / "a", ".jsonl", {"train": docs}, per_file=100)
    corpus = prepare_corpus(doc_cfg(tmp_path / "cache", *one, "data.valid_fraction=0.1"))
    tok = corpus.tokenizer
    got = {name: documents_in(tok, corpus.split(name).tokens) for name in ("train", "valid", "test")}
    assert got["valid"] == [d for d in docs if text_position(d) < 0.1]
    assert got["test"] == [d for d in docs if text_position(d) >= 0.9]
    assert sorted(got["train"] + got["valid"] + got["test"]) == sorted(docs)
    assert not set(got["train"]) & set(got["valid"]) and not set(got["train"]) & set(got["test"])
    assert 15 <= len(got["valid"]) <= 70 and 15 <= len(got["test"]) <= 70
    side = json.loads(corpus.split("valid").path.with_suffix(".json").read_text())
    assert side["carve_out"]["position_range"] == [0.0, 0.1] and side["num_documents"] == len(got["valid"])

    # the same documents in other shards (and a given test split) carve out the same valid documents
    other = files_corpus(tmp_path / "b", ".jsonl.gz", {"train": docs, "test": docs[:5]}, per_file=37)
    again = prepare_corpus(doc_cfg(tmp_path / "cache2", *other, "data.valid_fraction=0.1"), splits=("valid",))
    assert documents_in(again.tokenizer, again.split("valid").tokens) == got["valid"]


def test_an_empty_carve_out_says_what_to_change(tmp_path):
    overrides = files_corpus(tmp_path / "src", ".jsonl", {"train": sample_documents(60, seed=7)}, per_file=60)
    with pytest.raises(lm.data.DataError, match="carve-out gave the valid split no documents.*valid_fraction"):
        prepare_corpus(doc_cfg(tmp_path / "cache", *overrides, "data.valid_fraction=1e-9"))


# ------------------------------------------------------------------ token files across shards
def test_sharded_tokens_index_like_their_concatenation():
    parts = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 6, dtype=np.uint16), np.arange(6, 20, dtype=np.uint16)]
    view, whole = ShardedTokens(parts), np.arange(20, dtype=np.uint16)
    assert len(view) == 20 and view.shape == (20,) and view.ndim == 1 and view.dtype == np.uint16
    for s in [slice(0, 20), slice(3, 7), slice(4, 6), slice(5, 6), slice(18, 30), slice(-4, None), slice(7, 3),
              slice(1, 19, 3)]:
        assert np.array_equal(view[s], whole[s]), s
    assert view[5] == 5 and view[-1] == 19 and np.array_equal(view[[0, 19, 5]], [0, 19, 5])
    with pytest.raises(IndexError):
        view[20]
    assert np.array_equal(np.asarray(view), whole)


def test_training_batches_read_across_token_files(tmp_path, monkeypatch):
    monkeypatch.setattr(lm.data.documents, "GROUP_BYTES", 1)  # one token file per input shard
    docs = sample_documents(300, seed=8)
    overrides = files_corpus(tmp_path / "src", ".jsonl", {"train": docs, "valid": docs[:3], "test": docs[:3]},
                             per_file=40)
    train = prepare_corpus(doc_cfg(tmp_path / "cache", *overrides), splits=("train",)).split("train")
    assert isinstance(train.tokens, ShardedTokens) and len(train.tokens.parts) == 8
    assert len(list(train.path.glob("part-*.bin"))) == 8
    whole = np.asarray(train.tokens)
    for step in (0, 5, 17):
        want = global_batch(whole, 24, 16, step, seed=3)
        assert torch.equal(global_batch(train, 24, 16, step, seed=3), want)
        assert torch.equal(global_batch(train.tokens, 24, 16, step, seed=3), want)


# ------------------------------------------------------------------ resuming
_CHILD = """
import sys
import lm.data.documents, lm.data.source
from lm.config import load_config
from lm.data import prepare_corpus
lm.data.documents.GROUP_BYTES = 1
lm.data.source.CHUNK_CHARS = 2048
prepare_corpus(load_config([], sys.argv[1:]).data, splits=("train",))
"""


def test_interrupted_preparation_resumes_without_redoing_finished_shards(tmp_path, monkeypatch, caplog):
    docs = sample_documents(6000, seed=9, max_lines=6)
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", "data.progress=false",
                 "data.tokenizer.vocab_size=400",
                 *files_corpus(tmp_path / "src", ".jsonl", {"train": docs, "valid": docs[:5], "test": docs[:5]},
                               per_file=500)]
    cfg = load_config([], overrides).data
    prepare_corpus(cfg, splits=("valid",))  # tokenizer ready, so the child goes straight to tokenizing train
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *overrides])
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache" / "tokens").glob("*/train-*/part-00001.json")):
        assert child.poll() is None, "the child finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    folder = next((tmp_path / "cache" / "tokens").glob("*/train-*/"))
    assert not folder.with_suffix(".json").exists()  # the split does not claim to be complete
    done = sorted(folder.glob("part-*.json"))
    assert 2 <= len(done) < 12
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*") if p.suffix}

    monkeypatch.setattr(lm.data.documents, "GROUP_BYTES", 1)
    caplog.set_level("INFO", logger="lm.data.document_cache")
    corpus = prepare_corpus(cfg, splits=("train",))
    assert f"{len(done)} of 12 parts already done" in caplog.text
    for path, stamp in before.items():  # finished parts were neither read again nor rewritten
        if path.with_suffix(".json") in done:
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    assert not list(folder.glob(".*.tmp*"))
    assert np.array_equal(np.asarray(corpus.split("train").tokens), packed(corpus.tokenizer, docs))


# ------------------------------------------------------------------ evaluation
def test_evaluation_of_a_documents_split(tmp_path):
    docs = sample_documents(80, seed=10)
    overrides = files_corpus(tmp_path / "src", ".parquet", {"train": docs, "valid": docs[:12], "test": docs[:2]},
                             per_file=80)
    cfg = doc_cfg(tmp_path / "cache", *overrides)
    corpus = prepare_corpus(cfg)
    tok = corpus.tokenizer
    cached = tokenize_split(cfg, tok, "valid")  # the token cache built with this tokenizer
    fresh = tokenize_split(doc_cfg(tmp_path / "other-cache", *overrides), tok, "valid")  # tokenized in memory
    assert np.array_equal(np.asarray(cached.tokens), fresh.tokens)
    assert (cached.num_documents, cached.num_bytes) == (fresh.num_documents, fresh.num_bytes) == (
        12, sum(len(d.encode()) for d in docs[:12]))

    model = tiny_model(vocab_size=tok.vocab_size)
    (row,) = evaluate_split(model, fresh, [32], None, 4, tok.bos_id, "cpu")
    assert row.word_perplexity is None and row.num_word_level_tokens is None and row.num_documents == 12
    assert row.num_tokens == fresh.num_tokens and row.bits_per_byte > 0 and row.token_perplexity > 1

    # per document: each scored on its own from BOS, so the order of the documents does not matter
    (per_doc,) = evaluate_split(model, fresh, [32], None, 4, tok.bos_id, "cpu", per_document_eos=tok.eos_id)
    shuffled = packed(tok, docs[:12][::-1])
    again = lm.eval.perplexity.score_documents(model, shuffled, tok.eos_id, 32, 32, 4, tok.bos_id)
    assert per_doc.per_document and per_doc.nll_sum == pytest.approx(again.nll_sum, rel=1e-6)
    assert per_doc.nll_sum != pytest.approx(row.nll_sum, rel=1e-6)  # the packed stream sees the previous document
    assert score_tokens(model, shuffled, 32, 32, 4, tok.bos_id).nll_sum != pytest.approx(row.nll_sum, rel=1e-6)


# ------------------------------------------------------------------ helpers of the documents layer
def test_file_hashes_are_remembered_until_the_file_changes(tmp_path):
    from lm.data.fingerprint import file_sha256
    from lm.fileio import sha256_file

    def written(text: str, age_s: int) -> None:
        path.write_text(text)
        past = time.time_ns() - age_s * 10 ** 9
        os.utime(path, ns=(past, past))

    path, memo = tmp_path / "shard.jsonl", tmp_path / "memo"
    path.write_text('{"text": "a"}\n')
    assert file_sha256(path, memo) == sha256_file(path) and not memo.exists()  # too fresh to be remembered
    written('{"text": "a"}\n', age_s=60)
    first = file_sha256(path, memo)
    assert first == sha256_file(path) and len(list(memo.iterdir())) == 1
    entry = json.loads(next(memo.iterdir()).read_text())
    assert entry["sha256"] == first and entry["size"] == path.stat().st_size
    assert file_sha256(path, memo) == first
    written('{"text": "b"}\n', age_s=30)  # same size, new content and modification time
    assert file_sha256(path, memo) == sha256_file(path) != first


def test_spread_order_visits_every_shard_spreading_each_prefix():
    from lm.data.documents import spread_order

    for n in (1, 2, 3, 7, 16, 100):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
    assert spread_order(8)[:4] == [0, 4, 2, 6]


# ------------------------------------------------------------------ what a user reads: the documents, in order
def sha256_position(text: str) -> float:
    """Where a .txt document falls in [0, 1), computed here: the first 16 hex digits of its file's sha256."""
    import hashlib
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2.0 ** 64


def test_a_txt_corpus_without_valid_and_test_files_puts_every_document_in_exactly_one_split(tmp_path):
    docs = ["".join(sample_documents(3, seed=k)) for k in range(30)]  # one document per .txt file, in name order
    overrides = files_corpus(tmp_path / "src", ".txt", {"train": docs}, per_file=1)
    corpus = prepare_corpus(doc_cfg(tmp_path / "cache", *overrides, "data.valid_fraction=0.25"))
    got = {name: documents_in(corpus.tokenizer, corpus.split(name).tokens) for name in ("train", "valid", "test")}
    assert got["valid"] == [d for d in docs if sha256_position(d) < 0.25]
    assert got["test"] == [d for d in docs if sha256_position(d) >= 0.75]
    assert got["train"] == [d for d in docs if 0.25 <= sha256_position(d) < 0.75]
    assert sorted(got["train"] + got["valid"] + got["test"]) == sorted(docs) and all(got.values())


def flip_bytes(path: Path) -> None:
    """Change a token file's bytes in place, keeping its size."""
    data = bytearray(path.read_bytes())
    data[2:6] = bytes(b ^ 0x5A for b in data[2:6])
    path.write_bytes(bytes(data))


def test_a_token_file_of_the_right_size_with_changed_bytes_is_rebuilt(tmp_path, monkeypatch):
    """A part whose size is right but whose bytes changed (a bad disk, a stray write) is never trained on: its
    sha256 differs from the one recorded, so it is tokenized again, whether the split's own sidecar is there or
    an interrupted preparation left only the parts' sidecars."""
    monkeypatch.setattr(lm.data.documents, "GROUP_BYTES", 1)  # one token file per input shard
    docs = sample_documents(90, seed=11)
    overrides = files_corpus(tmp_path / "src", ".jsonl", {"train": docs, "valid": docs[:3], "test": docs[:3]},
                             per_file=30)
    cfg = doc_cfg(tmp_path / "cache", *overrides)
    split = prepare_corpus(cfg, splits=("train",)).split("train")
    want = np.asarray(split.tokens).copy()
    parts = sorted(split.path.glob("part-*.bin"))
    assert len(parts) == 3

    flip_bytes(parts[1])
    again = prepare_corpus(cfg, splits=("train",))
    assert again.built == ("train",) and np.array_equal(np.asarray(again.split("train").tokens), want)

    split.path.with_suffix(".json").unlink()  # as after an interrupted preparation: only the parts' sidecars
    flip_bytes(parts[2])
    kept = (parts[0].stat().st_ino, parts[0].stat().st_mtime_ns)
    third = prepare_corpus(cfg, splits=("train",))
    assert third.built == ("train",) and np.array_equal(np.asarray(third.split("train").tokens), want)
    assert (parts[0].stat().st_ino, parts[0].stat().st_mtime_ns) == kept  # an intact part is reused as it is
    assert np.array_equal(np.asarray(third.split("train").tokens), packed(third.tokenizer, docs))


def test_parallel_tokenization_of_documents_gives_the_documents_in_order(tmp_path, monkeypatch, caplog):
    """The worker processes' path of document tokenization (its own threshold set to 0, so that a small corpus
    takes it), with many tasks and several token files in flight: the same stream as each document encoded on its
    own, then EOS, in order."""
    import lm.data.document_cache

    monkeypatch.setattr(lm.data.document_cache, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(lm.data.source, "CHUNK_CHARS", 200)  # tasks of a few documents
    monkeypatch.setattr(lm.data.documents, "GROUP_BYTES", 2000)  # several token files
    docs = sample_documents(160, seed=12)
    overrides = files_corpus(tmp_path / "src", ".jsonl", {"train": docs, "valid": docs[:2], "test": docs[:2]},
                             per_file=8)
    caplog.set_level("INFO", logger="lm.data.document_cache")
    corpus = prepare_corpus(doc_cfg(tmp_path / "cache", *overrides, "data.num_proc=2"), splits=("train",))
    assert "; 2 processes)" in caplog.text  # the tokenized line of the split says which path ran
    train = corpus.split("train")
    assert len(list(train.path.glob("part-*.bin"))) >= 3
    assert np.array_equal(np.asarray(train.tokens), packed(corpus.tokenizer, docs))
    assert documents_in(corpus.tokenizer, train.tokens) == docs and train.num_documents == len(docs)
