#!/usr/bin/env python
"""Write local lm-eval tasks over a WikiText-format text file: ``python tools/harness_tasks.py --help`` (the
command line is lm/cli/harness_tasks.py)."""
import sys

from lm.cli.harness_tasks import main

if __name__ == "__main__":
    sys.exit(main())
