#!/usr/bin/env python
"""The mechanism of a divergence: ``python tools/stability_probe.py RUN_DIR [--work DIR] [key=value ...]`` (see
``--help``; the logic is lm.stability.probe, the command line lm.cli.stability_probe)."""
import sys

from lm.cli.stability_probe import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
