#!/usr/bin/env python
"""Sample text from a trained model: ``python tools/generate.py --help`` (the command line is
lm/cli/generate.py)."""
import sys

from lm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
