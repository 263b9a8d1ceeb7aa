import re

import pytest

from lm.config import ConfigError, SyntheticConfig, load_config
from lm.data.synthetic import make_keys, split_text

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


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.synthetic\.num_pairs"):
        load_config([], ["data.synthetic.num_pairs=100", "data.synthetic.num_keys=10"])
    with pytest.raises(ConfigError, match=r"data\.synthetic\.num_values"):
        load_config([], ["data.synthetic.num_values=0"])
    with pytest.raises(ValueError, match="unknown split"):
        split_text(SyntheticConfig(), "dev")
