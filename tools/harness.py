#!/usr/bin/env python
"""Evaluate a trained model with EleutherAI's lm-evaluation-harness: ``python tools/harness.py --help`` (the
command line is lm/cli/harness.py)."""
import sys

from lm.cli.harness import main

if __name__ == "__main__":
    sys.exit(main())
