#!/usr/bin/env python
"""Passkey retrieval accuracy per context and needle depth: ``python tools/eval_passkey.py --help`` (the command
line is lm/cli/eval_passkey.py)."""
import sys

from lm.cli.eval_passkey import main

if __name__ == "__main__":
    sys.exit(main())
