"""Token caches of a documents corpus: a split becomes a folder of token files, one per group of input shards,
each with its own sidecar, and a sidecar for the split written last.

    <cache_dir>/tokens/<tokenizer hash>/<split>-<source fingerprint>/part-00000.{bin,json}   one group of shards
    <cache_dir>/tokens/<tokenizer hash>/<split>-<source fingerprint>.json                      the split: counts,
                                                                                                parts, carve-out

A part's sidecar lands (atomically, after its fsynced token file) only when its group is complete, so an
interrupted preparation resumes with the first unfinished group and never reads a finished shard again; the
split's sidecar lands after every part, so a split is never used half-built. Reading streams: the main process
reads the shards (through `datasets`) and cuts them into tasks of about a megabyte, ``data.num_proc`` spawned
worker processes tokenize them, each a bounded number of tasks ahead, and the main process appends the results to
the part's file in order. Memory stays a few tasks per worker however large the corpus. A file lock makes
concurrent ranks safe: one builds, the others wait and reuse.
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
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from lm.config import DataConfig
from lm.data import packing
from lm.data.documents import DocumentSource, ReadStats, plan_groups, tasks
from lm.data.fingerprint import file_sha256
from lm.data.packing import PackCounts
from lm.data.sharded_tokens import ShardedTokens
from lm.data.source import DataError
from lm.data.token_cache import CACHE_FORMAT, TokenSplit, dtype_for, worker_count
from lm.fileio import atomic_write_text, exclusive_lock, fsync_dir
from lm.tokenizer import Tokenizer, interrupts_held

log = logging.getLogger(__name__)

LAYOUT = "documents"
PARALLEL_MIN_BYTES = 16 << 20
"""Below this many input bytes, spawning worker processes costs more than it saves: encode in this process."""


def _paths(cfg: DataConfig, tok: Tokenizer, src: DocumentSource) -> tuple[Path, Path]:
    folder = Path(cfg.cache_dir) / "tokens" / tok.hash[:16] / f"{src.name}-{src.fingerprint[:16]}"
    return folder, folder.with_suffix(".json")


def _memo(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) / "fingerprints"


def _part_name(group: int) -> str:
    return f"part-{group:05d}"


def _intact(path: Path, num_tokens: int, dtype: np.dtype, sha256: str, memo: Path) -> bool:
    try:
        return path.stat().st_size == num_tokens * dtype.itemsize and file_sha256(path, memo) == sha256
    except OSError:
        return False


def _check_part(folder: Path, group: int, members: list[int], tok: Tokenizer, src: DocumentSource,
                memo: Path) -> dict | None:
    """The sidecar of part ``group`` if it is complete and was built from these shards; else None."""
    side = folder / f"{_part_name(group)}.json"
    try:
        meta = json.loads(side.read_text())
        expected = {"format": CACHE_FORMAT, "tokenizer_hash": tok.hash, "source_fingerprint": src.fingerprint,
                    "dtype": dtype_for(tok.vocab_size).name,
                    "shards": [src.shards[i].fingerprint for i in members]}
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        if not _intact(folder / f"{_part_name(group)}.bin", meta["num_tokens"], np.dtype(meta["dtype"]),
                       meta["tokens_sha256"], memo):
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_split(folder: Path, side: Path, tok: Tokenizer, src: DocumentSource, memo: Path) -> dict | None:
    """The split's sidecar if it and every part it lists are complete and current; otherwise None (logged)."""
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
        expected = {"format": CACHE_FORMAT, "layout": LAYOUT, "tokenizer_hash": tok.hash,
                    "source_fingerprint": src.fingerprint, "dtype": dtype_for(tok.vocab_size).name}
        stale = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if stale:
            log.warning("rebuilding %s: stale cache (%s)", folder, stale)
            return None
        dtype = np.dtype(meta["dtype"])
        for part in meta["parts"]:
            if not _intact(folder / part["file"], part["num_tokens"], dtype, part["tokens_sha256"], memo):
                log.warning("rebuilding %s: token file %s missing, of the wrong size or corrupt", folder,
                            part["file"])
                return None
        return meta
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("rebuilding %s: unreadable sidecar %s (%s)", folder, side, e)
        return None


class _PartWriter:
    """Appends token ids to a part's temporary file; :meth:`finish` publishes it (token file, then sidecar)."""

    def __init__(self, folder: Path, group: int, dtype: np.dtype):
        self.bin_path = folder / f"{_part_name(group)}.bin"
        self.tmp = folder / f".{self.bin_path.name}.tmp{os.getpid()}"
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.num_tokens = 0
        self.counts = PackCounts()

    def add(self, ids: np.ndarray, counts: PackCounts) -> None:
        data = ids.tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.num_tokens += len(ids)
        self.counts.add(counts)

    def finish(self, fields: dict) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.bin_path)
        meta = {**fields, "num_tokens": self.num_tokens, "tokens_sha256": self.sha.hexdigest(),
                **vars(self.counts)}
        atomic_write_text(self.bin_path.with_suffix(".json"), json.dumps(meta, indent=2))
        fsync_dir(self.bin_path.parent)  # a finished part survives a crash of the machine, not only of the process
        return meta

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


_END = object()
"""Marks the end of a group in the stream of tasks."""


def _work(src: DocumentSource, todo: list[int], groups: list[list[int]], stats: dict[int, ReadStats]
          ) -> Iterator[tuple[int, object]]:
    """(group, task) for every task of the groups ``todo``, then (group, _END) after each group's last."""
    for g in todo:
        stats[g] = ReadStats()
        for task in tasks(src.segments(groups[g], stats[g])):
            yield g, task
        yield g, _END


def _encoded(work: Iterator[tuple[int, object]], tok: Tokenizer, dtype: str, processes: int, parallel: bool
             ) -> Iterator[tuple[int, object]]:
    """``work`` with each task replaced by its (ids, counts), in order, encoded by ``processes`` spawned workers
    (or in this process on SentencePiece's threads when ``parallel`` is False)."""
    if not parallel or processes <= 1:
        for g, task in work:
            yield g, task if task is _END else packing.encode_segments(tok, task, dtype, num_threads=processes)
        return
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and can deadlock
    try:
        with ProcessPoolExecutor(processes, mp_context=ctx, initializer=packing.init_worker,
                                 initargs=(tok.model_proto,)) as pool:
            pending: deque = deque()
            for g, task in work:
                with interrupts_held():  # a worker may be spawned here: deaf to Ctrl-C from its start
                    pending.append((g, task if task is _END else pool.submit(packing.encode_task, task, dtype)))
                while len(pending) > 2 * processes:
                    g0, item = pending.popleft()
                    yield g0, item if item is _END else item.result()
            while pending:
                g0, item = pending.popleft()
                yield g0, item if item is _END else item.result()
    except BrokenProcessPool as e:
        raise DataError(f"a tokenizer worker process died ({e}); set data.num_proc=1 to tokenize in this "
                        f"process") from None


def _build(cfg: DataConfig, tok: Tokenizer, src: DocumentSource, folder: Path, side: Path) -> dict:
    side.unlink(missing_ok=True)  # from here on the split is incomplete until its new sidecar lands
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".part-*.tmp*"):  # left by a killed process (we hold the lock)
        stale.unlink(missing_ok=True)
    memo, dtype = _memo(cfg), dtype_for(tok.vocab_size)
    groups = plan_groups(src.shards)
    for extra in folder.glob("part-*"):  # from another grouping of the same shards
        if not extra.stem[len("part-"):].isdigit() or int(extra.stem[len("part-"):]) >= len(groups):
            extra.unlink(missing_ok=True)
    parts = [_check_part(folder, g, members, tok, src, memo) for g, members in enumerate(groups)]
    todo = [g for g, part in enumerate(parts) if part is None]
    if len(todo) < len(groups):
        log.info("resuming %s: %d of %d parts already done", folder, len(groups) - len(todo), len(groups))
    processes = worker_count(cfg)
    parallel = sum(src.shards[i].size for g in todo for i in groups[g]) >= PARALLEL_MIN_BYTES
    stats: dict[int, ReadStats] = {}
    start, done_bytes = time.perf_counter(), 0
    writer: _PartWriter | None = None
    bar = tqdm(unit="B", unit_scale=True, disable=None if cfg.progress else True, desc=f"tokenize {src.name}")
    try:
        for g, item in _encoded(_work(src, todo, groups, stats), tok, dtype.name, processes, parallel):
            if writer is None:
                writer = _PartWriter(folder, g, dtype)
            if item is _END:
                fields = {"format": CACHE_FORMAT, "tokenizer_hash": tok.hash, "source_fingerprint": src.fingerprint,
                          "dtype": dtype.name, "shards": [src.shards[i].fingerprint for i in groups[g]],
                          "origins": [src.shards[i].origin for i in groups[g]], "empty_rows": stats[g].empty_rows}
                parts[g] = writer.finish(fields)
                writer = None
                bar.set_postfix(parts=f"{sum(p is not None for p in parts)}/{len(groups)}")
                continue
            ids, counts = item
            writer.add(ids, counts)
            done_bytes += counts.num_bytes
            bar.update(counts.num_bytes)
    except packing.InvalidText as e:
        raise DataError(f"{src.origin}: {e}") from None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    fsync_dir(folder)
    total = PackCounts()
    for part in parts:
        total.add(PackCounts(**{k: part[k] for k in vars(PackCounts())}))
    meta = {"format": CACHE_FORMAT, "layout": LAYOUT, "split": src.name, "origin": src.origin,
            "tokenizer_hash": tok.hash, "source_fingerprint": src.fingerprint, "dtype": dtype.name,
            "num_tokens": sum(p["num_tokens"] for p in parts), **vars(total),
            "empty_rows": sum(p["empty_rows"] for p in parts), "text_field": src.text_field,
            "carve_out": src.carve_out(),
            "parts": [{"file": f"{_part_name(g)}.bin", "num_tokens": p["num_tokens"],
                       "tokens_sha256": p["tokens_sha256"]} for g, p in enumerate(parts)]}
    atomic_write_text(side, json.dumps(meta, indent=2))
    fsync_dir(side.parent)
    seconds = time.perf_counter() - start
    log.info("tokenized %s: %d documents, %d tokens, %.1f MB in %.1f s (%d of %d parts; %d %s)", src.origin,
             meta["num_documents"], meta["num_tokens"], done_bytes / 1e6, seconds, len(todo), len(groups),
             processes, "processes" if parallel and processes > 1 else "threads")
    return meta


def _open(folder: Path, meta: dict, name: str) -> TokenSplit:
    dtype = np.dtype(meta["dtype"])
    maps = [np.memmap(folder / p["file"], dtype=dtype, mode="r", shape=(p["num_tokens"],))
            for p in meta["parts"] if p["num_tokens"]]
    tokens = maps[0] if len(maps) == 1 else ShardedTokens(maps)
    return TokenSplit(name, tokens, meta["num_tokens"], meta["num_words"], meta["num_bytes"], folder,
                      meta["num_line_ends"], num_documents=meta["num_documents"])


def _no_tokens(src: DocumentSource, meta: dict) -> DataError:
    if src.carved and src.name != "train":
        return DataError(f"the carve-out gave the {src.name} split no documents (data.valid_fraction of "
                         f"{src.origin}): raise data.valid_fraction or give the split its own files")
    return DataError(f"{src.origin} has no documents for the {src.name} split ({meta['empty_rows']} empty rows)")


def prepare_document_split(cfg: DataConfig, tok: Tokenizer, src: DocumentSource) -> tuple[TokenSplit, bool]:
    """The token cache of ``src`` under ``tok``: reused when complete and current, else built (resuming the
    parts an interrupted preparation finished). Returns it and whether this call built anything."""
    folder, side = _paths(cfg, tok, src)
    with exclusive_lock(Path(cfg.cache_dir) / "locks" / f"tokens-{tok.hash[:16]}-{folder.name}.lock"):
        meta = _check_split(folder, side, tok, src, _memo(cfg))
        built = meta is None
        if built:
            meta = _build(cfg, tok, src, folder, side)
    if meta["num_tokens"] == 0:
        raise _no_tokens(src, meta)
    return _open(folder, meta, src.name), built


def cached_document_split(cfg: DataConfig, tok: Tokenizer, src: DocumentSource) -> TokenSplit | None:
    """The complete token cache of ``src`` under ``tok`` if there is one (nothing is built)."""
    folder, side = _paths(cfg, tok, src)
    meta = _check_split(folder, side, tok, src, _memo(cfg)) if side.is_file() else None
    return _open(folder, meta, src.name) if meta is not None and meta["num_tokens"] else None
