"""The corpus of a config: its text sources, its tokenizer and a token cache per split, prepared on first use
and reused after (:func:`prepare_corpus`).

Two kinds of source: a text of lines (:class:`SplitSource`: WikiText's files, a hub dataset of lines, the
synthetic corpus), tokenized into one token file per split as it always was; and documents
(:class:`DocumentSource`: data.files globs, a hub dataset of documents), an EOS after each, into a folder of
token files per split (:mod:`lm.data.document_cache`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lm.config import DataConfig
from lm.data.document_cache import prepare_document_split
from lm.data.documents import DocumentSource
from lm.data.files import file_sources
from lm.data.hub import hub_rows, hub_source, load_dataset_dict
from lm.data.hub_documents import hub_document_sources
from lm.data.local import local_source
from lm.data.source import SPLITS, DataError, SplitSource
from lm.data.synthetic import synthetic_source
from lm.data.token_cache import TokenSplit, prepare_split
from lm.data.tokenizer_cache import install_in_run_dir, prepare_tokenizer
from lm.errors import disk_errors
from lm.tokenizer import Tokenizer


def resolve_sources(cfg: DataConfig, splits: Sequence[str]) -> dict[str, SplitSource | DocumentSource]:
    """Locate and fingerprint ``splits`` (train is always included: the tokenizer is trained on it)."""
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DataError(f"unknown split(s) {bad}; expected some of {list(SPLITS)}")
    names = ["train"] + [s for s in splits if s != "train"]
    if cfg.source == "local":
        directory = Path(cfg.path).expanduser()
        if not directory.is_dir():
            raise DataError(f"data.path={cfg.path!r} is not a directory")
        return {s: local_source(directory, s, Path(cfg.cache_dir) / "datasets") for s in names}
    if cfg.source == "synthetic":
        return {s: synthetic_source(cfg, s) for s in names}
    if cfg.source == "files":
        return file_sources(cfg, names)
    dataset_dict = load_dataset_dict(cfg)
    if hub_rows(cfg) == "documents":
        return hub_document_sources(dataset_dict, cfg, names)
    return {s: hub_source(dataset_dict, cfg, s) for s in names}


@dataclass
class Corpus:
    tokenizer: Tokenizer
    splits: dict[str, TokenSplit]
    built: tuple[str, ...] = ()
    """What this call built rather than reused ("tokenizer" and/or split names)."""

    def split(self, name: str) -> TokenSplit:
        if name not in self.splits:
            raise DataError(f"split {name!r} was not prepared (have {sorted(self.splits)}); pass it in "
                            f"prepare_corpus(..., splits=...)")
        return self.splits[name]


def prepare_corpus(cfg: DataConfig, run_dir: str | Path | None = None,
                   splits: Sequence[str] = SPLITS) -> Corpus:
    """Tokenizer and token caches for ``splits`` of ``cfg``'s corpus, built on first use and reused after.

    Idempotent and safe when several processes (ranks) call it at once: one builds, the others wait on a file
    lock and then reuse. With ``run_dir`` the tokenizer is also saved to ``run_dir/tokenizer/`` (and an
    existing one there must be the same tokenizer).
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    cache = Path(cfg.cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data.cache_dir={cfg.cache_dir!r} ({e.strerror})") from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise DataError(f"data.cache_dir={cfg.cache_dir!r} is not writable: point it at a writable directory")
    with disk_errors(cache, "free space there (or point data.cache_dir at another disk) and run again: what was "
                            "complete is kept, and a half-built cache is never used"):
        sources = resolve_sources(cfg, splits)
        lines = [s for s in sources.values() if not isinstance(s, DocumentSource)]
        if cfg.document_mask and lines:
            raise DataError(f"data.document_mask=true needs a corpus of documents, each ended by an EOS (data.files, "
                            f"or a hub dataset read as documents); the {lines[0].origin} is one running text without "
                            f"document ends: set data.document_mask=false")
        tok, tok_built = prepare_tokenizer(cfg, sources["train"], run_dir)
        if run_dir is not None:
            install_in_run_dir(tok, run_dir)
        prepared: dict[str, TokenSplit] = {}
        built = ["tokenizer"] if tok_built else []
        for name in splits:
            src = sources[name]
            prepare = prepare_document_split if isinstance(src, DocumentSource) else prepare_split
            prepared[name], split_built = prepare(cfg, tok, src)
            if split_built:
                built.append(name)
    return Corpus(tok, prepared, tuple(built))
