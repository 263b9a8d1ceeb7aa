"""Our tokenizer (:mod:`lm.tokenizer`) as a transformers tokenizer that ``AutoTokenizer`` loads without remote
code: a ``tokenizer.json`` for the `tokenizers` library giving exactly our token ids.

How the same ids come out of the `tokenizers` BPE model:

- pieces are our SentencePiece BPE pieces with its space mark U+2581 written as a real space, so no normaliser
  is needed, and a literal U+2581 in the text (which no piece contains any more) falls back to its three UTF-8
  byte pieces, as our tokenizer emits it;
- merges are derived from the pieces, ranked by piece id (SentencePiece orders BPE pieces by score);
- the newline symbol is an added token, so the text is split at newlines as our tokenizer splits it;
- ``split_special_tokens``: ``<s>`` / ``</s>`` / ``<unk>`` written in a text are text (as for our tokenizer),
  never the special tokens;
- by default a BOS is put in front (``add_special_tokens``), as our tools do before scoring or generating.

:func:`save_hf_tokenizer` checks the result on a text sample before it writes anything: a tokenizer whose ids
would differ is never exported.
"""
from __future__ import annotations

from pathlib import Path

from lm.tokenizer import NEWLINE, Tokenizer

__all__ = ["hf_tokenizer", "save_hf_tokenizer"]

_SPACE_MARK = "\u2581"
_KEEP_AS_IS = (2, 3, 6)  # SentencePiece piece types UNKNOWN, CONTROL, BYTE: names, not text
CHECK_TEXT = ("The quick brown fox, 37 @-@ 42 .\n\n  = = Heading = =  \n<unk> <s> x</s> \u2581lit\u2581 \t tab "
              "na\u00efve caf\u00e9 \u4e2d\u6587 \U0001F600 end")
"""A sample that touches spaces, newlines, digits, special-token text, U+2581, tabs and byte fallback."""


def hf_tokenizer(tokenizer: Tokenizer):
    """A transformers ``PreTrainedTokenizerFast`` that encodes and decodes exactly as ``tokenizer``."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    if proto.trainer_spec.model_type != 2:  # BPE
        raise ValueError("only BPE tokenizers (data.tokenizer.model_type=bpe) export to a tokenizer.json here")
    vocab = {(p.piece if p.type in _KEEP_AS_IS else p.piece.replace(_SPACE_MARK, " ")): i
             for i, p in enumerate(proto.pieces)}
    backend = Backend(models.BPE(vocab=vocab, merges=generate_merges(vocab), byte_fallback=True,
                                 unk_token=tokenizer.id_to_piece(tokenizer.unk_id), fuse_unk=False))
    specials = [tokenizer.id_to_piece(i) for i in (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id)]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    backend.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    bos = specials[1]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokenizer.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=specials[0], bos_token=bos,
                                   eos_token=specials[2], pad_token=specials[2], split_special_tokens=True,
                                   clean_up_tokenization_spaces=False, padding_side="left")


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, check_texts: tuple[str, ...] = ()) -> None:
    """Write the transformers tokenizer files of ``tokenizer`` into ``directory``, after checking on
    :data:`CHECK_TEXT` and ``check_texts`` that it gives exactly ``tokenizer``'s ids (BOS first) and decodes
    them back to the text; a ValueError naming the first difference otherwise."""
    fast = hf_tokenizer(tokenizer)
    for text in (CHECK_TEXT, *check_texts):
        want = [tokenizer.bos_id, *tokenizer.encode(text)]
        got = fast(text)["input_ids"]
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ValueError(f"the transformers tokenizer differs from ours at token {at} of {text[:60]!r}: "
                             f"{[fast.convert_ids_to_tokens(i) for i in got[at:at + 3]]} != "
                             f"{[tokenizer.id_to_piece(i) for i in want[at:at + 3]]}")
        if fast.decode(got, skip_special_tokens=True) != text:
            raise ValueError(f"the transformers tokenizer does not decode {text[:60]!r} back to itself")
    fast.save_pretrained(str(directory))
