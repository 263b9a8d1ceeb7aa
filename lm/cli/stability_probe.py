"""What the attention looked like on the way to a run's first bad step (the mechanism of a divergence).

    python tools/stability_probe.py RUN_DIR [--work DIR] [--snapshots K] [--until STEP] [--json PATH] [key=value ...]

RUN_DIR is a run whose steps.jsonl has a bad step F (e.g. a diverged run of tools/stability_study.py). The probe
retrains the run's stored config into --work (default RUN_DIR/probe) up to step F - 1, with about K checkpoints
on the way (the normal trainer: the weights are the run's own, bit for bit), then runs the batch of each next step
forward and backward with the kernelized layers instrumented, and prints per step and layer: the loss, the
gradient norm, the largest |q| and |k| as the feature map sees them, the extremes of the keys' log-features, the
fraction of keys whose features all underflowed to 0, the smallest attention normaliser, the fraction of
positions whose normaliser is below 1e-30, the largest |dL/dphi_k|, and the parameters whose gradient is not
finite. The last line is the bad step itself, measured at the weights that produced it. ``key=value`` overrides
apply to the stored config (e.g. ``data.path=DIR``). ``--until STEP`` probes up to STEP instead of the first bad
step (e.g. a run that did not diverge, for comparison). Writes the figures as JSON (default WORK/probe.json).
"""
from __future__ import annotations

import json
from pathlib import Path

from lm.cli.common import USER_ERRORS, CommandError, command_parser, report_error, reports_disk_errors
from lm.fileio import atomic_write_text


@reports_disk_errors(status=2)
def main(argv: list[str] | None = None) -> int:
    p = command_parser(__doc__)
    p.add_argument("run_dir", type=Path, help="a run directory whose steps.jsonl has a bad step")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.path=DIR")
    p.add_argument("--work", type=Path, help="where to retrain (default RUN_DIR/probe); must not hold checkpoints")
    p.add_argument("--snapshots", type=int, default=6, help="checkpoints on the way to the bad step")
    p.add_argument("--until", type=int, help="probe up to this step instead of the first bad one")
    p.add_argument("--json", type=Path, help="where to write the figures (default WORK/probe.json)")
    args = p.parse_intermixed_args(argv)
    from lm.stability.probe import format_probe, probe_run  # after parsing: a fast --help

    work = args.work or args.run_dir / "probe"
    try:
        if args.snapshots < 1:
            raise CommandError(f"--snapshots={args.snapshots} must be >= 1")
        if args.until is not None and args.until < 2:
            raise CommandError(f"--until={args.until} must be >= 2")
        if not (args.run_dir / "steps.jsonl").is_file():
            raise CommandError(f"{args.run_dir} has no steps.jsonl: give a run directory of the trainer")
        if (work / "checkpoints").is_dir() and any((work / "checkpoints").iterdir()):
            raise CommandError(f"--work={work} already holds checkpoints; give another --work (nothing was "
                               f"overwritten)")
        try:
            result = probe_run(args.run_dir, work, args.snapshots, args.overrides, args.until)
        except ValueError as e:
            if "no bad step" in str(e):
                raise CommandError(str(e)) from None
            raise
    except USER_ERRORS as e:
        return report_error(e, status=2)
    print(format_probe(result))
    path = args.json or work / "probe.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0
