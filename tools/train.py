#!/usr/bin/env python
"""Train a model: ``python tools/train.py [CONFIG.yaml] [key=value ...]`` (one process, plain torch), or the same
arguments to ``./launch.sh`` (DeepSpeed on every GPU / CPU ranks). See configs/ for the shipped settings."""
import sys

from lm.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
