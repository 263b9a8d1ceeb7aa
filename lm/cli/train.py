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

from lm.cli.common import USER_ERRORS, CommandError, report_error

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
            raise CommandError(f"unknown option {f!r}: usage: train.py [CONFIG.yaml] [key=value ...] (--help lists "
                               f"the keys)")
    return files, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train.py [CONFIG.yaml ...] [key=value ...]``; returns the process exit status (see the
    module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return EXIT_OK
    from lm.config import load_config  # after the --help check: it answers without loading torch
    from lm.training.distributed import shutdown
    from lm.training.loop import TrainingStopped, train
    from lm.training.preemption import TrainingPreempted

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


def help_text() -> str:
    """``--help``: usage, what the command does (this module's docstring) and every config key."""
    from lm.cli.common import format_config_keys

    return (f"usage: train.py [CONFIG.yaml ...] [key=value ...]\n\n{__doc__.strip()}\n\nShipped configs: "
            f"configs/*.yaml. Files merge in order, then key=value overrides; every run directory\ngets the "
            f"resolved config.yaml.\n\n{format_config_keys()}")
