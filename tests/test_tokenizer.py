import random

import numpy as np
import pytest

from lm.config import SyntheticConfig
from lm.data.synthetic import split_text
from lm.tokenizer import Tokenizer, TokenizerError

TRICKY = [
    "", "\n", "\n\n\n", "a", " ", "   ", "a  b   c  ", "  leading and trailing  ", "tab\tand\r\nCRLF\rCR",
    "line one\nline two\n", "\n leading newline", "é漢字 🙂 Ωμέγα\u00a0nbsp\u200bzwsp", "literal \u2581 mark\u2581\u2581",
    "<unk> <s> </s> <pad> <0x41>", " = Title = \n @-@ @,@ @.@ ", "\x00\x01\x7f control", "ﬁ ligature ① Ⅻ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = split_text(SyntheticConfig(train_tokens=5000), "train")
    lines = [line for line in text.split("\n") if line.strip()]
    return Tokenizer.train(iter(lines), vocab_size=300)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    alphabet = [chr(c) for c in list(range(0x20, 0x7f)) * 4 + list(range(0xa0, 0x3000, 7)) + [0x1f600, 0x2581]]
    alphabet += [" ", " ", "\n", "\t", "\r"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        assert tok.decode(tok.encode(text)) == text


def test_newline_splitting_is_chunk_invariant(tok):
    a, b = "facts : kelo is 37 .", "  what is kelo ? 37"
    assert tok.encode(a + "\n" + b) == tok.encode(a) + [tok.newline_id] + tok.encode(b)
    arr = tok.encode_array(a + "\n" + b, dtype=np.uint16)
    assert arr.dtype == np.uint16 and arr.tolist() == tok.encode(a + "\n" + b)


def test_special_ids(tok):
    assert len({tok.bos_id, tok.eos_id, tok.newline_id}) == 3
    assert tok.vocab_size == 300
    assert tok.decode([tok.bos_id] + tok.encode("hi there") + [tok.eos_id]) == "hi there"


def test_save_load_and_hash(tok, tmp_path):
    d = tok.save(tmp_path / "t")
    back = Tokenizer.load(d)
    assert back.hash == tok.hash and len(tok.hash) == 64
    assert Tokenizer.load(d / "tokenizer.model").hash == tok.hash
    assert back.encode("the red fox\nsees") == tok.encode("the red fox\nsees")


def test_load_errors(tok, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    d = tok.save(tmp_path / "t")
    (d / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        Tokenizer.load(d)
    d2 = tok.save(tmp_path / "t2")
    (d2 / "tokenizer.json").write_text('{"hash": "0000"}')
    with pytest.raises(TokenizerError, match="does not match the hash"):
        Tokenizer.load(d2)


def test_a_vocab_too_large_or_too_small_names_the_key_and_the_way_to_change_it():
    with pytest.raises(TokenizerError, match=r"data\.tokenizer\.vocab_size=5000.*lower"):
        Tokenizer.train(iter(["a tiny corpus", "of two lines"]), vocab_size=5000)
    many_characters = ["".join(chr(0x4E00 + i + j) for j in range(5)) for i in range(0, 600, 5)]
    with pytest.raises(TokenizerError, match=r"vocab_size=300 is smaller than the characters .* raise "
                                             r"data\.tokenizer\.vocab_size"):
        Tokenizer.train(iter(many_characters * 3), vocab_size=300)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_real_wikitext_round_trip(model_type, sample_dir):
    train = (sample_dir / "wiki.train.tokens").read_text(encoding="utf-8")[:400_000]
    valid = (sample_dir / "wiki.valid.tokens").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer.train(iter(line for line in train.split("\n") if line.strip()), vocab_size=800,
                          model_type=model_type)
    ids = tok.encode(valid)
    assert tok.decode(ids) == valid
    assert tok.unk_id not in ids  # byte fallback: nothing is ever unknown
    # a real subword vocabulary: clearly fewer tokens than characters
    assert len(ids) < 0.6 * len(valid)


def test_ranks_installing_the_tokenizer_together_never_see_it_half_written(tok, tmp_path, monkeypatch):
    """Every rank of a run installs the tokenizer into the run directory when it starts. A second rank that saves
    its tokenizer while the first is between finding none and looking at the folder must not make the first refuse
    the second's files as foreign: the ranks take turns."""
    import os
    import threading

    from lm.data.tokenizer_cache import install_in_run_dir

    errors, other_done, real_listdir = [], threading.Event(), os.listdir

    def install(done=None):
        try:
            install_in_run_dir(tok, tmp_path / "run")
        except Exception as e:  # noqa: BLE001 - what a rank would print
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            if done is not None:
                done.set()

    def listdir(path):
        if not other_done.is_set() and threading.current_thread() is threading.main_thread():
            threading.Thread(target=install, args=(other_done,)).start()  # the other rank, now
            other_done.wait(timeout=1.0)  # (while this rank holds the install lock, it waits its turn)
        return real_listdir(path)

    (tmp_path / "run" / "tokenizer").mkdir(parents=True)  # as the other rank's save begins
    monkeypatch.setattr(os, "listdir", listdir)
    install()
    assert other_done.wait(timeout=30)
    assert errors == []
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").hash == tok.hash
