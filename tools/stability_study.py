#!/usr/bin/env python
"""The stability study: ``python tools/stability_study.py [--out DIR] [--quick] [--jobs J] [key=value ...]``
(see ``--help``; the logic is lm.stability, the command line lm.cli.stability_study)."""
import sys

from lm.cli.stability_study import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
