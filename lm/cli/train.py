"""Command line of training: ``python tools/train.py [CONFIG.yaml ...] [key=value ...]`` (one process, plain
torch), the same arguments to ``./launch.sh`` (DeepSpeed on every GPU / CPU ranks), to ``torchrun
--nproc_per_node N tools/train.py`` or to ``srun python tools/train.py`` (DeepSpeed; docs/clusters.md).

Exit statuses (also what ``launch.sh`` and ``srun`` return; ``torchrun`` reports any non-zero status as 1):

    0   the run reached its last step (or stop_at)
    1   an error the user can fix (one ``error: ...`` line: config, data, run directory, checkpoint)
    3   the run diverged, or ended far above its first loss (the message names the last good checkpoint)
    75  stopped early on request, after saving: a signal of preemption.signals or time_limit_minutes;
        re-running the same command resumes (75 is EX_TEMPFAIL of sysexits.h: "try again later")
"""
from __future__ import annotations

import sys
from typing import Sequence

from lm.cli.common import USER_ERRORS, report_error
from lm.config import ConfigError, load_config
from lm.training.distributed import shutdown
from lm.training.loop import TrainingStopped, train
from lm.training.preemption import TrainingPreempted

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


def parse_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[CONFIG.yaml ...] [key=value ...]`` -> (config files, overrides)."""
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    for f in files:
        if f.startswith("-"):
            raise ConfigError(f"unknown option {f!r}: usage: train.py [CONFIG.yaml] [key=value ...]")
    return files, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train.py [CONFIG.yaml ...] [key=value ...]``; returns the process exit status (see the
    module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: train.py [CONFIG.yaml ...] [key=value ...]\n\nTrain a language model. Keys are the fields of "
              "lm.config.TrainConfig (e.g. run_dir=runs/x max_steps=1000 model.attention.kind=softmax); every run "
              "directory gets the resolved config.yaml. Shipped configs: configs/*.yaml.\n\nExit status: 0 done, "
              f"{EXIT_ERROR} error, {EXIT_DIVERGED} diverged, {EXIT_PREEMPTED} stopped early by a signal or "
              "time_limit_minutes after saving (re-run the same command to resume).")
        return EXIT_OK
    try:
        files, overrides = parse_argv(argv)
        train(load_config(files, overrides))
    except USER_ERRORS as e:
        return report_error(e, status=EXIT_ERROR)
    except TrainingStopped as e:
        return report_error(e, status=EXIT_DIVERGED)
    except TrainingPreempted:
        return EXIT_PREEMPTED  # rank 0 has printed where it saved
    finally:
        shutdown()
    return EXIT_OK
