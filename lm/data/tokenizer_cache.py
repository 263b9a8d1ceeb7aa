"""The tokenizer of a corpus: trained once on the train split, cached under ``data.cache_dir`` keyed by the train
text's fingerprint and the tokenizer settings, reused by every later run, and copied into each run directory.

    <cache_dir>/tokenizers/<key>/tokenizer.{model,json}    key = sha256(train fingerprint, settings, format)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

from lm.config import DataConfig
from lm.data.documents import DocumentSource, spread_order
from lm.data.source import DataError, SplitSource
from lm.data.token_cache import CACHE_FORMAT
from lm.fileio import exclusive_lock, fsync_dir
from lm.tokenizer import MODEL_FILE, Tokenizer, TokenizerError

log = logging.getLogger(__name__)


def _sampled_lines(chunks: Iterable[str], num_bytes: int, max_bytes: int, max_line_bytes: int) -> Iterator[str]:
    """Non-blank lines of a text of about ``num_bytes`` bytes read in ``chunks``, an evenly spread sample of about
    ``max_bytes`` bytes, none longer than ``max_line_bytes`` (longer lines are cut, which SentencePiece would
    otherwise skip)."""
    keep = min(1.0, max_bytes / num_bytes)
    credit = 0.0
    piece = max(1, max_line_bytes // 4)  # characters; a character is at most 4 UTF-8 bytes
    for chunk in chunks:
        for line in chunk.split("\n"):
            if not line.strip():
                continue
            credit += keep * len(line)
            if credit < len(line):
                continue
            credit -= len(line)
            if len(line) * 4 <= max_line_bytes or len(line.encode()) <= max_line_bytes:
                yield line
            else:
                yield from (line[i:i + piece] for i in range(0, len(line), piece))


def _training_lines(src: SplitSource, max_bytes: int, max_line_bytes: int) -> Iterator[str]:
    """The tokenizer's sample of a text of lines: :func:`_sampled_lines` of the whole split."""
    return _sampled_lines(src.chunks(), src.num_bytes, max_bytes, max_line_bytes)


def _document_training_lines(src: DocumentSource, max_bytes: int, max_line_bytes: int) -> Iterator[str]:
    """The tokenizer's sample of the train documents: :func:`_sampled_lines` with the shards visited in
    :func:`~lm.data.documents.spread_order`, stopping at ``max_bytes`` (the sampled share comes from the shards'
    sizes on disk, an underestimate of the text of compressed files, so the sample may fill up early; the order
    keeps it spread over the corpus)."""
    texts = (text for text, _ in src.segments(spread_order(len(src.shards))))
    taken = 0
    for line in _sampled_lines(texts, max(1, src.disk_bytes), max_bytes, max_line_bytes):
        yield line
        taken += len(line)
        if taken >= max_bytes:
            return


def tokenizer_key(cfg: DataConfig, train: SplitSource | DocumentSource) -> str:
    """The cache key of the tokenizer ``cfg`` trains on ``train``."""
    settings = {"format": CACHE_FORMAT, "train_fingerprint": train.fingerprint, **asdict(cfg.tokenizer)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _try_load(path: Path, key: str) -> Tokenizer | None:
    if not (path / MODEL_FILE).is_file():
        return None
    try:
        tok = Tokenizer.load(path)
    except (TokenizerError, ValueError, OSError) as e:
        log.warning("ignoring tokenizer at %s: %s", path, e)
        return None
    return tok if tok.meta.get("key") == key else None


def prepare_tokenizer(cfg: DataConfig, train: SplitSource | DocumentSource, run_dir: Path | None
                      ) -> tuple[Tokenizer, bool]:
    """The tokenizer for ``cfg`` and the train text: from the cache, else from ``run_dir``, else trained.
    Returns it and whether it was trained by this call."""
    cache = Path(cfg.cache_dir)
    key = tokenizer_key(cfg, train)
    final = cache / "tokenizers" / key
    built = False
    with exclusive_lock(cache / "locks" / f"tokenizer-{key}.lock"):
        tok = _try_load(final, key)
        if tok is None and run_dir is not None:
            tok = _try_load(run_dir / "tokenizer", key)  # e.g. resuming a run on a machine with a fresh cache
        if tok is None:
            t = cfg.tokenizer
            log.info("training a %d-piece %s tokenizer on %s", t.vocab_size, t.model_type, train.origin)
            start = time.perf_counter()
            try:
                sample = _document_training_lines if isinstance(train, DocumentSource) else _training_lines
                tok = Tokenizer.train(
                    sample(train, t.train_max_bytes, t.max_sentence_length), vocab_size=t.vocab_size,
                    model_type=t.model_type, character_coverage=t.character_coverage,
                    max_sentence_length=t.max_sentence_length, num_threads=t.num_threads,
                    meta={"key": key, "train_fingerprint": train.fingerprint, "settings": asdict(t)})
            except TokenizerError as e:
                raise DataError(f"{train.origin}: {e}") from None
            log.info("trained tokenizer %s in %.1f s", tok.hash[:12], time.perf_counter() - start)
            built = True
        if _try_load(final, key) is None:
            tmp = final.with_name(f".{key}.tmp{os.getpid()}")
            for stale in final.parent.glob(f".{key}.tmp*"):  # left by a killed process (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                tok.save(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a full disk: what was written goes
            fsync_dir(final.parent)
    return tok, built


def install_in_run_dir(tok: Tokenizer, run_dir: Path) -> None:
    """Save ``tok`` to ``run_dir/tokenizer/``; a tokenizer already there must be the same one. Ranks starting
    together take turns (a lock file in the folder), so none sees another's tokenizer half written."""
    dst = run_dir / "tokenizer"
    with exclusive_lock(dst / ".install.lock"):
        _install(tok, dst)


def _install(tok: Tokenizer, dst: Path) -> None:
    if (dst / MODEL_FILE).is_file():
        try:
            old = Tokenizer.load(dst)
        except TokenizerError as e:
            raise DataError(f"{e}: delete {dst} and it is installed again from the data settings") from None
        if old.hash != tok.hash:
            raise DataError(f"{dst} holds tokenizer {old.hash[:12]} but the data settings now give "
                            f"{tok.hash[:12]}: a run cannot change tokenizer; use a new run_dir or restore the "
                            f"data.* settings the run was started with")
        return
    foreign = sorted(n for n in os.listdir(dst) if not n.startswith(".")) if dst.is_dir() else []  # ".": our temps
    if foreign:
        raise DataError(f"{dst} holds files that are not a tokenizer of this tool ({', '.join(foreign[:3])}); move "
                        f"them out or use another run_dir (nothing was overwritten)")
    tok.save(dst)
