import hashlib
import json
import multiprocessing
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_DIR
import lm.data.hub
import lm.data.source
import lm.data.token_cache
from lm.config import ConfigError, SyntheticConfig, load_config
from lm.data import DataError, LineEnds, global_batch, prepare_corpus, shard, window_layout
from lm.data.synthetic import split_text
from lm.tokenizer import Tokenizer

README_WORDS = {"valid": 213_886, "test": 241_211}
WIKITEXT_TOKEN_COUNT = {"valid": 217_646, "test": 245_569}
"""WikiText-103's own word-level token counts (words + one <eos> per line), the denominators of the literature."""


def data_cfg(cache: Path, *overrides: str):
    return load_config([], [f"data.cache_dir={cache}", "data.num_proc=1", "data.progress=false",
                            "data.tokenizer.vocab_size=300", *overrides]).data


def write_local(directory: Path, train_tokens: int = 4000, seed: int = 1) -> Path:
    """A small corpus in the {train,valid,test}.txt layout (synthetic text, so it is always available)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig(train_tokens=train_tokens, seed=seed)
    for split in ("train", "valid", "test"):
        (directory / f"{split}.txt").write_bytes(split_text(cfg, split).encode())
    return directory


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the real WikiText-103 sample
@pytest.fixture(scope="module")
def sample_corpus(tmp_path_factory, sample_dir):
    cache = tmp_path_factory.mktemp("cache")
    cfg = data_cfg(cache, f"data.path={sample_dir}", "data.tokenizer.vocab_size=1000",
                   "data.tokenizer.train_max_bytes=300000")
    return cfg, prepare_corpus(cfg)


def test_sample_counts_match_the_files(sample_corpus):
    _, corpus = sample_corpus
    for name in ("train", "valid", "test"):
        split = corpus.split(name)
        path = SAMPLE_DIR / f"wiki.{name}.tokens"
        data = path.read_bytes()
        assert split.num_words == len(data.decode().split())
        assert split.num_bytes == len(data)
        assert split.num_tokens == len(split.tokens) and split.tokens.dtype == np.uint16
        assert split.num_line_ends == data.count(b"\n")  # the files end with a newline
        if name in README_WORDS:
            assert split.num_words == README_WORDS[name]
            assert split.num_word_level_tokens == WIKITEXT_TOKEN_COUNT[name]


PREVIOUS_SAMPLE_CACHE = {
    "tokenizer": ("tokenizers/de6f7104b2e49be743f6",
                  "9b179888fde778775a04f0eece89278abc23c963c0dc39d0d95305e9c24a8963"),
    "train": ("tokens/9b179888fde77877/train-8d4a00bc91005a91",
              "ad955022baa4f6d54bb9f1a960e17d6356b2c95761629100543d7b0f5792d7ea", 1_186_535, 538_708, 9_702, 2_867_095),
    "valid": ("tokens/9b179888fde77877/valid-9aee9f52d6e77de6",
              "f6564dd5d4705851c852e476bbaa1f2faca798daec3b951ff9b023d331712df5", 475_620, 213_886, 3_760, 1_142_309),
    "test": ("tokens/9b179888fde77877/test-56db52eb157b1ab5",
             "8c052e6cdd4990e54da0322fe08e61bc85ac57453a7d2d0f9a9ca587fedce583", 535_609, 241_211, 4_358, 1_281_077),
}
"""What the previous data layer (WikiText layouts only, before documents corpora) wrote for the sample of
``sample_corpus``: the tokenizer's cache folder and model hash; per split the token file's stem, its sha256, and the
sidecar's tokens, words, line ends and bytes."""
PREVIOUS_SAMPLE_PERPLEXITY = {"valid": (2_760_956.5291132927, 331.94293010954584, 323_042.01075399667,
                                        3.486988452915763)}
"""(NLL sum, token ppl, word ppl, bits per byte) that the previous data layer's eval_ppl path (tokenize_split +
evaluate_split, context 128) gave the sample's valid split under the add-one unigram model of its train tokens
(:class:`Unigram`); the test split gave (3_110_335.6427135468, 332.653416052878, 316_738.49427125545,
3.502729193672996), left out here to save time (its tokens are checked by the test above)."""


def test_sample_caches_are_those_of_the_previous_data_layer(sample_corpus):
    """The WikiText-103 sample gives byte for byte the caches of the previous data layer (the values of
    :data:`PREVIOUS_SAMPLE_CACHE`, which that code wrote on this sample): the same tokenizer under the same key,
    the same token files under the same names, the same sidecars but for ``origin`` (the sample's path)."""
    cfg, corpus = sample_corpus
    cache = Path(cfg.cache_dir)
    folder, model_hash = PREVIOUS_SAMPLE_CACHE["tokenizer"]
    assert corpus.tokenizer.hash == model_hash == file_sha(cache / folder / "tokenizer.model")
    for name in ("train", "valid", "test"):
        stem, sha, tokens, words, line_ends, num_bytes = PREVIOUS_SAMPLE_CACHE[name]
        split = corpus.split(name)
        assert split.path == cache / f"{stem}.bin" and file_sha(split.path) == sha
        side = json.loads(split.path.with_suffix(".json").read_text())
        del side["origin"]
        assert side == {"format": 1, "split": name, "tokenizer_hash": model_hash,
                        "source_fingerprint": file_sha(SAMPLE_DIR / f"wiki.{name}.tokens"), "dtype": "uint16",
                        "num_tokens": tokens, "num_words": words, "num_line_ends": line_ends, "num_bytes": num_bytes,
                        "tokens_sha256": sha}
        assert split.num_documents == 0 and isinstance(split.tokens, np.memmap)


class Unigram(torch.nn.Module):
    """Add-one unigram model of a token stream: the same logits at every position (a model that needs no
    training code, so the perplexities below depend on the data layer and the scorer alone)."""

    def __init__(self, tokens, vocab_size: int):
        super().__init__()
        counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
        logp = np.log((counts + 1) / (counts.sum() + vocab_size))
        self.register_buffer("logp", torch.tensor(logp, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logp.expand(*ids.shape, -1)


def test_sample_perplexities_are_those_of_the_previous_data_layer(sample_corpus):
    from lm.eval.perplexity import evaluate_split, tokenize_split

    cfg, corpus = sample_corpus
    model = Unigram(corpus.split("train").tokens, corpus.tokenizer.vocab_size)
    for name, (nll_sum, token_ppl, word_ppl, bpb) in PREVIOUS_SAMPLE_PERPLEXITY.items():
        split = tokenize_split(cfg, corpus.tokenizer, name)
        assert np.array_equal(split.tokens, corpus.split(name).tokens) and split.num_documents == 0
        (row,) = evaluate_split(model, split, [128], None, 64, corpus.tokenizer.bos_id, "cpu")
        assert row.num_word_level_tokens == WIKITEXT_TOKEN_COUNT[name]
        got = (row.nll_sum, row.token_perplexity, row.word_perplexity, row.bits_per_byte)
        assert got == pytest.approx((nll_sum, token_ppl, word_ppl, bpb), rel=1e-6)


@pytest.mark.parametrize("layout", ["wiki.{}.tokens", "wiki.{}.raw", "{}.txt"])
def test_line_ends_count_a_missing_final_newline_in_every_layout(tmp_path, layout):
    """words + line ends is the same with and without the trailing newline, whatever the file layout."""
    text = "\n = Title = \n\n a b @-@ c\n\nlast line here"
    counts = []
    for name, body in (("bare", text), ("newline", text + "\n")):
        d = tmp_path / name
        d.mkdir()
        for split in ("train", "valid", "test"):
            (d / layout.format(split)).write_text(body * (40 if split == "train" else 1), encoding="utf-8")
        valid = prepare_corpus(data_cfg(tmp_path / f"cache-{name}", f"data.path={d}"), splits=("valid",))
        split = valid.split("valid")
        counts.append((split.num_words, split.num_line_ends))
    # 5 lines of text (two blank, the first starts the file with a newline) + the last one without a newline
    assert counts[0] == counts[1] == (len(text.split()), 6)


def test_line_end_counter_over_pieces():
    counter = LineEnds()
    for piece in ["a\nb", "", " c\n", "\n", "d"]:
        counter.add(piece)
    assert counter.count == 4  # three newlines and the unterminated last line "d"
    assert LineEnds().count == 0


def test_sample_tokens_decode_to_the_exact_text(sample_corpus):
    _, corpus = sample_corpus
    valid = corpus.split("valid")
    text = (SAMPLE_DIR / "wiki.valid.tokens").read_bytes().decode()
    assert corpus.tokenizer.decode(valid.tokens) == text
    # the cache holds exactly what encoding the whole text at once gives
    assert np.array_equal(valid.tokens, corpus.tokenizer.encode_array(text, dtype=np.uint16))
    assert 1.0 < valid.num_tokens / valid.num_words < 3.0


def test_sample_second_call_reuses_everything(sample_corpus, tmp_path):
    cfg, first = sample_corpus
    before = {n: (s.path.stat().st_ino, s.path.stat().st_mtime_ns) for n, s in first.splits.items()}
    again = prepare_corpus(cfg, run_dir=tmp_path / "run")
    assert again.built == ()
    assert {n: (s.path.stat().st_ino, s.path.stat().st_mtime_ns) for n, s in again.splits.items()} == before
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").hash == first.tokenizer.hash


# ------------------------------------------------------------------ caches on a small local corpus
def test_reuse_and_invalidation(tmp_path):
    src = write_local(tmp_path / "src")
    cfg = data_cfg(tmp_path / "cache", f"data.path={src}")
    first = prepare_corpus(cfg)
    assert first.built == ("tokenizer", "train", "valid", "test")
    assert prepare_corpus(cfg).built == ()

    # tokenizer settings changed: new tokenizer, every split retokenized
    other = prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}", "data.tokenizer.vocab_size=320"))
    assert other.built == ("tokenizer", "train", "valid", "test")
    assert other.tokenizer.hash != first.tokenizer.hash
    assert prepare_corpus(cfg).built == ()  # the first one is still cached beside it

    # source changed: only what depends on it is rebuilt
    with open(src / "valid.txt", "a") as f:
        f.write("one more line\n")
    changed = prepare_corpus(cfg)
    assert changed.built == ("valid",)
    assert changed.tokenizer.decode(changed.split("valid").tokens) == (src / "valid.txt").read_text()
    (src / "train.txt").write_text((src / "train.txt").read_text() + "quux quuux quuuux\n" * 3000)
    retrained = prepare_corpus(cfg)
    assert retrained.built == ("tokenizer", "train", "valid", "test")
    assert retrained.tokenizer.hash != first.tokenizer.hash


def test_corrupt_or_stale_caches_are_rebuilt(tmp_path):
    cfg = data_cfg(tmp_path / "cache", f"data.path={write_local(tmp_path / 'src')}")
    corpus = prepare_corpus(cfg)
    good = corpus.split("valid").tokens.copy()
    bin_path = corpus.split("valid").path
    side = bin_path.with_suffix(".json")

    with open(bin_path, "r+b") as f:  # truncated token file
        f.truncate(10)
    assert prepare_corpus(cfg).built == ("valid",)
    with open(bin_path, "r+b") as f:  # same size, flipped bytes
        f.write(b"\xff\xff")
    assert prepare_corpus(cfg).built == ("valid",)
    side.write_text("{not json")  # corrupt sidecar
    assert prepare_corpus(cfg).built == ("valid",)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "tokenizer_hash": "0" * 64}))  # stale: another tokenizer
    again = prepare_corpus(cfg)
    assert again.built == ("valid",) and np.array_equal(again.split("valid").tokens, good)


def test_run_dir_refuses_a_different_tokenizer(tmp_path):
    src = write_local(tmp_path / "src")
    prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"), run_dir=tmp_path / "run")
    with pytest.raises(DataError, match="cannot change tokenizer"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}", "data.tokenizer.vocab_size=320"),
                       run_dir=tmp_path / "run")


def test_run_dir_tokenizer_is_reused_when_the_cache_is_gone(tmp_path):
    src = write_local(tmp_path / "src")
    first = prepare_corpus(data_cfg(tmp_path / "cache1", f"data.path={src}"), run_dir=tmp_path / "run")
    second = prepare_corpus(data_cfg(tmp_path / "cache2", f"data.path={src}"), run_dir=tmp_path / "run")
    assert "tokenizer" not in second.built and second.tokenizer.hash == first.tokenizer.hash


def test_parallel_tokenization_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(lm.data.source, "CHUNK_CHARS", 2048)  # many chunks, so the workers really share the work
    monkeypatch.setattr(lm.data.token_cache, "PARALLEL_MIN_BYTES", 0)  # and use them even for a small corpus
    src = write_local(tmp_path / "src", train_tokens=8000)
    serial = prepare_corpus(data_cfg(tmp_path / "c1", f"data.path={src}"))
    parallel = prepare_corpus(data_cfg(tmp_path / "c2", f"data.path={src}", "data.num_proc=2"))
    assert parallel.tokenizer.hash == serial.tokenizer.hash
    for name in ("train", "valid", "test"):
        a, b = serial.split(name), parallel.split(name)
        assert np.array_equal(a.tokens, b.tokens) and (a.num_words, a.num_bytes) == (b.num_words, b.num_bytes)
        assert serial.tokenizer.decode(a.tokens) == (src / f"{name}.txt").read_text()


def _prepare_in_child(cfg, queue) -> None:
    corpus = prepare_corpus(cfg)
    queue.put((corpus.built, {n: file_sha(s.path) for n, s in corpus.splits.items()}))


@pytest.mark.slow  # starts Python processes that import torch: ~10-20 s on 2 busy cores
def test_two_processes_preparing_at_once(tmp_path):
    cfg = data_cfg(tmp_path / "cache", f"data.path={write_local(tmp_path / 'src', train_tokens=20000)}")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(cfg, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    built = Counter(item for b, _ in results for item in b)
    assert built == Counter({"tokenizer": 1, "train": 1, "valid": 1, "test": 1})  # each built exactly once
    assert results[0][1] == results[1][1]  # and both see identical caches


_KILL_CHILD = """
import sys
from lm.config import load_config
from lm.data import prepare_corpus
prepare_corpus(load_config([], sys.argv[1:]).data)
"""


def test_interrupted_preparation_leaves_no_complete_looking_cache(tmp_path):
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", "data.progress=false",
                 "data.tokenizer.vocab_size=300", "data.source=synthetic", "data.synthetic.train_tokens=600000"]
    cfg = load_config([], overrides).data
    prepare_corpus(cfg, splits=("valid",))  # tokenizer ready, so the child goes straight to tokenizing train
    tokens_dir = next((tmp_path / "cache" / "tokens").iterdir())
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, *overrides])
    deadline = time.monotonic() + 120
    while not list(tokens_dir.glob(".train-*.tmp*")):
        assert child.poll() is None, "the child finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not list(tokens_dir.glob("train-*.json"))  # nothing claims to be complete

    corpus = prepare_corpus(cfg, splits=("train",))
    assert corpus.built == ("train",)
    assert not list(tokens_dir.glob(".*.tmp*"))  # the dead process's partial file is cleaned up
    text = split_text(cfg.synthetic, "train")
    assert np.array_equal(corpus.split("train").tokens, corpus.tokenizer.encode_array(text, dtype=np.uint16))


# ------------------------------------------------------------------ bad input
def test_bad_paths_and_files(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={tmp_path / 'nope'}"))
    src = write_local(tmp_path / "src")
    (src / "test.txt").unlink()
    with pytest.raises(DataError, match=r"no test split: expected one of wiki\.test\.tokens"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"))
    (src / "test.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"))
    (src / "test.txt").write_bytes(b"bad \xff\xfe utf-8\n")
    with pytest.raises(DataError, match="not UTF-8"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"))
    (src / "test.txt").write_bytes(b"windows\r\nline endings\r\n")
    with pytest.raises(DataError, match="line endings"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"))
    (src / "train.txt").write_bytes(b"a train file\r\n" * 10)  # also caught while training the tokenizer
    with pytest.raises(DataError, match=r"^\S*train.txt: the text loaded through `datasets` differs"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"))
    with pytest.raises(DataError, match="unknown split"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"), splits=("dev",))


def test_unreadable_file(tmp_path):
    src = write_local(tmp_path / "src")
    (src / "valid.txt").unlink()
    (src / "valid.txt").mkdir()  # unreadable as a file even for root (chmod 000 is not)
    with pytest.raises(DataError, match="cannot read .*valid.txt"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}"))


def test_cache_dir_must_be_usable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="data.cache_dir"):
        prepare_corpus(data_cfg(tmp_path / "file" / "cache", "data.source=synthetic"))


def test_vocab_too_large_names_the_key(tmp_path):
    src = write_local(tmp_path / "src", train_tokens=200)
    with pytest.raises(DataError, match=r"data\.tokenizer\.vocab_size=20000.*lower"):
        prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={src}", "data.tokenizer.vocab_size=20000"))


def test_unreachable_hub_fails_fast_with_a_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    cfg = data_cfg(tmp_path / "cache", "data.source=hf", "data.hf_name=lm-tests/no-such-dataset")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"data\.path=DIR.*data\.source=synthetic"):
        prepare_corpus(cfg)
    assert time.monotonic() - start < 15


def test_hub_offline_switches_datasets_to_its_cache_and_back(monkeypatch):
    import datasets.config
    import huggingface_hub.constants as hub_constants

    def flags():
        return datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE

    before = flags()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: unreachable
    for env in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(env, raising=False)
    with lm.data.hub.hub_offline() as offline:
        assert offline and flags() == (True, True)
    assert flags() == (False, False)
    with lm.data.hub.hub_offline(offline=False) as offline:
        assert not offline and flags() == (False, False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert lm.data.hub.offline_by_environment()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert not lm.data.hub.offline_by_environment()
    monkeypatch.undo()
    assert flags() == before


def test_hub_rows_are_joined_into_the_original_lines(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"train": [" = Title = \n", "", " some text here \n"], "validation": [" v \n", ""], "test": ["t\n"]}
    dd = DatasetDict({k: Dataset.from_dict({"text": v}) for k, v in rows.items()})
    cfg = data_cfg(tmp_path / "cache", "data.source=hf")
    valid = lm.data.hub.hub_source(dd, cfg, "valid")
    assert "".join(valid.chunks()) == " v \n\n" and valid.num_bytes == 5
    assert valid.fingerprint == hashlib.sha256(b" v \n\n").hexdigest()
    assert "".join(lm.data.hub.hub_source(dd, cfg, "train").chunks()) == " = Title = \n\n some text here \n"


def test_unprepared_split_is_an_error(tmp_path):
    corpus = prepare_corpus(data_cfg(tmp_path / "cache", f"data.path={write_local(tmp_path / 'src')}"),
                            splits=("valid",))
    assert set(corpus.splits) == {"valid"}
    with pytest.raises(DataError, match="was not prepared"):
        corpus.split("test")


# ------------------------------------------------------------------ batches
def test_global_batch_is_a_pure_function_of_its_arguments():
    tokens = np.arange(10_000, dtype=np.uint32)
    late = global_batch(tokens, 16, 8, step=37, seed=3)
    first = global_batch(tokens, 16, 8, step=0, seed=3)
    assert torch.equal(global_batch(tokens, 16, 8, step=37, seed=3), late)
    assert torch.equal(global_batch(tokens, 16, 8, step=0, seed=3), first)
    assert not torch.equal(global_batch(tokens, 16, 8, step=0, seed=4), first)
    assert late.dtype == torch.int64 and late.shape == (8, 17)


def test_batch_order_depends_on_nothing_but_seed_and_step():
    """No cache and no global RNG state decides a batch: recompute with every cache cleared and the numpy, torch
    and Python RNGs disturbed in between (a resumed run sees neither the cache nor the RNG state of the first)."""
    import random

    from lm.data import batches

    tokens = np.arange(5_000, dtype=np.uint32)
    steps = [0, 3, 40, 41]  # 40 and 41 are in later epochs (the split holds 312 windows of 16)

    def batches_now(disturb: int) -> list[torch.Tensor]:
        out = []
        for step in steps:
            batches._epoch_order.cache_clear()
            np.random.seed(disturb + step)
            torch.manual_seed(disturb + step)
            random.seed(disturb + step)
            np.random.rand(disturb % 7 + 1)
            out.append(global_batch(tokens, 16, 8, step=step, seed=11))
        return out

    first, second = batches_now(1), batches_now(12345)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[2], first[3])


def test_global_batch_epochs_cover_each_window_once():
    n, seq_len, batch = 1000, 10, 7
    tokens = np.arange(n, dtype=np.uint16)  # token value == position, so rows reveal their start
    num_windows, max_offset = window_layout(n, seq_len)
    assert (num_windows, max_offset) == (99, 9)
    steps = -(-3 * num_windows // batch)
    rows = torch.cat([global_batch(tokens, seq_len, batch, s, seed=0) for s in range(steps)])
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(len(rows), seq_len, dtype=torch.int64))
    starts = rows[:, 0].numpy()
    offsets = []
    for e in range(3):
        epoch = starts[e * num_windows:(e + 1) * num_windows]
        offsets.append(int(epoch.min()))
        assert sorted(epoch - epoch.min()) == list(range(0, num_windows * seq_len, seq_len))
        assert epoch.max() + seq_len < n
    assert len(set(offsets)) > 1  # window boundaries move between epochs
    assert not np.array_equal(starts[:num_windows] - offsets[0], starts[num_windows:2 * num_windows] - offsets[1])


def test_global_batch_errors():
    with pytest.raises(DataError, match="data.seq_len"):
        global_batch(np.arange(10), seq_len=10, batch_size=2, step=0, seed=0)
    with pytest.raises(DataError, match="step"):
        global_batch(np.arange(100), seq_len=10, batch_size=2, step=-1, seed=0)


def test_shard_is_disjoint_and_covers_the_batch():
    batch = torch.arange(24 * 5).reshape(24, 5)
    world, micro = 3, 2
    seen = []
    for rank in range(world):
        parts = shard(batch, rank, world, micro)
        assert len(parts) == 4 and all(p.shape == (micro, 5) for p in parts)
        seen.extend(int(r) for p in parts for r in p[:, 0])
    assert sorted(seen) == batch[:, 0].tolist()


def test_shard_errors():
    batch = torch.zeros(10, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="batch_size=10 must be a multiple of micro_batch_size x ranks = 2 x 3"):
        shard(batch, 0, 3, 2)
    with pytest.raises(DataError, match="rank=3"):
        shard(batch, 3, 3, 1)


# ------------------------------------------------------------------ command line
@pytest.mark.slow  # starts Python processes that import torch: ~10-20 s on 2 busy cores
def test_prepare_data_command(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "prepare_data.py"
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: synthetic\n  cache_dir: {tmp_path / 'cache'}\n  progress: false\n")
    run = [sys.executable, str(tool), str(config), "data.synthetic.train_tokens=3000",
           "data.tokenizer.vocab_size=300"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "built: tokenizer, train, valid, test" in out.stdout and "tokens/word" in out.stdout
    bad = subprocess.run(run[:3] + ["data.tokenizer.vocab_size=9000"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "lower data.tokenizer.vocab_size" in bad.stderr
