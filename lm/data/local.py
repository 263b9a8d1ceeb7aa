"""Local text files as a source: ``wiki.{split}.tokens`` / ``wiki.{split}.raw`` (WikiText-103's own layout) or
``{split}.txt`` under ``data.path``, read through `datasets`' text loader."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from lm.data.source import DataError, SplitSource, row_chunks
from lm.fileio import sha256_file

LAYOUTS = ("wiki.{}.tokens", "wiki.{}.raw", "{}.txt")


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


def local_file(directory: Path, split: str) -> Path:
    """The file of ``split`` under ``directory`` (the first layout of :data:`LAYOUTS` that exists)."""
    for layout in LAYOUTS:
        p = directory / layout.format(split)
        if p.exists():
            return p
    names = ", ".join(layout.format(split) for layout in LAYOUTS)
    raise DataError(f"data.path={str(directory)!r} has no {split} split: expected one of {names}")


def local_source(directory: Path, split: str, datasets_cache: Path) -> SplitSource:
    """Split ``split`` of the files under ``directory``; `datasets` keeps its Arrow copy in ``datasets_cache``."""
    path = local_file(directory, split)
    try:
        size = path.stat().st_size
        fingerprint = sha256_file(path)
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
        yield from _verified(row_chunks(b["text"] for b in ds.iter(batch_size=10_000)), fingerprint, str(path))

    return SplitSource(split, fingerprint, size, str(path), chunks)
