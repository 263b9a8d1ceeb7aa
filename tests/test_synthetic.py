import re
from pathlib import Path

import pytest

from lm.config import ConfigError, SyntheticConfig, load_config
from lm.data.synthetic import make_keys, split_text

RECALL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "recall.yaml"

RECORD = re.compile(r"= record =\nfacts : (.*)\n(.*)\nquestions : (.*)\n\n")


def test_deterministic_from_seed():
    cfg = SyntheticConfig(train_tokens=3000)
    assert split_text(cfg, "train") == split_text(SyntheticConfig(train_tokens=3000), "train")
    assert split_text(cfg, "train") != split_text(SyntheticConfig(train_tokens=3000, seed=7), "train")
    assert len({split_text(cfg, s) for s in ("train", "valid", "test")}) == 3


def test_sizes_and_keys():
    cfg = SyntheticConfig(train_tokens=20_000, num_keys=40)
    assert 20_000 <= len(split_text(cfg, "train").split()) < 20_000 + 400
    assert 2_000 <= len(split_text(cfg, "valid").split()) < 2_000 + 400
    keys = make_keys(40, 1)
    assert len(set(keys)) == 40 and all(k.isalpha() for k in keys)


def test_every_query_is_answered_by_the_listing_far_back():
    cfg = SyntheticConfig(train_tokens=5000, num_pairs=6, filler_sentences=5)
    text = split_text(cfg, "valid")
    records = RECORD.findall(text)
    assert records and "".join(f"= record =\nfacts : {a}\n{b}\nquestions : {c}\n\n" for a, b, c in records) == text
    for listing, filler, queries in records:
        bound = dict(re.findall(r"(\w+) is (\d+) \.", listing))
        asked = re.findall(r"what is (\w+) \? (\d+) \.", queries)
        assert len(bound) == 6 and sorted(k for k, _ in asked) == sorted(bound)
        assert all(bound[k] == v for k, v in asked)
        assert filler.count(" . ") + filler.endswith(" .") == 5  # the recall distance


def test_pairs_style_with_a_random_filler():
    cfg = SyntheticConfig(train_tokens=20_000, num_pairs=3, filler_sentences=4, random_filler=True, style="pairs")
    text = split_text(cfg, "valid")
    records = re.findall(r"= record =\nfacts : (.*)\n((?:.*\n)?)questions : (.*)\n\n", text)
    assert "".join(f"= record =\nfacts : {a}\n{b}questions : {c}\n\n" for a, b, c in records) == text
    counts = []
    for listing, filler, queries in records:
        bound = re.findall(r"(\w+) (\d+) \.", listing)
        assert listing == " ".join(f"{k} {v} ." for k, v in bound) and len(dict(bound)) == 3
        asked = re.findall(r"(\w+) (\d+) \.", queries)
        assert queries == " ".join(f"{k} {v} ." for k, v in asked) and sorted(asked) == sorted(bound)
        assert not re.search(r"\d", filler)
        counts.append(filler.count(" ."))  # one line, or none for zero sentences
    assert set(counts) == {0, 1, 2, 3, 4}  # every count 0 .. filler_sentences occurs
    assert split_text(SyntheticConfig(train_tokens=3000), "valid") == split_text(
        SyntheticConfig(train_tokens=3000, style="sentences", random_filler=False), "valid")


def test_the_recall_config_is_one_fact_per_record_at_a_random_distance():
    cfg = load_config([RECALL_CONFIG])
    s = cfg.data.synthetic
    assert (s.style, s.num_pairs, s.filler_sentences, s.random_filler) == ("pairs", 1, 14, True)
    assert cfg.model.attention.kind == "kernelized_rpe" and cfg.data.seq_len == 128
    # the records its docs describe, on a small train split of the same settings
    text = split_text(SyntheticConfig(**{**vars(s), "train_tokens": 30_000}), "valid")
    records = re.findall(r"= record =\nfacts : (\w+) (\d+) \.\n((?:.*\n)?)questions : (\w+) (\d+) \.\n\n", text)
    assert "".join(f"= record =\nfacts : {k} {v} .\n{f}questions : {q} {a} .\n\n" for k, v, f, q, a in records) == text
    assert len(records) > 20 and all(k == q and v == a for k, v, _, q, a in records)
    assert {f.count(" .") for _, _, f, _, _ in records} <= set(range(15))


def test_the_recall_config_tokenizer_gives_every_key_and_value_one_token(tmp_path):
    from lm.data.synthetic import synthetic_source
    from lm.data.tokenizer_cache import prepare_tokenizer
    cfg = load_config([RECALL_CONFIG], [f"data.cache_dir={tmp_path}"])
    s = cfg.data.synthetic
    tok, _ = prepare_tokenizer(cfg.data, synthetic_source(cfg.data, "train"), None)  # about a second
    pieces = [tok.encode(f" {w}") for w in [*make_keys(s.num_keys, s.seed), *map(str, range(s.num_values))]]
    assert all(len(p) == 1 for p in pieces) and len({p[0] for p in pieces}) == s.num_keys + s.num_values


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.synthetic\.num_pairs"):
        load_config([], ["data.synthetic.num_pairs=100", "data.synthetic.num_keys=10"])
    with pytest.raises(ConfigError, match=r"data\.synthetic\.num_values"):
        load_config([], ["data.synthetic.num_values=0"])
    with pytest.raises(ConfigError, match=r"data\.synthetic\.style"):
        load_config([], ["data.synthetic.style=pair"])
    with pytest.raises(ValueError, match="unknown split"):
        split_text(SyntheticConfig(), "dev")
