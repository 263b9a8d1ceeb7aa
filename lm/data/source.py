"""What a text source of lines produces: a :class:`SplitSource` (one split, located and fingerprinted, not
loaded), and the helpers that cut text into line-aligned chunks and fingerprint it; :class:`DataError`, the error
of every data problem the user can fix. (A corpus of documents is a :class:`lm.data.documents.DocumentSource`.)

A source fingerprint is the sha256 of the split's exact UTF-8 text; caches are keyed by it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from lm.errors import UserError

SPLITS = ("train", "valid", "test")
CHUNK_CHARS = 1 << 20
"""Characters per line-aligned piece of text handed to the tokenizer (and its worker processes)."""


class DataError(UserError, ValueError):
    """Data that cannot be prepared or used; the message says what to change."""


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


class LineEnds:
    """Counts the line ends of a text read in pieces: every newline, plus one for a last line that lacks it.

    WikiText-103's word-level token count (the denominator of every published perplexity on it: valid 217,646,
    test 245,569) is the whitespace-delimited words plus one end-of-line token per line, blank lines included.
    Counting a missing final newline as a line end makes a file with and without its trailing newline count
    the same. The rule is applied to every text layout (``.tokens``, ``.raw``, ``.txt``, the hub): it is only
    the literature's number on the tokenized WikiText files, since ``.raw`` text joins ``@-@`` splits and so has
    fewer whitespace words.
    """

    def __init__(self) -> None:
        self.newlines = 0
        self.last = ""

    def add(self, piece: str) -> str:
        """Count ``piece`` (the next piece of the text, in order); returns it unchanged."""
        self.newlines += piece.count("\n")
        if piece:
            self.last = piece[-1]
        return piece

    @property
    def count(self) -> int:
        return self.newlines + (self.last not in ("", "\n"))


def text_chunks(text: str) -> Iterator[str]:
    """``text`` in line-aligned pieces of about :data:`CHUNK_CHARS` characters."""
    start = 0
    while start < len(text):
        end = text.find("\n", min(start + CHUNK_CHARS, len(text)) - 1)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def row_chunks(rows: Iterator[list[str]]) -> Iterator[str]:
    """Batches of line rows (each ending in a newline) -> pieces of about :data:`CHUNK_CHARS` characters."""
    buf: list[str] = []
    size = 0
    for batch in rows:
        buf.extend(batch)
        size += sum(map(len, batch))
        if size >= CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)
