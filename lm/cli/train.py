"""Command line of training: ``python tools/train.py [CONFIG.yaml ...] [key=value ...]`` (one process, plain
torch), or the same arguments to ``./launch.sh`` (DeepSpeed on every GPU / CPU ranks)."""
from __future__ import annotations

import sys
from typing import Sequence

from lm.cli.common import USER_ERRORS, report_error
from lm.config import ConfigError, load_config
from lm.training.distributed import shutdown
from lm.training.loop import TrainingStopped, train


def parse_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[CONFIG.yaml ...] [key=value ...]`` -> (config files, overrides)."""
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    for f in files:
        if f.startswith("-"):
            raise ConfigError(f"unknown option {f!r}: usage: train.py [CONFIG.yaml] [key=value ...]")
    return files, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train.py [CONFIG.yaml ...] [key=value ...]``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: train.py [CONFIG.yaml ...] [key=value ...]\n\nTrain a language model. Keys are the fields of "
              "lm.config.TrainConfig (e.g. run_dir=runs/x max_steps=1000 model.attention.kind=softmax); every run "
              "directory gets the resolved config.yaml. Shipped configs: configs/*.yaml.")
        return 0
    try:
        files, overrides = parse_argv(argv)
        train(load_config(files, overrides))
    except (USER_ERRORS, TrainingStopped) as e:
        return report_error(e, status=1)
    finally:
        shutdown()
    return 0
