"""A hub dataset (or a folder written by ``save_to_disk``) whose rows are documents (``data.hf_rows``): each split
becomes contiguous row ranges of its memory-mapped Arrow table, read column by column; a split the dataset lacks
is carved out of train (:func:`lm.data.documents.carve_ranges`).

A split's fingerprint is the sha256 of its Arrow files (remembered by their size and modification time, see
:mod:`lm.data.fingerprint`), or, for a dataset held in memory, of its text column.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Iterator

from lm.config import DataConfig
from lm.data.documents import GROUP_BYTES, HELD_OUT, DocumentSource, Shard, carve_ranges
from lm.data.fingerprint import file_sha256
from lm.data.hub import hub_label, hub_split_key
from lm.data.source import DataError

_STRING_TYPES = ("string", "large_string")


def _fingerprint(ds, text_field: str, memo: Path | None) -> str:
    files = [f["filename"] for f in ds.cache_files]
    if files and getattr(ds, "_indices", None) is None:  # a plain memory-mapped table: its files are its rows
        return hashlib.sha256(json.dumps([file_sha256(f, memo) for f in files] + [ds.num_rows]).encode()).hexdigest()
    h = hashlib.sha256()
    for batch in ds.select_columns([text_field]).iter(batch_size=10_000):
        for text in batch[text_field]:
            h.update(b"-" if text is None else f"{len(text)}:".encode() + text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _rows(columns, start: int, stop: int, text_field: str, batch_size: int = 1000) -> Iterator[list]:
    for a in range(start, stop, batch_size):
        yield columns[a:min(stop, a + batch_size)][text_field]


def arrow_shards(ds, origin: str, text_field: str, memo: Path | None) -> list[Shard]:
    """A loaded Arrow Dataset as row-range shards of about :data:`GROUP_BYTES` each."""
    if text_field not in ds.column_names:
        raise DataError(f"{origin} has no column {text_field!r} (it has {ds.column_names}): set data.text_field to "
                        f"the column that holds the text")
    feature = ds.features[text_field]
    kind = getattr(feature, "dtype", type(feature).__name__)
    if kind not in _STRING_TYPES:
        raise DataError(f"{origin}: column {text_field!r} holds {kind}, not text: set data.text_field to a text "
                        f"column")
    if ds.num_rows == 0:
        raise DataError(f"{origin} has no rows (an empty shard): choose another split or dataset")
    fingerprint = _fingerprint(ds, text_field, memo)
    nbytes = max(1, ds.data.nbytes)
    parts = max(1, math.ceil(nbytes / GROUP_BYTES))
    bounds = [ds.num_rows * k // parts for k in range(parts + 1)]
    columns = ds.select_columns([text_field])
    return [Shard(f"{origin}[{a}:{b}]", f"arrow:{text_field}:{a}:{b}:{fingerprint}", nbytes * (b - a) // ds.num_rows,
                  lambda a=a, b=b: _rows(columns, a, b, text_field))
            for a, b in itertools.pairwise(bounds) if b > a]


def hub_document_sources(dataset_dict, cfg: DataConfig, names: list[str]) -> dict[str, DocumentSource]:
    """The splits ``names`` of a loaded dataset of documents; a held-out split it lacks is carved out of train."""
    memo = Path(cfg.cache_dir) / "fingerprints"
    keys = {s: hub_split_key(dataset_dict, cfg, s) for s in ("train", *HELD_OUT)}
    missing = [s for s in HELD_OUT if keys[s] is None]
    ranges = carve_ranges(missing, cfg.valid_fraction)
    shards: dict[str, list[Shard]] = {}
    out = {}
    for name in names:
        key = keys["train"] if name in missing else keys[name]
        origin = f"{hub_label(cfg)}:{key}"
        if key not in shards:
            shards[key] = arrow_shards(dataset_dict[key], origin, cfg.text_field, memo)
        if name in missing:
            origin += f" (the {name} split carved out: data.valid_fraction={cfg.valid_fraction})"
        out[name] = DocumentSource(name, shards[key], origin, cfg.text_field, *ranges[name])
    return out
