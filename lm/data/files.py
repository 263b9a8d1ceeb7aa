"""Local files by glob as a documents corpus (``data.source=files``): ``data.files.{train,valid,test}``, read
through `datasets`' streaming loaders (never the whole file in memory).

Formats, by file name: ``.jsonl`` / ``.json`` (JSON lines; a document per line, its ``data.text_field``),
``.parquet`` (a document per row), ``.txt`` (the whole file is one document); JSON and text files may be
compressed as ``.gz`` or ``.zst``. A split missing from ``data.files`` is carved out of train
(:func:`lm.data.documents.carve_ranges`).

Every bad input is a one-line :class:`DataError` naming the file: a glob that matches nothing, an unknown format,
several formats in one split, an empty shard, a missing text column or one that does not hold text, shards whose
columns differ (mixed schemas), a line that is not UTF-8 or not JSON.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Iterator

from lm.config import DataConfig
from lm.data.documents import HELD_OUT, DocumentSource, Shard, carve_ranges, pieces
from lm.data.fingerprint import file_sha256
from lm.data.hub import hub_offline
from lm.data.source import DataError

_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSED = (".gz", ".zst")
FORMATS = ".jsonl .json .parquet .txt (.jsonl, .json and .txt also as .gz or .zst)"
_STRING_TYPES = ("string", "large_string")


def file_kind(path: Path) -> str | None:
    """`datasets`' loader for ``path`` (json, parquet or text) by its name; None for an unknown format."""
    name = path.name.lower()
    for ext, kind in _KINDS.items():
        if name.endswith(ext) or (kind != "parquet" and any(name.endswith(ext + c) for c in _COMPRESSED)):
            return kind
    return None


def matching_files(pattern: str, key: str) -> list[Path]:
    """The files ``pattern`` matches (``~`` expanded, ``**`` recursive), sorted by path."""
    found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not found:
        where = "" if os.path.isabs(os.path.expanduser(pattern)) else f" (relative to {os.getcwd()})"
        raise DataError(f"{key}={pattern!r} matches no file{where}: check the path and the pattern")
    return [Path(p) for p in found]


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard
        return zstandard.open(path, "rb")
    return open(path, "rb")


def _lone_surrogate(value) -> str | None:
    """The first lone UTF-16 surrogate (U+D800..U+DFFF, which JSON's ``\\uXXXX`` escapes can give and UTF-8
    cannot hold) in a parsed JSON value, else None."""
    if isinstance(value, str):
        return next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((c for c in map(_lone_surrogate, items) if c is not None), None)


def _first_bad_line(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be read, found by reading it line by line: its first line that is not UTF-8 (or, for
    JSON lines, not JSON). None when every line is fine."""
    if kind == "parquet":
        return None
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (f"line {n} is not UTF-8 ({e.reason} at byte {e.start} of the line): convert the file to "
                            f"UTF-8")
                if kind == "json" and line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        why = f"{e.msg.removesuffix(' at')} at column {e.colno}"
                        return f"line {n} is not JSON ({why}): fix the line, or the file's format"
                    if not isinstance(row, dict):
                        return (f"line {n} is a JSON {type(row).__name__}, not an object: give JSON lines, one "
                                f"object per line")
                    lone = _lone_surrogate(row)
                    if lone is not None:
                        escape = f"\\u{ord(lone):04x}"
                        column = line.lower().find(escape) + 1
                        return (f"line {n} holds the escape {escape}{f' at column {column}' if column else ''}, half "
                                f"of a UTF-16 surrogate pair and not a character: fix or drop the line")
    except (OSError, EOFError, ValueError) as e:  # a truncated or corrupt compressed file
        return f"cannot be decompressed ({type(e).__name__}: {e}): check the file"
    return None


def _read_error(path: Path, kind: str, e: Exception) -> DataError:
    why = _first_bad_line(path, kind)
    if why is None:
        first = str(e).splitlines()[0] if str(e) else ""
        why = f"`datasets` could not read it as {kind} ({type(e).__name__}: {first})"
    return DataError(f"{path}: {why}")


def _load(path: Path, kind: str):
    """`datasets`' streaming view of one file (a local file: no hub access); for JSON and Parquet, with the
    columns it infers from the file's first rows."""
    from datasets import load_dataset

    kwargs = {"keep_linebreaks": True} if kind == "text" else {}
    try:
        with hub_offline(True):
            ds = load_dataset(kind, data_files=str(path), split="train", streaming=True, **kwargs)
    except Exception as e:  # datasets raises many types (ArrowInvalid, UnicodeDecodeError, StopIteration...)
        raise _read_error(path, kind, e) from None
    if kind != "text" and ds.features is None:  # its first rows could not be parsed
        raise _read_error(path, kind, ValueError("its columns could not be inferred"))
    return ds


def _parquet_rows(path: Path) -> int:
    """The rows a Parquet file's footer records."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise DataError(f"{path} is not a Parquet file ({type(e).__name__}: {str(e).splitlines()[0]}): check the "
                        f"file") from None


class Schema:
    """What every shard of one glob must have: a text column, and the column names of the glob's first file.
    (Only the names: the types JSON lines infer for the other columns, e.g. null or int, may differ harmlessly.)"""

    def __init__(self, first: Path, kind: str, text_field: str, key: str):
        self.first, self.kind, self.text_field, self.key = first, kind, text_field, key
        self._names: list[str] | None = None

    def check(self, path: Path, features) -> None:
        types = {name: getattr(f, "dtype", type(f).__name__) for name, f in features.items()}
        if self.text_field not in types:
            raise DataError(f"{path} has no column {self.text_field!r} (it has {sorted(types)}): set "
                            f"data.text_field to the column that holds the text")
        if types[self.text_field] not in _STRING_TYPES:
            raise DataError(f"{path}: column {self.text_field!r} holds {types[self.text_field]}, not text (in "
                            f"at least one row): set data.text_field to a text column, or fix those rows")
        if self._names is None:
            self._names = sorted(types if path == self.first else _load(self.first, self.kind).features)
        if sorted(types) != self._names:
            raise DataError(f"{path}: its columns {sorted(types)} differ from those of {self.first} {self._names} "
                            f"(mixed schemas across the shards of {self.key}): give every shard the same columns, "
                            f"or narrow the glob")


def _rows(path: Path, kind: str, schema: Schema) -> Iterator[list]:
    ds = _load(path, kind)
    schema.check(path, ds.features)
    try:
        for batch in ds.select_columns([schema.text_field]).iter(batch_size=1000):
            yield batch[schema.text_field]
    except Exception as e:
        raise _read_error(path, kind, e) from None


def _lines(path: Path) -> Iterator[list[str]]:
    ds = _load(path, "text")
    try:
        for batch in ds.iter(batch_size=10_000):
            yield batch["text"]
    except Exception as e:
        raise _read_error(path, "text", e) from None


def file_shards(pattern: str, key: str, text_field: str, memo: Path | None) -> list[Shard]:
    """The shards of one split's glob (``key`` names the config key, for messages), fingerprinted."""
    paths = matching_files(pattern, key)
    kinds = {}
    for p in paths:
        kind = file_kind(p)
        if kind is None:
            raise DataError(f"{p}: unknown format ({key} takes {FORMATS}): rename it or narrow the glob")
        kinds.setdefault(kind, p)
    if len(kinds) > 1:
        (a, pa), (b, pb) = list(kinds.items())[:2]
        raise DataError(f"{key}={pattern!r} matches files of two formats ({pa}: {a}, {pb}: {b}): give each split "
                        f"one format")
    kind = next(iter(kinds))
    schema = Schema(paths[0], kind, text_field, key)
    shards = []
    for p in paths:
        try:
            size = p.stat().st_size
            fingerprint = file_sha256(p, memo)
        except OSError as e:
            raise DataError(f"cannot read {p} ({e.strerror}): check {key} and the file's permissions") from None
        if size == 0 or (kind == "parquet" and _parquet_rows(p) == 0):
            raise DataError(f"{p} is empty (an empty shard): remove it or narrow {key}")
        if kind == "text":
            shards.append(Shard(str(p), f"text:{fingerprint}", size, lambda p=p: pieces(_lines(p)),
                                whole_document=True))
        else:
            shards.append(Shard(str(p), f"{kind}:{text_field}:{fingerprint}", size,
                                lambda p=p: _rows(p, kind, schema)))
    return shards


def file_sources(cfg: DataConfig, names: list[str]) -> dict[str, DocumentSource]:
    """The splits ``names`` of ``cfg.files``; a held-out split without files is carved out of train."""
    memo = Path(cfg.cache_dir) / "fingerprints"
    missing = [s for s in HELD_OUT if getattr(cfg.files, s) is None]
    ranges = carve_ranges(missing, cfg.valid_fraction)
    shards: dict[str, list[Shard]] = {}
    out = {}
    for name in names:
        own = "train" if name in missing else name
        if own not in shards:
            shards[own] = file_shards(getattr(cfg.files, own), f"data.files.{own}", cfg.text_field, memo)
        origin = f"data.files.{own}={getattr(cfg.files, own)}"
        if name in missing:
            origin += f" (the {name} split carved out: data.valid_fraction={cfg.valid_fraction})"
        out[name] = DocumentSource(name, shards[own], origin, cfg.text_field, *ranges[name])
    return out
