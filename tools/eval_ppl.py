#!/usr/bin/env python
"""Perplexity of a trained model on a WikiText-103 split, sliding windows: ``python tools/eval_ppl.py --help``
(the command line is lm/cli/eval_ppl.py)."""
import sys

from lm.cli.eval_ppl import main

if __name__ == "__main__":
    sys.exit(main())
