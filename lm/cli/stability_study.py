"""Train a grid of small models, several seeds each, and report which ones diverge and how well the others do.

    python tools/stability_study.py [--out DIR] [--quick] [--grid stability|quality] [--jobs J] [--threads T]
                                    [--lrs 3e-3,1.5e-2,5e-2] [--seeds 1,2,3] [--variants NAME,...] [--plan]
                                    [key=value ...]

Grids (lm.stability.grid): ``stability`` (default) = 5 variants (kernelized PRF / NPRF without RPE,
kernelized_rpe PRF / NPRF, softmax + RPE) x 3 learning rates x 3 seeds of a 2-layer model for 300 steps;
``quality`` = kernelized_rpe NPRF, kernelized NPRF and softmax + RPE at the settings of docs/results.md, 3 seeds,
scored on the test split at contexts 64..2048. ``--quick``: 2 variants x the top learning rate x 2 seeds, 100
steps. ``key=value`` overrides apply to every run (e.g. ``data.path=DIR`` for local WikiText-103 files,
``max_steps=50``); the learning rate, seed, attention kind, feature map, RPE and run_dir are the grid's.

Every run goes through the normal trainer (lm.training.loop.train) in its own process, ``--jobs`` at a time with
``--threads`` threads each (default: the CPU count divided by the jobs), its output in DIR/runs/<run>/log.txt.
Writes DIR/summary.json, DIR/summary.md, DIR/curves.png and DIR/settings.json (the command, the settings, the
time taken and the machine's load average while it ran). Running the same command again reuses the finished
runs and resumes the others. Exit status 0 when every run produced a result (diverged or not), 1 when some run
failed (crashed: see its log), 2 for bad arguments.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

from lm.cli.common import (USER_ERRORS, CommandError, command_parser, number_list, report_error,
                           reports_disk_errors)
from lm.fileio import atomic_write_text
from lm.stability.grid import GRIDS, VARIANTS, build_specs, format_lr, quick, with_choices

DIVERGED_RULE = ("A run **diverged** when the trainer stopped it (divergence.max_bad_steps bad steps in a row, "
                 "non-finite or loss spikes; a run ending inside a bad streak; a final loss above "
                 "divergence.final_loss_factor x its first) **or when any step had a non-finite loss or gradients**, "
                 "even if the run then went on (the skip saved it; without it the NaN would have entered the "
                 "weights). Skipped loss spikes followed by recovery are not divergences: they are counted in the "
                 "spikes column, with the number of runs that recovered from them. Final valid ppl: token "
                 "perplexity of the whole valid split at the training context, non-diverged runs only.")


def parse_args(argv):
    p = command_parser(__doc__)
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every run, e.g. data.path=DIR")
    p.add_argument("--out", type=Path, help="output folder (default runs/<grid>_study[_quick])")
    p.add_argument("--grid", default="stability", choices=sorted(GRIDS))
    p.add_argument("--quick", action="store_true", help="2 variants x top lr x 2 seeds, 100 steps")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, help="threads per run (default: CPU count // jobs, at least 1)")
    p.add_argument("--lrs", help="comma-separated learning rates (default: the grid's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the grid's)")
    p.add_argument("--variants", help=f"comma-separated variants (default: the grid's), of {', '.join(VARIANTS)}")
    p.add_argument("--plan", action="store_true", help="list the runs and exit")
    return p.parse_intermixed_args(argv)


class LoadSampler:
    """The 1-minute load average, sampled every ``every`` seconds in a daemon thread while the study runs."""

    def __init__(self, every: float = 30.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        s = self.samples
        return {"min": min(s), "mean": sum(s) / len(s), "max": max(s), "samples": len(s)}


def _previous_invocations(path: Path) -> list[dict]:
    """The invocations an earlier call of this study recorded in its settings.json ([] if none)."""
    try:
        return list(json.loads(path.read_text()).get("invocations", []))
    except (OSError, ValueError, AttributeError):
        return []


@reports_disk_errors(status=2)
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from lm.config import load_config  # after parsing: a fast --help
    from lm.stability.report import Study, divergence_notes, plot_curves, quality_tables, stability_tables
    from lm.stability.runner import run_all

    try:
        lrs = number_list(args.lrs, "--lrs", float, "3e-3,1.5e-2") if args.lrs else None
        seeds = number_list(args.seeds, "--seeds", int, "0,1,2") if args.seeds else None
        grid = with_choices(GRIDS[args.grid], lrs, seeds,
                            [v for v in args.variants.split(",") if v] if args.variants else None)
        if args.quick:
            grid = quick(grid)
        if args.jobs < 1:
            raise CommandError(f"--jobs={args.jobs} must be >= 1")
        threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // args.jobs)
        if threads < 1:
            raise CommandError(f"--threads={threads} must be >= 1")
        out = args.out or Path("runs") / f"{grid.name.replace('-', '_')}_study"
        overrides = list(args.overrides)
        if not any(o.startswith("data.cache_dir=") for o in overrides):
            overrides.append(f"data.cache_dir={out / 'cache'}")
        specs = build_specs(grid, str(out / "runs"), overrides)
        print(f"{grid.name}: {len(grid.variants)} variants x {len(grid.lrs)} learning rates "
              f"({', '.join(map(format_lr, grid.lrs))}) x {len(grid.seeds)} seeds = {len(specs)} runs; {args.jobs} "
              f"at a time, {threads} thread(s) each; output {out}", flush=True)
        if args.plan:
            for s in specs:
                print(f"  {s.name}")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        from lm.data import prepare_corpus
        prepare_corpus(load_config([], specs[0].overrides).data)  # once, before the runs share the cache
    except USER_ERRORS as e:
        return report_error(e, status=2)

    start, load = time.time(), LoadSampler()
    ran: list = []
    results = run_all(specs, out / "runs", args.jobs, threads, launched=ran)
    seconds, load_avg = time.time() - start, load.stop()
    study = Study(grid, specs, results, out / "runs")
    summary = study.summary()
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    command = "python tools/stability_study.py " + " ".join(map(shlex.quote, argv))
    invocations = _previous_invocations(out / "settings.json")
    invocations.append({"started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(start)),
                        "runs_run": len(ran), "jobs": args.jobs, "threads_per_run": threads,
                        "wall_seconds": seconds, "load_average_1min": load_avg})
    settings = {"command": command, "grid": grid.name, "notes": grid.notes, "settings": list(grid.settings),
                "variants": [v.name for v in grid.variants], "lrs": list(grid.lrs), "seeds": list(grid.seeds),
                "overrides": overrides, "cpu_count": os.cpu_count(), "machine": platform.platform(),
                "invocations": invocations, "runs": {s.name: results.get(s.name, {}).get("seconds") for s in specs}}
    atomic_write_text(out / "settings.json", json.dumps(settings, indent=1) + "\n")
    timing = [f"{i['runs_run']} run(s) in {i['wall_seconds'] / 60:.1f} min with {i['jobs']} job(s) x "
              f"{i['threads_per_run']} thread(s) (started {i['started']}; 1-minute load average "
              f"{i['load_average_1min']['min']:.1f}-{i['load_average_1min']['max']:.1f}, mean "
              f"{i['load_average_1min']['mean']:.1f})" for i in invocations if i["runs_run"]]
    md = [f"# {grid.name} study", "", f"`{command}`", "",
          f"Settings: {grid.notes} (before overrides). Variants: {', '.join(v.name for v in grid.variants)}; "
          f"learning rates {', '.join(map(format_lr, grid.lrs))}; seeds {', '.join(map(str, grid.seeds))}; "
          f"overrides: {' '.join(args.overrides) or 'none'}.", "",
          f"{len(results)} of {len(specs)} runs have a result ({len(specs) - len(results)} failed); on "
          f"{os.cpu_count()} CPUs: " + ("; ".join(timing) or "no run was run by these calls") + ".", "",
          DIVERGED_RULE, "", stability_tables(study), "Why each diverged run counts as diverged:", "",
          divergence_notes(study), ""]
    if any(split == "test" for split, _ in grid.evaluate):
        md += ["## Quality", "", quality_tables(study), ""]
    if "failed" in summary:
        md += ["## Failed runs", ""] + [f"- {f['name']}: {f['why']}" for f in summary["failed"]] + [""]
    atomic_write_text(out / "summary.md", "\n".join(md))
    plot_curves(study, out / "curves.png")
    print(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'curves.png'} ({seconds / 60:.1f} min)")
    if "failed" in summary:
        print(f"error: {len(summary['failed'])} run(s) failed: " +
              "; ".join(f"{f['name']}: {f['why']}" for f in summary["failed"]), file=sys.stderr)
        return 1
    return 0
