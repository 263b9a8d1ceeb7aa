"""SentencePiece tokenizer with an exact round trip: ``decode(encode(text)) == text`` for any text.

How exactness is obtained:
- identity normalisation, no dummy prefix, whitespace kept as is, byte fallback (no ``<unk>`` ever);
- ``encode`` splits the text at ``"\\n"`` itself and emits the reserved newline piece between lines, so a text
  can be tokenized in line-aligned chunks (in parallel) with exactly the result of tokenizing it whole;
- SentencePiece writes spaces as U+2581 ("▁") and turns that character back into a space on decode, so a literal
  U+2581 in the text is emitted as its three UTF-8 byte pieces, which decode to the character itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from lm.errors import UserError
from lm.fileio import atomic_write_bytes

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
NEWLINE = "\n"
_SPACE_MARK = "\u2581"


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be trained or loaded; the message says what to change."""


class Tokenizer:
    """A trained SentencePiece model plus the conventions above. Build with :meth:`train` or :meth:`load`."""

    def __init__(self, model_proto: bytes, meta: dict | None = None):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.meta = dict(meta or {})
        self.hash = hashlib.sha256(self._proto).hexdigest()
        """sha256 of the serialized model: identifies the tokenizer (runs and checkpoints record it)."""
        self.newline_id = self._sp.piece_to_id(NEWLINE)
        self._space_mark_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]
        if self.newline_id == self._sp.unk_id() or self._sp.unk_id() in self._space_mark_ids:
            raise TokenizerError("not an lm tokenizer: it lacks the newline symbol or byte fallback")

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Never produced by :meth:`encode` (byte fallback); kept for completeness."""
        return self._sp.unk_id()

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (what ``tokenizer.model`` holds)."""
        return self._proto

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str, dtype=np.int64, num_threads: int = 1) -> np.ndarray:
        """Token ids of ``text`` as a 1-D array of ``dtype``: what ``encode`` returns, without Python lists.
        ``num_threads`` > 1 lets SentencePiece encode the lines on that many C++ threads."""
        lines = text.split(NEWLINE)
        pieces: list[list[int]] = self._encode_lines(lines, num_threads)
        out = np.empty(sum(map(len, pieces)) + len(lines) - 1, dtype=dtype)
        pos = 0
        for k, ids in enumerate(pieces):
            if k:
                out[pos] = self.newline_id
                pos += 1
            out[pos:pos + len(ids)] = ids
            pos += len(ids)
        return out

    def _encode_lines(self, lines: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        encoded = self._sp.encode(list(lines), num_threads=num_threads)
        if not any(_SPACE_MARK in line for line in lines):
            return encoded
        for k, line in enumerate(lines):
            if _SPACE_MARK in line:  # rare: keep a literal U+2581 as bytes (see module docstring)
                parts = self._sp.encode(line.split(_SPACE_MARK), num_threads=1)
                ids = parts[0]
                for p in parts[1:]:
                    ids = ids + self._space_mark_ids + p
                encoded[k] = ids
        return encoded

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; BOS/EOS ids decode to nothing."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        return self._sp.decode(ids)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.model`` and ``tokenizer.json`` (hash, ids, training settings) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "hash": self.hash, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "newline_id": self.newline_id}
        atomic_write_bytes(directory / MODEL_FILE, self._proto)
        atomic_write_bytes(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
        return directory

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory written by :meth:`save` or from a ``.model`` file."""
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise TokenizerError(f"no tokenizer at {str(path)!r} (expected a directory with {MODEL_FILE} "
                                 f"or a SentencePiece .model file)")
        proto = model.read_bytes()
        meta_file = model.with_name(META_FILE)
        try:
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        except ValueError as e:
            raise TokenizerError(f"{meta_file} is corrupt ({e})") from None
        try:
            tok = cls(proto, meta)
        except RuntimeError as e:
            raise TokenizerError(f"{model} is not a valid SentencePiece model ({e})") from None
        if meta.get("hash", tok.hash) != tok.hash:
            raise TokenizerError(f"{model} does not match the hash in {meta_file} (corrupt or half-written "
                                 f"tokenizer)")
        return tok

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, lines: Iterator[str], vocab_size: int, model_type: str = "bpe",
              character_coverage: float = 1.0, max_sentence_length: int = 16384, num_threads: int = 1,
              meta: dict | None = None) -> "Tokenizer":
        """Train on ``lines`` (strings without newlines). ``vocab_size`` counts the 256 byte pieces,
        ``<unk> <s> </s>`` and the newline symbol too. The result is deterministic for a given ``num_threads``
        (but differs between thread counts).

        Raises :class:`TokenizerError` when the lines cannot support ``vocab_size`` pieces.
        """
        writer = io.BytesIO()
        failed: list[BaseException] = []

        def guarded() -> Iterator[str]:  # SentencePiece would bury an error of the iterator in its own
            try:
                yield from lines
            except BaseException as e:
                failed.append(e)
                raise

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=guarded(), model_writer=writer, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, max_sentence_length=max_sentence_length,
                byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
                remove_extra_whitespaces=False, split_digits=False, user_defined_symbols=[NEWLINE],
                num_threads=max(1, num_threads), minloglevel=2, train_extremely_large_corpus=False)
        except RuntimeError as e:
            if failed:
                raise failed[0] from None
            msg = str(e)
            detail = msg.split('] ')[-1]
            if "smaller than required_chars" in msg:
                raise TokenizerError(f"data.tokenizer.vocab_size={vocab_size} is smaller than the characters the "
                                     f"train split needs: raise data.tokenizer.vocab_size or lower "
                                     f"data.tokenizer.character_coverage (SentencePiece: {detail})") from None
            if "Vocabulary size" in msg:
                raise TokenizerError(f"data.tokenizer.vocab_size={vocab_size} is larger than the train split "
                                     f"supports: lower data.tokenizer.vocab_size (SentencePiece: {detail})") from None
            raise TokenizerError(f"SentencePiece training failed: {msg}") from None
        return cls(writer.getvalue(), meta)


# ---------------------------------------------------------------------- worker-process helpers
# Tokenization fans out over processes (spawned, so they never inherit torch's threads); each worker loads the
# tokenizer once from its serialized model and encodes line-aligned chunks.
_worker_tokenizer: Tokenizer | None = None


@contextlib.contextmanager
def interrupts_held():
    """Hold SIGINT pending in this thread while worker processes are spawned in the block (it is delivered at the
    end of the block, nothing is lost). The workers inherit the mask, so a Ctrl-C, which reaches every process of
    the terminal's group, cannot stop them while they start; :func:`ignore_interrupts` then makes them deaf to it.
    The parent alone decides what Ctrl-C means (it stops the pool), and no worker prints a traceback of its own."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if signal.SIGINT not in held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def ignore_interrupts() -> None:
    """In a worker process spawned under :func:`interrupts_held`: ignore SIGINT from now on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def init_worker(model_proto: bytes) -> None:
    """Load the tokenizer in a worker process (which ignores SIGINT: :func:`interrupts_held`)."""
    global _worker_tokenizer
    ignore_interrupts()
    _worker_tokenizer = Tokenizer(model_proto)


def encode_chunk(text: str, dtype: str) -> tuple[np.ndarray, int, int]:
    """A text chunk -> (token ids as ``dtype``, whitespace-delimited words, UTF-8 bytes). Runs in a worker
    (one thread each: the processes already use the cores)."""
    return encode_chunk_with(_worker_tokenizer, text, dtype, num_threads=1)


def encode_chunk_with(tok: Tokenizer, text: str, dtype: str, num_threads: int) -> tuple[np.ndarray, int, int]:
    return tok.encode_array(text, np.dtype(dtype), num_threads), len(text.split()), len(text.encode())
