"""Text corpus -> SentencePiece tokenizer -> memory-mapped token caches -> training batches.

One file a job:

    source.py           SplitSource (a text of lines, located and fingerprinted), DataError, text-chunk helpers
    local.py            WikiText files under data.path            \\
    hub.py              the Hugging Face hub (data.source=hf)       > texts of lines
    synthetic.py        the built-in synthetic corpus             /
    documents.py        DocumentSource (documents from shards), the carve-out of a missing valid/test split
    files.py            data.files globs: JSONL / Parquet / text  \\ documents
    hub_documents.py    a hub (or save_to_disk) dataset by column /
    fingerprint.py      sha256 of large files, remembered by size and modification time
    tokenizer_cache.py  train the corpus's tokenizer once, cache it, install it in the run directory
    token_cache.py      TokenSplit; one memory-mapped token file per split of lines, with a JSON sidecar
    packing.py          documents -> token ids with an EOS after each (also in worker processes)
    document_cache.py   a documents split as a folder of token files (parallel, streaming, resumable)
    sharded_tokens.py   several token files indexed as one stream
    corpus.py           prepare_corpus: sources + tokenizer + token caches
    batches.py          global_batch / shard: the batches of an optimizer step (what the training loop uses);
                        document_starts: each token's document start from the EOS tokens (data.document_mask)

Cache layout under ``data.cache_dir`` (shared by runs; every name carries the fingerprints it depends on)::

    tokenizers/<key>/tokenizer.{model,json}     key = sha256(train-text fingerprint, tokenizer settings)
    tokens/<tokenizer hash>/<split>-<source fingerprint>.{bin,json}   token ids and their sidecar (lines)
    tokens/<tokenizer hash>/<split>-<source fingerprint>/part-*.{bin,json}   token files of a documents split
    fingerprints/*.json                          remembered file hashes (safe to delete)
    locks/*.lock                                 fcntl locks: one process builds, the others wait and reuse
    datasets/                                    `datasets`' Arrow copy of local text files (safe to delete)

The SentencePiece wrapper itself is :mod:`lm.tokenizer` (checkpoints and tools load it without this package).
Names are imported on first use, so a tokenizer worker process that imports :mod:`lm.data.packing` loads neither
torch nor the config tree.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "lm.data.source", "SPLITS": "lm.data.source", "SplitSource": "lm.data.source",
    "LineEnds": "lm.data.source", "DocumentSource": "lm.data.documents", "TokenSplit": "lm.data.token_cache",
    "ShardedTokens": "lm.data.sharded_tokens", "Corpus": "lm.data.corpus", "prepare_corpus": "lm.data.corpus",
    "resolve_sources": "lm.data.corpus", "cached_document_split": "lm.data.document_cache",
    "pack": "lm.data.packing", "window_layout": "lm.data.batches", "global_batch": "lm.data.batches",
    "shard": "lm.data.batches", "document_starts": "lm.data.batches",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
