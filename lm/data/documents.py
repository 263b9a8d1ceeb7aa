"""A corpus of documents: its input shards (files, or row ranges of an Arrow dataset), the documents a split takes
from them, and that split's text as a stream of segments for the tokenizer.

A document is one JSONL line or Parquet / Arrow row (its text field), or one .txt file. In the token stream every
document is followed by the tokenizer's EOS id (:mod:`lm.data.packing`).

The carve-out: a corpus without a valid (or test) split gets one from its train documents, chosen by a hash of
each document's text mapped to a position ``u`` in [0, 1): valid takes ``u < f``, test ``u >= 1 - f``
(``f = data.valid_fraction``) and train the rest, so the splits are disjoint, the same on every machine and run,
and identical documents always land in the same split.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from lm.data import source
from lm.data.source import DataError

HELD_OUT = ("valid", "test")
SOURCE_FORMAT = 1
"""Bump when the reading of documents changes meaning (part of every document source's fingerprint)."""
GROUP_BYTES = 256 << 20
"""Input bytes per token file of a split: consecutive shards are grouped up to this size; a group is also what an
interrupted preparation does not redo."""

Segment = tuple[str, bool]
"""A piece of a document's text and whether the document ends with it (a long .txt document comes in several
line-aligned pieces; a row is always one whole document)."""


@dataclass(eq=False)
class Shard:
    """One input shard: a file, or a row range of an Arrow dataset."""

    origin: str
    """Where it comes from (for messages): a path, or ``name/config:split[start:stop]``."""
    fingerprint: str
    """Identifies its content: ``<kind>:...:<sha256>`` (for a file, the sha256 of its bytes)."""
    size: int
    """Bytes on disk (an estimate for a row range): groups shards into token files."""
    read: Callable[[], Iterator[list]] = field(repr=False)
    """Batches of the rows' texts in order (a text may be None or "": such rows are skipped). For a
    ``whole_document`` shard, the document's line-aligned pieces instead."""
    whole_document: bool = False
    """The shard is one document (a .txt file)."""


def text_position(text: str) -> float:
    """Where a document's text falls in [0, 1) (the carve-out's hash): blake2b of its UTF-8 bytes."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def digest_position(fingerprint: str) -> float:
    """Where a whole-file document falls in [0, 1): from the sha256 of its file (already computed), the hex digits
    after the last ``:`` of its shard's fingerprint."""
    return int(fingerprint.rsplit(":", 1)[-1][:16], 16) / 2.0 ** 64


def carve_ranges(missing: Sequence[str], fraction: float) -> dict[str, tuple[float, float]]:
    """The position range [low, high) of each split when the ``missing`` held-out splits are carved out of train
    (a split given by the corpus itself takes all of its own documents: (0, 1))."""
    ranges = {s: (0.0, 1.0) for s in ("train", *HELD_OUT)}
    if "valid" in missing:
        ranges["valid"] = (0.0, fraction)
    if "test" in missing:
        ranges["test"] = (1.0 - fraction, 1.0)
    ranges["train"] = (fraction if "valid" in missing else 0.0, 1.0 - fraction if "test" in missing else 1.0)
    return ranges


def spread_order(n: int) -> list[int]:
    """0 .. n-1 in an order whose every prefix is spread evenly over the range (0, n/2, n/4, 3n/4, ...; the van der
    Corput sequence), so a sample that stops early still covers the whole corpus."""
    order, seen, k = [], set(), 0
    while len(order) < n:
        x, denom, j = 0.0, 1.0, k
        while j:
            denom *= 2
            x += (j & 1) / denom
            j >>= 1
        i = int(x * n)
        if i not in seen:
            seen.add(i)
            order.append(i)
        k += 1
    return order


def plan_groups(shards: Sequence[Shard], group_bytes: int | None = None) -> list[list[int]]:
    """Consecutive shard indices grouped up to ``group_bytes`` (default :data:`GROUP_BYTES`) of input each; a
    larger shard is a group of its own. A function of the shards' sizes only, so the same corpus always gives the
    same token files."""
    limit = GROUP_BYTES if group_bytes is None else group_bytes
    groups: list[list[int]] = []
    current, size = [], 0
    for i, shard in enumerate(shards):
        current.append(i)
        size += shard.size
        if size >= limit:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


@dataclass
class ReadStats:
    """What reading the shards skipped."""

    empty_rows: int = 0
    """Rows whose text is empty or null."""


@dataclass(eq=False)
class DocumentSource:
    """One split of a documents corpus: the documents of ``shards`` whose position is in [low, high)."""

    name: str
    shards: list[Shard]
    origin: str
    text_field: str
    low: float = 0.0
    high: float = 1.0
    fingerprint: str = field(init=False)
    """sha256 of the shards' fingerprints, the text field and the range: keys the split's caches."""

    def __post_init__(self) -> None:
        spec = {"format": SOURCE_FORMAT, "layout": "documents", "text_field": self.text_field,
                "range": [self.low, self.high], "shards": [s.fingerprint for s in self.shards]}
        self.fingerprint = hashlib.sha256(json.dumps(spec).encode()).hexdigest()

    @property
    def carved(self) -> bool:
        """Whether the split takes only part of its shards' documents (a carve-out, or train beside one)."""
        return (self.low, self.high) != (0.0, 1.0)

    @property
    def disk_bytes(self) -> int:
        """The shards' bytes on disk: an estimate of the text's size (compressed files hold more text)."""
        return sum(s.size for s in self.shards)

    def carve_out(self) -> dict | None:
        """What the cache sidecar records about the carve-out (None when the split takes all its documents)."""
        if not self.carved:
            return None
        return {"position_range": [self.low, self.high], "hash": "blake2b-64 of the UTF-8 text (sha256 of a .txt "
                "file)", "of": self.origin}

    def _takes(self, position: float) -> bool:
        return self.low <= position < self.high

    def segments(self, shard_indices: Sequence[int] | None = None, stats: ReadStats | None = None
                 ) -> Iterator[Segment]:
        """The split's documents in the shards ``shard_indices`` (default all, in order) as segments."""
        stats = stats if stats is not None else ReadStats()
        for i in (range(len(self.shards)) if shard_indices is None else shard_indices):
            shard = self.shards[i]
            if shard.whole_document:
                yield from self._whole_document(shard)
            else:
                yield from self._rows(shard, stats)

    def _whole_document(self, shard: Shard) -> Iterator[Segment]:
        if self.carved and not self._takes(digest_position(shard.fingerprint)):
            return
        previous = None
        for piece in shard.read():
            if previous is not None:
                yield previous, False
            previous = piece
        if previous is None:
            raise DataError(f"{shard.origin} is empty (an empty shard): remove it or narrow the glob")
        yield previous, True

    def _rows(self, shard: Shard, stats: ReadStats) -> Iterator[Segment]:
        rows = texts = 0
        for batch in shard.read():
            rows += len(batch)
            for k, text in enumerate(batch):
                if not text:
                    stats.empty_rows += 1
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{shard.origin}: row {rows - len(batch) + k + 1} has a {type(text).__name__} "
                                    f"in column {self.text_field!r}, not text: set data.text_field to a text column")
                texts += 1
                if not self.carved or self._takes(text_position(text)):
                    yield text, True
        if rows == 0:
            raise DataError(f"{shard.origin} has no rows (an empty shard): remove it or narrow the glob")
        if texts == 0:
            raise DataError(f"{shard.origin}: every row's {self.text_field!r} is empty (an empty shard): remove it "
                            f"or set data.text_field to the column that holds the text")


def tasks(segments: Iterator[Segment], chunk_chars: int | None = None) -> Iterator[list[Segment]]:
    """Segments in consecutive groups of about ``chunk_chars`` characters (default
    :data:`lm.data.source.CHUNK_CHARS`): the pieces of work handed to the tokenizer's processes."""
    limit = source.CHUNK_CHARS if chunk_chars is None else chunk_chars
    batch: list[Segment] = []
    size = 0
    for segment in segments:
        batch.append(segment)
        size += len(segment[0])
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def pieces(lines: Iterator[list[str]], chunk_chars: int | None = None) -> Iterator[str]:
    """Batches of a text's lines (each with its newline) -> line-aligned pieces of about ``chunk_chars``."""
    limit = source.CHUNK_CHARS if chunk_chars is None else chunk_chars
    buf: list[str] = []
    size = 0
    for batch in lines:
        for line in batch:
            buf.append(line)
            size += len(line)
            if size >= limit:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)
