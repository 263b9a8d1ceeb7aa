#!/usr/bin/env python
"""Write local lm-eval tasks over a WikiText-format text file (no hub needed): see lm/harness_tasks.py.

    python tools/harness_tasks.py wiki.test.tokens DIR [--prefix wikitext_local] [--num-questions 200]

then `python tools/harness.py RUN_DIR --tasks wikitext_local_rolling,wikitext_local_next_word --include-path DIR`.
"""
import sys

from lm.harness_tasks import main

if __name__ == "__main__":
    sys.exit(main())
