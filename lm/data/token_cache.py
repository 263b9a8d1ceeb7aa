"""Token caches: each split tokenized once into a memory-mapped array of token ids with a JSON sidecar.

    <cache_dir>/tokens/<tokenizer hash>/<split>-<source fingerprint>.bin    token ids, uint16 (vocab <= 65536)
                                                                             or uint32
    <cache_dir>/tokens/<tokenizer hash>/<split>-<source fingerprint>.json   sidecar: hashes and counts; last

A cache is used only when its sidecar names the same tokenizer hash and source fingerprint and the ``.bin`` has
the recorded size and sha256; anything else (stale, truncated, interrupted) is rebuilt. Files are written under
temporary names, fsynced and renamed, the sidecar last, so an interrupted preparation never leaves a cache
that looks complete. A file lock makes concurrent ranks safe: one builds, the others wait and reuse.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from lm.config import DataConfig
from lm.data.sharded_tokens import ShardedTokens
from lm.data.source import DataError, LineEnds, SplitSource
from lm.fileio import atomic_write_text, exclusive_lock, fsync_dir, open_for_writing, sha256_file
from lm.tokenizer import Tokenizer, encode_chunk, encode_chunk_with, init_worker, interrupts_held

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when the cache contents change meaning (part of the tokenizer key, checked in every sidecar)."""
PARALLEL_MIN_BYTES = 16 << 20
"""Below this, spawning worker processes (seconds) costs more than it saves: encode in this process."""


@dataclass
class TokenSplit:
    """One tokenized split: a 1-D memory-mapped stream of token ids and the counts for per-word metrics."""

    name: str
    tokens: np.memmap | ShardedTokens
    """Token ids, shape (num_tokens,), dtype uint16 or uint32, read-only: one memory-mapped file, or several
    indexed as one (:class:`~lm.data.sharded_tokens.ShardedTokens`)."""
    num_tokens: int
    num_words: int
    """Whitespace-delimited words of the original text."""
    num_bytes: int
    """UTF-8 bytes of the original text."""
    path: Path
    """The token file (a folder of token files for a documents corpus); its sidecar is ``path.with_suffix(".json")``."""
    num_line_ends: int
    """Lines of the original text (:class:`lm.data.source.LineEnds`)."""
    num_documents: int = 0
    """Documents, each followed by the EOS id in ``tokens``; 0 for a text of lines (WikiText, synthetic)."""

    @property
    def num_word_level_tokens(self) -> int:
        """Words + line ends: the denominator of word-level perplexity (the WikiText-103 convention); 0 for a
        documents corpus, which has no word-level perplexity."""
        return 0 if self.num_documents else self.num_words + self.num_line_ends


def worker_count(cfg: DataConfig) -> int:
    """Processes to tokenize with: ``data.num_proc``, 0 = every core."""
    return cfg.num_proc or os.cpu_count() or 1


def dtype_for(vocab_size: int) -> np.dtype:
    """The token files' dtype: uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _cache_paths(cfg: DataConfig, tok: Tokenizer, src: SplitSource) -> tuple[Path, Path]:
    stem = Path(cfg.cache_dir) / "tokens" / tok.hash[:16] / f"{src.name}-{src.fingerprint[:16]}"
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def _check_cache(bin_path: Path, side_path: Path, tok: Tokenizer, src: SplitSource) -> dict | None:
    """The sidecar if the cache is complete and matches ``tok`` and ``src``; otherwise None (logged)."""
    if not side_path.is_file():
        return None
    try:
        meta = json.loads(side_path.read_text())
        dtype = np.dtype(meta["dtype"])
        expected = {"format": CACHE_FORMAT, "tokenizer_hash": tok.hash, "source_fingerprint": src.fingerprint,
                    "dtype": dtype_for(tok.vocab_size).name}
        stale = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if stale:
            log.warning("rebuilding %s: stale cache (%s)", bin_path, stale)
            return None
        if "num_line_ends" not in meta:
            log.warning("rebuilding %s: written before line ends were counted", bin_path)
            return None
        if not bin_path.is_file() or bin_path.stat().st_size != meta["num_tokens"] * dtype.itemsize:
            log.warning("rebuilding %s: token file missing or of the wrong size", bin_path)
            return None
        if sha256_file(bin_path) != meta["tokens_sha256"]:
            log.warning("rebuilding %s: token file corrupt (sha256 mismatch)", bin_path)
            return None
        return meta
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("rebuilding %s: unreadable sidecar %s (%s)", bin_path, side_path, e)
        return None


def _encoded_chunks(chunks: Iterator[str], tok: Tokenizer, dtype: str, num_proc: int, parallel: bool
                    ) -> Iterator[tuple[np.ndarray, int, int]]:
    """(ids, words, bytes) per chunk, in order, using ``num_proc`` cores. Small splits are encoded in this
    process on SentencePiece's C++ threads (``parallel=False``: no start-up cost); large ones by spawned worker
    processes, which also parallelise the Python-side work, each encoding a bounded window of chunks ahead (so
    memory stays a few chunks per worker however large the split)."""
    if not parallel or num_proc <= 1:
        for c in chunks:
            yield encode_chunk_with(tok, c, dtype, num_threads=num_proc)
        return
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and can deadlock
    try:
        with ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=init_worker,
                                 initargs=(tok.model_proto,)) as pool:
            pending: deque = deque()
            try:
                for c in chunks:
                    with interrupts_held():  # a worker may be spawned here: deaf to Ctrl-C from its start
                        pending.append(pool.submit(encode_chunk, c, dtype))
                    if len(pending) >= 2 * num_proc:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            except BaseException:  # e.g. Ctrl-C: the chunks not started yet are dropped, not encoded first
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as e:
        raise DataError(f"a tokenizer worker process died ({e}); set data.num_proc=1 to tokenize in this "
                        f"process") from None


def _build_cache(bin_path: Path, side_path: Path, tok: Tokenizer, src: SplitSource, num_proc: int,
                 progress: bool) -> dict:
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    side_path.unlink(missing_ok=True)  # from here on the cache is incomplete until the new sidecar lands
    for stale in bin_path.parent.glob(f".{bin_path.name}.tmp*"):  # left by a killed process (we hold the lock)
        stale.unlink(missing_ok=True)
    dtype = dtype_for(tok.vocab_size)
    tmp = bin_path.with_name(f".{bin_path.name}.tmp{os.getpid()}")
    h = hashlib.sha256()
    n_tokens = n_words = n_bytes = 0
    line_ends = LineEnds()
    start = time.perf_counter()
    try:
        # disable=None: no bar when stderr is not a terminal (a log file gets no carriage-return runs)
        with open_for_writing(tmp) as f, tqdm(total=src.num_bytes, unit="B", unit_scale=True,
                                              disable=None if progress else True,
                                              desc=f"tokenize {src.name}") as bar:
            parallel = src.num_bytes >= PARALLEL_MIN_BYTES
            chunks = map(line_ends.add, src.chunks())
            for ids, words, nbytes in _encoded_chunks(chunks, tok, dtype.name, num_proc, parallel):
                data = ids.tobytes()
                f.write(data)
                h.update(data)
                n_tokens += len(ids)
                n_words += words
                n_bytes += nbytes
                bar.update(nbytes)
            f.flush()
            os.fsync(f.fileno())
        if n_bytes != src.num_bytes:
            raise DataError(f"{src.origin} changed while it was being tokenized ({n_bytes} bytes read, "
                            f"{src.num_bytes} expected); run again")
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"format": CACHE_FORMAT, "split": src.name, "origin": src.origin, "tokenizer_hash": tok.hash,
            "source_fingerprint": src.fingerprint, "dtype": dtype.name, "num_tokens": n_tokens,
            "num_words": n_words, "num_line_ends": line_ends.count, "num_bytes": n_bytes,
            "tokens_sha256": h.hexdigest()}
    atomic_write_text(side_path, json.dumps(meta, indent=2))
    fsync_dir(bin_path.parent)
    seconds = time.perf_counter() - start
    log.info("tokenized %s: %d tokens, %d words, %.1f MB in %.1f s (%.2f s/MB, %d %s)", src.origin, n_tokens,
             n_words, n_bytes / 1e6, seconds, seconds / max(n_bytes / 1e6, 1e-9), num_proc,
             "processes" if parallel and num_proc > 1 else "threads")
    return meta


def prepare_split(cfg: DataConfig, tok: Tokenizer, src: SplitSource) -> tuple[TokenSplit, bool]:
    """The token cache of ``src`` under ``tok``: reused when complete and current, else built. Returns it and
    whether it was built by this call."""
    bin_path, side_path = _cache_paths(cfg, tok, src)
    with exclusive_lock(Path(cfg.cache_dir) / "locks" / f"tokens-{tok.hash[:16]}-{bin_path.stem}.lock"):
        meta = _check_cache(bin_path, side_path, tok, src)
        built = meta is None
        if built:
            meta = _build_cache(bin_path, side_path, tok, src, worker_count(cfg), cfg.progress)
    if meta["num_tokens"] == 0:
        raise DataError(f"{src.origin} has no tokens")
    tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))
    return TokenSplit(src.name, tokens, meta["num_tokens"], meta["num_words"], meta["num_bytes"], bin_path,
                      meta["num_line_ends"]), built
