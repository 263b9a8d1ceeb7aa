"""Prepare the tokenizer and token caches ahead of training (training also does it on demand).

    python tools/prepare_data.py CONFIG [key=value ...]

Prints one line per split: tokens, words, lines (or documents, for a documents corpus), bytes, tokens per word,
and the cache file (a folder of token files for a documents corpus).
"""
from __future__ import annotations

import logging
import time

from lm.cli.common import USER_ERRORS, command_parser, report_error


EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command ended by Ctrl-C."""


def main(argv: list[str] | None = None) -> int:
    p = command_parser(__doc__, epilog="Config keys: python tools/train.py --help lists every one (the data.* keys "
                                       "are the ones used here); docs/training.md#configs explains them.")
    p.add_argument("config", help="YAML config file (its data section is used)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.path=DIR data.num_proc=4")
    p.add_argument("--splits", default="train,valid,test", help="comma-separated splits to prepare")
    p.add_argument("--run-dir", action="store_true", help="also save the tokenizer into the config's run_dir")
    args = p.parse_args(argv)
    from lm.config import load_config  # after parsing: a fast --help
    from lm.data import prepare_corpus

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg = load_config([args.config], args.overrides)
        start = time.perf_counter()
        corpus = prepare_corpus(cfg.data, run_dir=cfg.run_dir if args.run_dir else None,
                                splits=[s for s in args.splits.split(",") if s])
        seconds = time.perf_counter() - start
    except USER_ERRORS as e:
        return report_error(e, status=2)
    except KeyboardInterrupt:
        return report_error("interrupted: what was complete is kept (a half-built cache is never used); run the same "
                            "command again to go on", status=EXIT_INTERRUPTED)
    tok = corpus.tokenizer
    print(f"tokenizer {tok.hash[:16]} vocab {tok.vocab_size} (built: {', '.join(corpus.built) or 'nothing'}; "
          f"{seconds:.1f} s)")
    for s in corpus.splits.values():
        units = f"{s.num_documents:>9,} docs " if s.num_documents else f"{s.num_line_ends:>9,} lines"
        print(f"{s.name:5s} {s.num_tokens:>12,} tokens {s.num_words:>12,} words {units} {s.num_bytes:>13,} bytes "
              f"{s.num_tokens / max(1, s.num_words):.3f} tokens/word  {s.path}")
    return 0
