"""The sha256 of large files, remembered by their (size, mtime, inode) so that a corpus of many gigabytes is hashed
once, not at every start of every rank.

    <cache_dir>/fingerprints/<sha256 of the absolute path>.json    {path, size, mtime_ns, inode, sha256}

A file whose size, modification time or inode changed is hashed again; one modified in the last seconds is not
remembered (a change within the clock's resolution would keep its modification time). The memo is best effort:
when it cannot be read or written the file is simply hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from lm.fileio import atomic_write_text, sha256_file

FRESH_NS = 2_000_000_000
"""A file modified less than this long ago (2 s) is hashed but not remembered."""


def _stat_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def file_sha256(path: str | Path, memo_dir: str | Path | None) -> str:
    """Hex sha256 of ``path``'s bytes; from the memo under ``memo_dir`` when the file is unchanged since it was
    hashed (None: always hash). Raises OSError when the file cannot be read."""
    path = Path(path).resolve()
    if memo_dir is None:
        return sha256_file(path)
    entry = Path(memo_dir) / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    key = _stat_key(path.stat())
    try:
        memo = json.loads(entry.read_text())
        if memo.get("path") == str(path) and {k: memo.get(k) for k in key} == key:
            return memo["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    digest = sha256_file(path)
    # remembered only if not modified while it was read, nor so recently that a change within the clock's
    # resolution could keep the same modification time
    if _stat_key(path.stat()) == key and time.time_ns() - key["mtime_ns"] > FRESH_NS:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(entry, json.dumps({"path": str(path), **key, "sha256": digest}))
        except OSError:
            pass
    return digest
