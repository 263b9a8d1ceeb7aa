"""A built-in corpus that needs no download: associative recall over long context, as plain text.

Each record lists ``num_pairs`` key-value bindings, then ``filler_sentences`` sentences of a tiny grammar (local
structure a small model learns in seconds), then queries every bound key in a new random order::

    = record =
    facts : kelo is 37 . vadu is 12 . ...
    the red fox sees a small bird . ...
    questions : what is vadu ? 12 . what is kelo ? 37 . ...

The value after ``?`` can only be predicted by looking back past the filler to the listing, ``~4 * num_pairs +
6 * filler_sentences`` tokens earlier, so loss on those tokens measures long-context recall (a small model
needs far more than a minute for that part; the grammar is what it learns at once). Keys are random
pseudo-words, values numbers below ``num_values``; the text is a pure function of the config
(``random.Random`` with integer seeds gives the same stream on every platform and Python version).

``style: pairs`` writes a fact ``kelo 37 .`` and asks it as ``kelo 37 .``, so the value follows its key in both
places; ``random_filler`` gives each record 0 to ``filler_sentences`` filler sentences (the filler line is left
out when it has none)::

    = record =
    facts : kelo 37 .
    the red fox sees a small bird . the lamp passes a old cat .
    questions : kelo 37 .
"""
from __future__ import annotations

import hashlib
import random

from lm.config import DataConfig, SyntheticConfig
from lm.data.source import SPLITS, SplitSource, text_chunks

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_ADJECTIVES = ["red", "small", "old", "quiet", "bright", "tall", "green", "slow"]
_NOUNS = ["fox", "bird", "river", "stone", "house", "tree", "cat", "road", "ship", "lamp"]
_VERBS = ["sees", "finds", "follows", "likes", "passes", "guards"]


STYLES = {"sentences": ("{key} is {value} .", "what is {key} ?"), "pairs": ("{key} {value} .", "{key}")}
"""``data.synthetic.style`` -> (a fact of the listing, a question), format strings; the answer `` {value} .``
follows the question."""


def make_keys(num_keys: int, seed: int) -> list[str]:
    """``num_keys`` distinct pseudo-words (two or three consonant-vowel syllables), fixed by ``seed``."""
    rng = random.Random(seed)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    keys: list[str] = []
    seen: set[str] = set()
    length = 2 if num_keys <= len(syllables) ** 2 // 4 else 3
    while len(keys) < num_keys:
        w = "".join(rng.choice(syllables) for _ in range(length))
        if w not in seen:
            seen.add(w)
            keys.append(w)
    return keys


def filler_sentence(rng: random.Random) -> str:
    """One sentence of the filler grammar, e.g. ``"the red fox sees a small bird ."`` (no numbers, no keys)."""
    subj = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}" if rng.random() < 0.5 else f"the {rng.choice(_NOUNS)}"
    return f"{subj} {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} ."


def _record(rng: random.Random, keys: list[str], cfg: SyntheticConfig) -> str:
    bound = rng.sample(keys, cfg.num_pairs)
    values = {k: str(rng.randrange(cfg.num_values)) for k in bound}
    fact, query = STYLES[cfg.style]
    listing = " ".join(fact.format(key=k, value=values[k]) for k in bound)
    count = rng.randint(0, cfg.filler_sentences) if cfg.random_filler else cfg.filler_sentences
    filler = "".join(filler_sentence(rng) + "\n" if i == count - 1 else filler_sentence(rng) + " "
                     for i in range(count))
    rng.shuffle(bound)
    # every key follows a space, so it is the same token(s) in the listing and in the queries
    queries = " ".join(f"{query.format(key=k)} {values[k]} ." for k in bound)
    return f"= record =\nfacts : {listing}\n{filler}questions : {queries}\n\n"


def split_text(cfg: SyntheticConfig, split: str) -> str:
    """The text of ``split`` (train: about ``cfg.train_tokens`` whitespace words; valid and test: a tenth)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    keys = make_keys(cfg.num_keys, cfg.seed)
    rng = random.Random(cfg.seed * 1_000_003 + 1 + SPLITS.index(split))
    target = cfg.train_tokens if split == "train" else max(1, cfg.train_tokens // 10)
    parts: list[str] = []
    words = 0
    while words < target:
        rec = _record(rng, keys, cfg)
        parts.append(rec)
        words += len(rec.split())
    return "".join(parts)


def synthetic_source(cfg: DataConfig, split: str) -> SplitSource:
    """Split ``split`` of the synthetic corpus of ``cfg.synthetic`` (generated in memory)."""
    text = split_text(cfg.synthetic, split)
    data = text.encode()
    return SplitSource(split, hashlib.sha256(data).hexdigest(), len(data), f"synthetic {split} split",
                       lambda: text_chunks(text))
