"""Text corpus -> SentencePiece tokenizer -> memory-mapped token caches -> training batches.

Cache layout under ``cfg.cache_dir`` (shared by runs; every name carries the fingerprints it depends on)::

    tokenizers/<key>/tokenizer.{model,json}     key = sha256(train-text fingerprint, tokenizer settings)
    tokens/<tokenizer hash>/<split>-<source fingerprint>.bin   token ids, uint16 (vocab <= 65536) or uint32
    tokens/<tokenizer hash>/<split>-<source fingerprint>.json  sidecar: hashes and counts; written last
    locks/*.lock                                 fcntl locks: one process builds, the others wait and reuse
    datasets/                                    `datasets`' Arrow copy of local text files (safe to delete)

A source fingerprint is the sha256 of the split's exact UTF-8 text. A cache is used only when its sidecar names
the same tokenizer hash and source fingerprint and the ``.bin`` has the recorded size and sha256; anything else
(stale, truncated, interrupted) is rebuilt. Files are written under temporary names, fsynced and renamed, the
sidecar last, so an interrupted preparation never leaves a cache that looks complete.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from lm import synthetic
from lm.config import DataConfig
from lm.fileio import atomic_write_bytes, exclusive_lock, fsync_dir
from lm.tokenizer import MODEL_FILE, Tokenizer, TokenizerError, encode_chunk, encode_chunk_with, init_worker

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CACHE_FORMAT = 1
"""Bump when the cache contents change meaning (part of the tokenizer key, checked in every sidecar)."""
_CHUNK_CHARS = 1 << 20  # line-aligned pieces of text handed to tokenizer workers
_LOCAL_LAYOUTS = ("wiki.{}.tokens", "wiki.{}.raw", "{}.txt")
_HUB_PROBE_TIMEOUT_S = 3.0
_PARALLEL_MIN_BYTES = 16 << 20  # below this, spawning worker processes (seconds) costs more than it saves


class DataError(ValueError):
    """Data that cannot be prepared or used; the message says what to change."""


# ====================================================================== sources
@dataclass
class SplitSource:
    """One split of raw text, located and fingerprinted but not loaded."""

    name: str
    fingerprint: str
    """sha256 of the split's exact UTF-8 text."""
    num_bytes: int
    origin: str
    """Where the text comes from (for messages)."""
    chunks: Callable[[], Iterator[str]] = field(repr=False)
    """Yields the text in line-aligned pieces (each ends with a newline, except possibly the last)."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _text_chunks(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", min(start + _CHUNK_CHARS, len(text)) - 1)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _row_chunks(rows: Iterator[list[str]]) -> Iterator[str]:
    """Batches of line rows (each ending in a newline) -> pieces of about ``_CHUNK_CHARS`` characters."""
    buf: list[str] = []
    size = 0
    for batch in rows:
        buf.extend(batch)
        size += sum(map(len, batch))
        if size >= _CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def _verified(chunks: Iterator[str], fingerprint: str, what: str) -> Iterator[str]:
    """Pass ``chunks`` through, then fail if their text is not the one fingerprinted (nothing is published
    before the stream ends, so a mismatch can never reach a cache)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.encode())
        yield c
    if h.hexdigest() != fingerprint:
        raise DataError(f"{what}: the text loaded through `datasets` differs from the file's bytes (the text "
                        f"loader turns \\r\\n and \\r line endings into \\n); convert the file to \\n line endings "
                        f"(e.g. dos2unix) or check that it was not modified during preparation")


def _local_file(directory: Path, split: str) -> Path:
    for layout in _LOCAL_LAYOUTS:
        p = directory / layout.format(split)
        if p.exists():
            return p
    names = ", ".join(layout.format(split) for layout in _LOCAL_LAYOUTS)
    raise DataError(f"data.path={str(directory)!r} has no {split} split: expected one of {names}")


def _local_source(directory: Path, split: str, datasets_cache: Path) -> SplitSource:
    path = _local_file(directory, split)
    try:
        size = path.stat().st_size
        fingerprint = _sha256_file(path)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}): check data.path and the file's permissions") from None
    if size == 0:
        raise DataError(f"{path} is empty: data.path must hold non-empty train, valid and test files")

    def chunks() -> Iterator[str]:
        from datasets import load_dataset

        try:
            # its Arrow copy of the text lives beside our caches (deleting it only costs a re-read)
            ds = load_dataset("text", data_files={split: str(path)}, split=split, keep_linebreaks=True,
                              cache_dir=str(datasets_cache))
        except Exception as e:  # datasets wraps the cause in its own error types
            cause = e
            while cause is not None and not isinstance(cause, UnicodeDecodeError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise DataError(f"{path} is not UTF-8 text ({cause}); convert it to UTF-8") from None
            raise DataError(f"`datasets` could not load {path}: {type(e).__name__}: {e}") from e
        yield from _verified(_row_chunks(b["text"] for b in ds.iter(batch_size=10_000)), fingerprint, str(path))

    return SplitSource(split, fingerprint, size, str(path), chunks)


def _synthetic_source(cfg: DataConfig, split: str) -> SplitSource:
    text = synthetic.split_text(cfg.synthetic, split)
    data = text.encode()
    return SplitSource(split, hashlib.sha256(data).hexdigest(), len(data), f"synthetic {split} split",
                       lambda: _text_chunks(text))


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (DNS included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    t.start()
    t.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def _hub_offline():
    """Make `datasets` use only its local cache. The offline flags are read from the environment at import time,
    so the imported modules' copies are switched too (and restored afterwards)."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub_dataset(cfg: DataConfig):
    from datasets import load_dataset

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "TRUE", "YES", "ON") or not _hub_reachable()
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return load_dataset(cfg.hf_name, cfg.hf_config)
    except Exception as e:  # datasets raises many types here (connection, not-cached, not-found)
        why = ("the Hugging Face hub cannot be reached and the dataset is not in the local `datasets` cache"
               if offline else "loading from the Hugging Face hub failed")
        raise DataError(f"data.source=hf ({cfg.hf_name}/{cfg.hf_config}): {why} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Point the config at local files with "
                        f"data.path=DIR (wiki.{{train,valid,test}}.tokens or {{train,valid,test}}.txt) or use "
                        f"data.source=synthetic") from None


def _hub_source(dataset_dict, cfg: DataConfig, split: str) -> SplitSource:
    key = split if split in dataset_dict else {"valid": "validation"}.get(split, split)
    if key not in dataset_dict:
        raise DataError(f"{cfg.hf_name}/{cfg.hf_config} has no {split!r} split (it has {list(dataset_dict)})")
    ds = dataset_dict[key]

    def chunks() -> Iterator[str]:
        # wikitext rows are lines; blank lines come as "" without their newline, which is restored here
        rows = ([r if r.endswith("\n") else r + "\n" for r in b["text"]] for b in ds.iter(batch_size=10_000))
        return _row_chunks(rows)

    h, n = hashlib.sha256(), 0
    for c in chunks():
        data = c.encode()
        h.update(data)
        n += len(data)
    if n == 0:
        raise DataError(f"{cfg.hf_name}/{cfg.hf_config} split {key!r} is empty")
    return SplitSource(split, h.hexdigest(), n, f"{cfg.hf_name}/{cfg.hf_config}:{key}", chunks)


def resolve_sources(cfg: DataConfig, splits: Sequence[str]) -> dict[str, SplitSource]:
    """Locate and fingerprint ``splits`` (train is always included: the tokenizer is trained on it)."""
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DataError(f"unknown split(s) {bad}; expected some of {list(SPLITS)}")
    names = ["train"] + [s for s in splits if s != "train"]
    if cfg.source == "local":
        directory = Path(cfg.path).expanduser()
        if not directory.is_dir():
            raise DataError(f"data.path={cfg.path!r} is not a directory")
        return {s: _local_source(directory, s, Path(cfg.cache_dir) / "datasets") for s in names}
    if cfg.source == "synthetic":
        return {s: _synthetic_source(cfg, s) for s in names}
    dataset_dict = _load_hub_dataset(cfg)
    return {s: _hub_source(dataset_dict, cfg, s) for s in names}


# ====================================================================== tokenizer
def _num_proc(cfg: DataConfig) -> int:
    return cfg.num_proc or os.cpu_count() or 1


def _training_lines(src: SplitSource, max_bytes: int, max_line_bytes: int) -> Iterator[str]:
    """Non-blank lines of ``src``, an evenly spread sample of about ``max_bytes`` bytes, none longer than
    ``max_line_bytes`` (longer lines are cut, which SentencePiece would otherwise skip)."""
    keep = min(1.0, max_bytes / src.num_bytes)
    credit = 0.0
    piece = max(1, max_line_bytes // 4)  # characters; a character is at most 4 UTF-8 bytes
    for chunk in src.chunks():
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


def _tokenizer_key(cfg: DataConfig, train: SplitSource) -> str:
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


def _prepare_tokenizer(cfg: DataConfig, train: SplitSource, run_dir: Path | None) -> tuple[Tokenizer, bool]:
    """The tokenizer for ``cfg`` and the train text: from the cache, else from ``run_dir``, else trained."""
    cache = Path(cfg.cache_dir)
    key = _tokenizer_key(cfg, train)
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
                tok = Tokenizer.train(
                    _training_lines(train, t.train_max_bytes, t.max_sentence_length), vocab_size=t.vocab_size,
                    model_type=t.model_type, character_coverage=t.character_coverage,
                    max_sentence_length=t.max_sentence_length, num_threads=t.num_threads,
                    meta={"key": key, "train_fingerprint": train.fingerprint, "settings": asdict(t)})
            except TokenizerError as e:
                raise DataError(f"{train.origin}: {e}") from None
            log.info("trained tokenizer %s in %.1f s", tok.hash[:12], time.perf_counter() - start)
            built = True
        if _try_load(final, key) is None:
            tmp = final.with_name(f".{key}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
    return tok, built


def _install_in_run_dir(tok: Tokenizer, run_dir: Path) -> None:
    dst = run_dir / "tokenizer"
    if (dst / MODEL_FILE).is_file():
        old = Tokenizer.load(dst)
        if old.hash != tok.hash:
            raise DataError(f"{dst} holds tokenizer {old.hash[:12]} but the data settings now give "
                            f"{tok.hash[:12]}: a run cannot change tokenizer; use a new run_dir or restore the "
                            f"data.* settings the run was started with")
        return
    tok.save(dst)


# ====================================================================== token caches
@dataclass
class TokenSplit:
    """One tokenized split: a 1-D memory-mapped stream of token ids and the counts for per-word metrics."""

    name: str
    tokens: np.memmap
    """Token ids, shape (num_tokens,), dtype uint16 or uint32, read-only."""
    num_tokens: int
    num_words: int
    """Whitespace-delimited words of the original text (the denominator of word-level perplexity)."""
    num_bytes: int
    """UTF-8 bytes of the original text."""
    path: Path


def _dtype_for(vocab_size: int) -> np.dtype:
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
                    "dtype": _dtype_for(tok.vocab_size).name}
        stale = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if stale:
            log.warning("rebuilding %s: stale cache (%s)", bin_path, stale)
            return None
        if not bin_path.is_file() or bin_path.stat().st_size != meta["num_tokens"] * dtype.itemsize:
            log.warning("rebuilding %s: token file missing or of the wrong size", bin_path)
            return None
        if _sha256_file(bin_path) != meta["tokens_sha256"]:
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
            for c in chunks:
                pending.append(pool.submit(encode_chunk, c, dtype))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise DataError(f"a tokenizer worker process died ({e}); set data.num_proc=1 to tokenize in this "
                        f"process") from None


def _build_cache(bin_path: Path, side_path: Path, tok: Tokenizer, src: SplitSource, num_proc: int,
                 progress: bool) -> dict:
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    side_path.unlink(missing_ok=True)  # from here on the cache is incomplete until the new sidecar lands
    for stale in bin_path.parent.glob(f".{bin_path.name}.tmp*"):  # left by a killed process (we hold the lock)
        stale.unlink(missing_ok=True)
    dtype = _dtype_for(tok.vocab_size)
    tmp = bin_path.with_name(f".{bin_path.name}.tmp{os.getpid()}")
    h = hashlib.sha256()
    n_tokens = n_words = n_bytes = 0
    start = time.perf_counter()
    try:
        with open(tmp, "wb") as f, tqdm(total=src.num_bytes, unit="B", unit_scale=True, disable=not progress,
                                        desc=f"tokenize {src.name}") as bar:
            parallel = src.num_bytes >= _PARALLEL_MIN_BYTES
            for ids, words, nbytes in _encoded_chunks(src.chunks(), tok, dtype.name, num_proc, parallel):
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
            "num_words": n_words, "num_bytes": n_bytes, "tokens_sha256": h.hexdigest()}
    atomic_write_bytes(side_path, json.dumps(meta, indent=2).encode())
    fsync_dir(bin_path.parent)
    seconds = time.perf_counter() - start
    log.info("tokenized %s: %d tokens, %d words, %.1f MB in %.1f s (%.2f s/MB, %d %s)", src.origin, n_tokens,
             n_words, n_bytes / 1e6, seconds, seconds / max(n_bytes / 1e6, 1e-9), num_proc,
             "processes" if parallel and num_proc > 1 else "threads")
    return meta


def _prepare_split(cfg: DataConfig, tok: Tokenizer, src: SplitSource) -> tuple[TokenSplit, bool]:
    bin_path, side_path = _cache_paths(cfg, tok, src)
    with exclusive_lock(Path(cfg.cache_dir) / "locks" / f"tokens-{tok.hash[:16]}-{bin_path.stem}.lock"):
        meta = _check_cache(bin_path, side_path, tok, src)
        built = meta is None
        if built:
            meta = _build_cache(bin_path, side_path, tok, src, _num_proc(cfg), cfg.progress)
    if meta["num_tokens"] == 0:
        raise DataError(f"{src.origin} has no tokens")
    tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))
    return TokenSplit(src.name, tokens, meta["num_tokens"], meta["num_words"], meta["num_bytes"], bin_path), built


# ====================================================================== corpus
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
    sources = resolve_sources(cfg, splits)
    tok, tok_built = _prepare_tokenizer(cfg, sources["train"], run_dir)
    if run_dir is not None:
        _install_in_run_dir(tok, run_dir)
    prepared: dict[str, TokenSplit] = {}
    built = ["tokenizer"] if tok_built else []
    for name in splits:
        prepared[name], split_built = _prepare_split(cfg, tok, sources[name])
        if split_built:
            built.append(name)
    return Corpus(tok, prepared, tuple(built))


# ====================================================================== batches
def _as_tokens(split) -> np.ndarray:
    return split.tokens if isinstance(split, TokenSplit) else np.asarray(split)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_windows: int, max_offset: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_windows), int(rng.integers(0, max_offset + 1))


def window_layout(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(windows per epoch, largest per-epoch start offset) for windows of ``seq_len + 1`` tokens that step by
    ``seq_len`` (each token is a target once per epoch). One window is kept in reserve so the offset can move
    window boundaries by up to ``seq_len - 1`` tokens between epochs."""
    if num_tokens < seq_len + 1:
        raise DataError(f"the split has {num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        f"lower data.seq_len or use a larger split")
    num_windows = max(1, (num_tokens - seq_len) // seq_len)
    return num_windows, num_tokens - 1 - num_windows * seq_len


def global_batch(split, seq_len: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The whole global batch of optimizer step ``step``: LongTensor (batch_size, seq_len + 1).

    A pure function of its arguments (so resuming at a step reproduces the order exactly). Sample
    ``g = step * batch_size + row`` is window ``g mod W`` of epoch ``g // W`` (``W`` windows per epoch); each
    epoch is a seeded permutation of non-overlapping window starts shifted by a seeded offset. ``split`` is a
    :class:`TokenSplit` or a 1-D array of token ids.
    """
    if step < 0 or batch_size <= 0 or seq_len <= 0:
        raise DataError(f"need step >= 0, batch_size > 0, seq_len > 0 (got {step}, {batch_size}, {seq_len})")
    tokens = _as_tokens(split)
    num_windows, max_offset = window_layout(len(tokens), seq_len)
    rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
    for r in range(batch_size):
        epoch, j = divmod(step * batch_size + r, num_windows)
        order, offset = _epoch_order(seed, epoch, num_windows, max_offset)
        start = offset + int(order[j]) * seq_len
        rows[r] = tokens[start:start + seq_len + 1]
    return torch.from_numpy(rows)


def shard(batch: torch.Tensor, rank: int, world_size: int, micro_batch_size: int) -> list[torch.Tensor]:
    """This rank's micro-batches of a global batch: ``batch_size / (world_size * micro_batch_size)`` tensors of
    shape (micro_batch_size, seq_len + 1). Rank ``r`` takes the ``r``-th contiguous block of rows, so ranks get
    disjoint rows and together cover the batch."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    if micro_batch_size <= 0:
        raise DataError(f"micro_batch_size={micro_batch_size} must be > 0")
    batch_size = batch.shape[0]
    per_step = world_size * micro_batch_size
    if batch_size % per_step:
        raise DataError(f"batch_size={batch_size} must equal world_size ({world_size}) x micro_batch_size "
                        f"({micro_batch_size}) x gradient-accumulation steps; change batch_size or "
                        f"micro_batch_size")
    per_rank = batch_size // world_size
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return list(mine.split(micro_batch_size))
