#!/usr/bin/env python
"""Export a trained model to Hugging Face transformers: ``python tools/export_hf.py --help`` (the command line is
lm/cli/export_hf.py)."""
import sys

from lm.cli.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
