"""Documents -> one token stream: each document's token ids, then the tokenizer's EOS id (packing: training
windows run across document boundaries and the loss scores every EOS).

A group of segments is tokenized in one call: the segments are joined with a newline after each document's last
one, encoded (the tokenizer splits at newlines and encodes every line on its own, so this is exactly the
documents encoded one by one), and those placeholder newlines become EOS. The worker-process helpers import
nothing heavy (no torch), so spawning a worker costs little.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from lm.data.source import DataError
from lm.tokenizer import Tokenizer, ignore_interrupts

Segment = tuple[str, bool]


class InvalidText(DataError):
    """A document's text cannot be encoded as UTF-8 (a lone surrogate); the caller adds where it comes from."""


@dataclass
class PackCounts:
    """Counts of the text behind a piece of the token stream."""

    num_documents: int = 0
    num_words: int = 0
    """Whitespace-delimited words."""
    num_line_ends: int = 0
    """Newlines, plus one for each document whose text does not end with one."""
    num_bytes: int = 0
    """UTF-8 bytes of the documents' text (EOS adds none)."""

    def add(self, other: PackCounts) -> None:
        self.num_documents += other.num_documents
        self.num_words += other.num_words
        self.num_line_ends += other.num_line_ends
        self.num_bytes += other.num_bytes


def encode_segments(tok: Tokenizer, segments: Sequence[Segment], dtype: str | np.dtype = np.int64,
                    num_threads: int = 1) -> tuple[np.ndarray, PackCounts]:
    """Token ids of ``segments`` (an EOS after each document's last segment) and the counts of their text."""
    texts = [text + "\n" if ends else text for text, ends in segments]
    try:
        ids = tok.encode_array("".join(texts), dtype=np.dtype(dtype), num_threads=num_threads)
    except (UnicodeEncodeError, TypeError):  # SentencePiece refuses a str it cannot encode as UTF-8
        _refuse_unencodable(texts)
        raise
    newlines = np.array([text.count("\n") for text, _ in segments], dtype=np.int64)
    ends = np.array([ends for _, ends in segments], dtype=bool)
    # the k-th placeholder is newline number (newlines up to and including its segment, placeholders too) - 1
    seen = np.cumsum(newlines + ends)
    positions = np.flatnonzero(ids == tok.newline_id)
    if len(positions) != (int(seen[-1]) if len(seen) else 0):
        raise RuntimeError("the tokenizer emitted a newline id that is not a newline of the text")
    ids[positions[seen[ends] - 1]] = tok.eos_id
    counts = PackCounts(num_documents=int(ends.sum()), num_words=sum(len(t.split()) for t, _ in segments),
                        num_line_ends=int(newlines.sum()) + sum(1 for t, e in segments if e and not t.endswith("\n")),
                        num_bytes=sum(len(t.encode()) for t, _ in segments))
    return ids, counts


def _refuse_unencodable(texts: Sequence[str]) -> None:
    """An :class:`InvalidText` for the first text that is not valid Unicode (a lone surrogate, e.g. from a JSON
    escape such as ``"\\udc80"``); nothing if every text is."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            context = text[max(0, e.start - 20):e.end + 20]
            raise InvalidText(f"a document's text is not valid Unicode ({e.reason} near {context!r}): remove or "
                              f"repair that document") from None


def pack(tok: Tokenizer, tasks: Iterable[Sequence[Segment]], num_threads: int = 1) -> tuple[np.ndarray, PackCounts]:
    """The whole token stream (int64) of ``tasks`` and its counts, in this process (for evaluation splits)."""
    parts, total = [], PackCounts()
    for task in tasks:
        ids, counts = encode_segments(tok, task, np.int64, num_threads)
        parts.append(ids)
        total.add(counts)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), total


# ---------------------------------------------------------------------- worker-process helpers
_worker_tokenizer: Tokenizer | None = None


def init_worker(model_proto: bytes) -> None:
    """Load the tokenizer in a worker process (which ignores SIGINT: :func:`lm.tokenizer.interrupts_held`)."""
    global _worker_tokenizer
    ignore_interrupts()
    _worker_tokenizer = Tokenizer(model_proto)


def encode_task(segments: Sequence[Segment], dtype: str) -> tuple[np.ndarray, PackCounts]:
    """:func:`encode_segments` in a worker (one thread each: the processes already use the cores)."""
    return encode_segments(_worker_tokenizer, segments, dtype, num_threads=1)
