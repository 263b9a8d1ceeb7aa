"""A study's reports: ``summary.json`` (the schema below), ``summary.md`` (tables per learning rate; for the
quality grid also test perplexity and length extrapolation, mean +- std over seeds) and ``curves.png`` (training
loss, one panel per variant and learning rate, seeds overlaid, bad steps and divergences marked).

``summary.json``::

    {"variants": [{"name", "kind", "feature_map", "rpe", "lr",
                   "runs": [{"seed", "diverged", "first_bad_step", "steps_completed", "final_valid_ppl",
                             "max_grad_norm", "loss_spikes"}, ...]}, ...]}

plus ``"failed": [{"name", "seed", "lr", "why"}]`` only when a run could not be run (a crash, not a divergence).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

from lm.config import load_config
from lm.fileio import atomic_write
from lm.stability.grid import Grid, RunSpec, format_lr
from lm.stability.verdict import (Outcome, divergence_reasons, nonfinite_steps, stop_cause,
                                  summarize_run)
from lm.training.steplog import FILE as STEPS_FILE
from lm.training.steplog import read_steps

VARIANT_FIELDS = ("name", "kind", "feature_map", "rpe", "lr", "runs")


def run_records(run_dir: Path) -> list[dict]:
    """The run's ``steps.jsonl`` records ([] when it has none)."""
    path = run_dir / STEPS_FILE
    return read_steps(path) if path.is_file() else []


def _evaluation(result: dict, split: str, context: int) -> Optional[dict]:
    """The evaluation of ``split`` at ``context`` in a run's ``result.json`` (None if it was not scored)."""
    return next((e for e in result.get("evaluations", []) if e["split"] == split and e["context"] == context), None)


class Study:
    """The runs of a grid and their results, joined: ``Study(grid, specs, results, runs_dir)``."""

    def __init__(self, grid: Grid, specs: Sequence[RunSpec], results: dict[str, dict], runs_dir: Path):
        self.grid, self.specs, self.results, self.runs_dir = grid, list(specs), results, Path(runs_dir)
        self.records = {s.name: run_records(self.runs_dir / s.name) for s in self.specs}
        configs = {s.name: load_config([], s.overrides) for s in self.specs}
        self.max_bad = {name: cfg.divergence.max_bad_steps for name, cfg in configs.items()}
        self.context = {name: cfg.data.seq_len for name, cfg in configs.items()}

    def ok(self, spec: RunSpec) -> bool:
        """The run has a result (diverged or not), not an error or a crash."""
        r = self.results.get(spec.name)
        return r is not None and "outcome" in r

    def outcome(self, spec: RunSpec) -> Outcome:
        return Outcome(**self.results[spec.name]["outcome"])

    def run_summary(self, spec: RunSpec) -> dict:
        valid = self.evaluation(spec, "valid")
        return summarize_run(spec.seed, self.records[spec.name], self.outcome(spec), self.max_bad[spec.name],
                             None if valid is None else valid["token_perplexity"])

    def evaluation(self, spec: RunSpec, split: str, context: Optional[int] = None) -> Optional[dict]:
        """The run's evaluation of ``split`` at ``context`` (None: its training context), or None."""
        return _evaluation(self.results[spec.name], split, context or self.context[spec.name])

    def cells(self):
        """((variant, lr), the specs of its seeds) in grid order."""
        for variant in self.grid.variants:
            for lr in self.grid.lrs:
                yield (variant, lr), [s for s in self.specs if s.variant == variant and s.lr == lr]

    def summary(self) -> dict:
        """The ``summary.json`` object."""
        variants, failed = [], []
        for (variant, lr), specs in self.cells():
            runs = [self.run_summary(s) for s in specs if self.ok(s)]
            failed += [{"name": s.name, "seed": s.seed, "lr": s.lr, "why": self.failure(s)} for s in specs
                       if not self.ok(s)]
            variants.append({"name": variant.name, "kind": variant.kind, "feature_map": variant.feature_map,
                             "rpe": variant.rpe, "lr": lr, "runs": runs})
        out = {"variants": variants}
        if failed:
            out["failed"] = failed
        return out

    def failure(self, spec: RunSpec) -> str:
        r = self.results.get(spec.name)
        if r is not None and "error" in r:
            return f"error: {r['error']}"
        return f"no result (crashed or interrupted): see {self.runs_dir / spec.name / 'log.txt'}"


# ------------------------------------------------------------------------------------------------ numbers
def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None where undefined: no value / one value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: Sequence[float], decimals: int = 2) -> str:
    """``"158.66 ± 1.20 (3)"``: mean ± sample std (number of values); ``—`` without values."""
    mean, std = mean_std(values)
    n = sum(1 for v in values if v is not None and math.isfinite(v))
    if mean is None:
        return "—"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f} ({n})" if std is not None else f"{mean:.{decimals}f} (1)"


def _steps_list(values: Sequence[Optional[int]]) -> str:
    return ", ".join("—" if v is None else str(v) for v in values) or "—"


# ------------------------------------------------------------------------------------------------ markdown
def stability_tables(study: Study) -> str:
    """An overview (diverged / seeds for every variant and learning rate) and one table per learning rate."""
    lrs = study.grid.lrs
    lines = ["| variant | " + " | ".join(f"lr {format_lr(lr)}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for variant in study.grid.variants:
        cells = []
        for lr in lrs:
            runs = [study.run_summary(s) for s in study.specs if s.variant == variant and s.lr == lr and study.ok(s)]
            cells.append(f"{sum(r['diverged'] for r in runs)} / {len(runs)} diverged")
        lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
    out = ["Diverged runs (of the seeds run) per variant and learning rate:", "", *lines, ""]
    for lr in lrs:
        out += [f"### lr {format_lr(lr)}", "",
                "| variant | diverged | stopped by (per seed) | first bad step | steps completed | non-finite steps | "
                "loss spikes skipped (runs that recovered) | max grad norm | final valid ppl (mean ± std, n) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for (variant, cell_lr), specs in study.cells():
            if cell_lr != lr:
                continue
            ok = [s for s in specs if study.ok(s)]
            runs = [study.run_summary(s) for s in ok]
            nonfinite = [len(nonfinite_steps(study.records[s.name])) for s in ok]
            recovered = sum(1 for r in runs if r["loss_spikes"] and not r["diverged"])
            grads = [r["max_grad_norm"] for r in runs if r["max_grad_norm"] is not None]
            grad = f"{max(grads):.3g}" if grads else "—"
            stops = ", ".join(stop_cause(study.records[s.name], study.outcome(s)) or "—" for s in ok)
            out.append(f"| {variant.name} | {sum(r['diverged'] for r in runs)} / {len(runs)} | {stops or '—'} | "
                       f"{_steps_list([r['first_bad_step'] for r in runs])} | "
                       f"{_steps_list([r['steps_completed'] for r in runs])} | {_steps_list(nonfinite)} | "
                       f"{sum(r['loss_spikes'] for r in runs)} ({recovered}) | {grad} | "
                       f"{format_mean_std([r['final_valid_ppl'] for r in runs])} |")
        out.append("")
    return "\n".join(out)


def divergence_notes(study: Study) -> str:
    """One line per diverged run: why (the rule of :mod:`lm.stability.verdict`)."""
    lines = []
    for spec in study.specs:
        if study.ok(spec):
            reasons = divergence_reasons(study.records[spec.name], study.outcome(spec), study.max_bad[spec.name])
            if reasons:
                lines.append(f"- {spec.name}: {'; '.join(reasons)}")
    return "\n".join(lines) if lines else "- none"


def quality_tables(study: Study) -> str:
    """Mean ± std over seeds: valid/test token ppl, test word ppl (WikiText-103 convention), test bits per byte;
    then test word and token perplexity against the evaluation context."""
    def values(specs, split, context, key):
        out = []
        for s in specs:
            if study.ok(s) and not study.run_summary(s)["diverged"]:
                e = study.evaluation(s, split, context)
                out.append(None if e is None else e[key])
        return out

    lines = ["| attention | valid token ppl | valid word ppl | test token ppl | test word ppl | test bits/byte |",
             "|---|---|---|---|---|---|"]
    for (variant, _), specs in study.cells():
        lines.append(f"| {variant.name} | {format_mean_std(values(specs, 'valid', None, 'token_perplexity'))} | "
                     f"{format_mean_std(values(specs, 'valid', None, 'word_perplexity'), 1)} | "
                     f"{format_mean_std(values(specs, 'test', None, 'token_perplexity'))} | "
                     f"{format_mean_std(values(specs, 'test', None, 'word_perplexity'), 1)} | "
                     f"{format_mean_std(values(specs, 'test', None, 'bits_per_byte'), 4)} |")
    contexts = sorted({c for _, cs in study.grid.evaluate if cs for c in cs})
    if contexts:
        for key, what, decimals in (("word_perplexity", "test word perplexity (WikiText-103 convention)", 1),
                                    ("token_perplexity", "test token perplexity", 2)):
            lines += ["", f"{what} against the evaluation context (mean ± std over seeds):", "",
                      "| attention | " + " | ".join(map(str, contexts)) + " |", "|---|" + "---|" * len(contexts)]
            for (variant, _), specs in study.cells():
                lines.append(f"| {variant.name} | " + " | ".join(
                    format_mean_std(values(specs, "test", c, key), decimals)
                    for c in contexts) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the plot
def plot_curves(study: Study, path: Path) -> None:
    """Training loss of every run, one panel per (variant, lr), seeds overlaid; skipped loss spikes as
    triangles, non-finite steps as crosses, the stop of a diverged run as a large X with its step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(study.grid.variants), len(study.grid.lrs)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False, sharex=True, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    losses = [r["loss"] for recs in study.records.values() for r in recs if r["loss"] is not None]
    first = max((recs[0]["loss"] for recs in study.records.values() if recs and recs[0]["loss"]), default=10.0)
    low = min((r["loss"] for recs in study.records.values() for r in recs if not r["bad"] and r["loss"]),
              default=0.0)
    top = min(max(losses, default=first), 1.6 * first) + 0.3  # spikes up to 1.6 x the first loss stay in view
    max_step = max((recs[-1]["step"] for recs in study.records.values() if recs), default=1)
    for i, variant in enumerate(study.grid.variants):
        for j, lr in enumerate(study.grid.lrs):
            ax = axes[i][j]
            specs = [s for s in study.specs if s.variant == variant and s.lr == lr]
            n_div = 0
            for k, spec in enumerate(specs):
                recs, c = study.records[spec.name], colours[k % len(colours)]
                good = [(r["step"], r["loss"]) for r in recs if not r["bad"]]
                if good:
                    ax.plot(*zip(*good), color=c, lw=0.9, alpha=0.85, label=f"seed {spec.seed}")
                spikes = [(r["step"], min(r["loss"], top)) for r in recs if r["bad"] == "spike"]
                if spikes:
                    ax.scatter(*zip(*spikes), marker="^", s=22, color=c, edgecolors="black", linewidths=0.4, zorder=3)
                nonfinite = [(r["step"], min(r["loss"], top) if r["loss"] is not None else top) for r in recs
                             if r["bad"] in ("loss", "gradients")]
                if nonfinite:
                    ax.scatter(*zip(*nonfinite), marker="x", s=22, color=c, zorder=3)
                if study.ok(spec) and study.run_summary(spec)["diverged"]:
                    n_div += 1
                    last = recs[-1]["step"] if recs else 0
                    y = next((r["loss"] for r in reversed(recs) if r["loss"] is not None), top)
                    ax.scatter([last], [min(y, top)], marker="X", s=110, color="red", edgecolors="black",
                               linewidths=0.6, zorder=4)
                    ax.annotate(f"{last}", (last, min(y, top)), textcoords="offset points", xytext=(5, 4),
                                fontsize=7, color="red")
            ax.set_title(f"{variant.name}, lr {format_lr(lr)}" + (f": {n_div}/{len(specs)} diverged" if n_div
                                                                  else ""), fontsize=9,
                         color="red" if n_div else "black")
            ax.set_ylim(max(0.0, low - 0.3), top)
            ax.set_xlim(0, max_step)
            ax.grid(alpha=0.3)
            if i == rows - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("train loss (nats)")
            if i == 0 and j == 0:
                from matplotlib.lines import Line2D
                handles, _ = ax.get_legend_handles_labels()
                handles += [Line2D([], [], ls="", marker="^", color="gray", mec="black", mew=0.4,
                                   label="skipped loss spike (top edge: off scale)"),
                            Line2D([], [], ls="", marker="x", color="gray", label="non-finite step"),
                            Line2D([], [], ls="", marker="X", ms=9, color="red", mec="black", mew=0.6,
                                   label="diverged: its last step")]
                ax.legend(handles=handles, fontsize=6.5, loc="upper right")
    fig.suptitle(f"{study.grid.name}: training loss per step", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
