"""Text corpus -> SentencePiece tokenizer -> memory-mapped token caches -> training batches.

One file a job:

    source.py           SplitSource (a split located and fingerprinted), DataError, text-chunk helpers
    local.py            local files under data.path        \\
    hub.py              the Hugging Face hub (data.source=hf) > the three sources
    synthetic.py        the built-in synthetic corpus       /
    tokenizer_cache.py  train the corpus's tokenizer once, cache it, install it in the run directory
    token_cache.py      one memory-mapped token cache per split, with a JSON sidecar
    corpus.py           prepare_corpus: sources + tokenizer + token caches
    batches.py          global_batch / shard: the batches of an optimizer step (what the training loop uses)

Cache layout under ``data.cache_dir`` (shared by runs; every name carries the fingerprints it depends on)::

    tokenizers/<key>/tokenizer.{model,json}     key = sha256(train-text fingerprint, tokenizer settings)
    tokens/<tokenizer hash>/<split>-<source fingerprint>.{bin,json}   token ids and their sidecar
    locks/*.lock                                 fcntl locks: one process builds, the others wait and reuse
    datasets/                                    `datasets`' Arrow copy of local text files (safe to delete)

The SentencePiece wrapper itself is :mod:`lm.tokenizer` (checkpoints and tools load it without this package).
"""
from lm.data.batches import global_batch, shard, window_layout
from lm.data.corpus import Corpus, prepare_corpus, resolve_sources
from lm.data.source import SPLITS, DataError, LineEnds, SplitSource
from lm.data.token_cache import TokenSplit

__all__ = ["DataError", "SPLITS", "SplitSource", "LineEnds", "resolve_sources", "TokenSplit", "Corpus", "prepare_corpus",
           "window_layout", "global_batch", "shard"]
