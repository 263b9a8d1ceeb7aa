#!/usr/bin/env python
"""Prepare the tokenizer and token caches ahead of training: ``python tools/prepare_data.py CONFIG [key=value ...]``
(the command line is lm/cli/prepare_data.py)."""
import sys

from lm.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
