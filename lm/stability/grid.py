"""What a study trains: the model variants, the grids (variants x learning rates x seeds), and the settings of
every run as ``key=value`` overrides of :class:`lm.config.TrainConfig` (the normal trainer's config).

Two grids:

- ``stability`` (the default): five variants (PRF and NPRF, with and without RPE, and softmax with RPE) at three learning rates, three seeds each, on a small
  model trained briefly; what is measured is whether and when training breaks (:mod:`lm.stability.verdict`).
- ``quality``: the three attention kinds at the settings of docs/results.md ("Quality") (the paper's model scaled down to
  the CPU), three seeds, one learning rate; what is measured is test perplexity and length extrapolation.

``--quick`` shrinks the stability grid to 2 variants x the top learning rate x 2 seeds and fewer steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence



@dataclass(frozen=True)
class Variant:
    """One model of the study: attention kind, feature map and RPE (the rest of the settings are the grid's)."""

    name: str
    kind: str
    """``model.attention.kind``."""
    feature_map: Optional[str]
    """``model.attention.feature_map`` (None for softmax, which has none)."""
    rpe: str
    """``model.attention.rpe``."""

    def overrides(self) -> list[str]:
        out = [f"model.attention.kind={self.kind}", f"model.attention.rpe={self.rpe}"]
        if self.feature_map is not None:
            out.append(f"model.attention.feature_map={self.feature_map}")
        return out


KERNELIZED_PRF = Variant("kernelized_prf", "kernelized", "prf", "none")  # Performer: the claimed-unstable baseline
KERNELIZED_NPRF = Variant("kernelized_nprf", "kernelized", "nprf", "none")
KERNELIZED_RPE_PRF = Variant("kernelized_rpe_prf", "kernelized_rpe", "prf", "per_offset")
KERNELIZED_RPE_NPRF = Variant("kernelized_rpe_nprf", "kernelized_rpe", "nprf", "per_offset")  # the paper
SOFTMAX_RPE = Variant("softmax_rpe", "softmax", None, "per_offset")  # exact attention, the reference

VARIANTS = {v.name: v for v in (KERNELIZED_PRF, KERNELIZED_NPRF, KERNELIZED_RPE_PRF, KERNELIZED_RPE_NPRF,
                                SOFTMAX_RPE)}


@dataclass(frozen=True)
class Grid:
    """A study: ``variants`` x ``lrs`` x ``seeds``, each run with ``settings`` (``key=value``) and its own
    variant, learning rate and seed; ``evaluate`` lists what is scored after a run that did not diverge, as
    ``(split, contexts)`` (contexts: tokens per window; ``None`` = the training context)."""

    name: str
    variants: tuple[Variant, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    settings: tuple[str, ...]
    evaluate: tuple[tuple[str, Optional[tuple[int, ...]]], ...] = (("valid", None),)
    notes: str = ""


_SMALL_MODEL = ("model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.dropout=0.0",
                "model.attention.num_features=64", "data.tokenizer.vocab_size=4096")
_RUN = ("engine=torch", "compute.precision=fp32", "data.num_proc=1", "data.progress=false", "eval_every=0",
        "save_every=1000000", "keep_checkpoints=1", "optim.schedule=cosine", "optim.min_lr_ratio=0.1",
        "optim.grad_clip=1.0", "optim.weight_decay=0.01", "optim.beta1=0.9", "optim.beta2=0.98")

STABILITY_LRS = (1e-2, 5e-2, 1.5e-1)
"""Comfortable (every variant trained in single-seed probes up to 1.5e-2), where PRF broke in the probes (3e-2 and
5e-2), and where NPRF without RPE broke too (1.5e-1) while NPRF + RPE and softmax did not (docs/results.md, "Stability":
how the learning rates were chosen)."""

STABILITY = Grid(
    name="stability",
    variants=tuple(VARIANTS.values()),
    lrs=STABILITY_LRS,
    seeds=(1, 2, 3),
    settings=(*_SMALL_MODEL, *_RUN, "data.seq_len=128", "model.attention.rpe_max_distance=128", "batch_size=16",
              "micro_batch_size=16", "max_steps=300", "optim.warmup_steps=30", "log_every=25"),
    notes="2 layers, d_model 128, 4 heads, d_ff 512, 64 features, context 128, batch 16 x 128, 300 steps "
          "(warmup 30, cosine to 0.1 x lr), fp32",
)

QUICK_STEPS = 100

QUALITY = Grid(
    name="quality",
    variants=(KERNELIZED_RPE_NPRF, KERNELIZED_NPRF, SOFTMAX_RPE),
    lrs=(2e-3,),
    seeds=(1234, 1235, 1236),
    settings=(*_SMALL_MODEL, *_RUN, "data.seq_len=256", "model.attention.rpe_max_distance=256", "batch_size=16",
              "micro_batch_size=16", "max_steps=400", "optim.warmup_steps=40", "log_every=50"),
    evaluate=(("valid", None), ("test", (64, 128, 256, 512, 1024, 2048))),
    notes="the Results model (docs/results.md): 2 layers, d_model 128, 4 heads, d_ff 512, 64 features, context 256, batch "
          "16 x 256, 400 steps (warmup 40, cosine to 0.1 x lr), lr 2e-3, fp32",
)

GRIDS = {g.name: g for g in (STABILITY, QUALITY)}

RESERVED = ("optim.lr", "seed", "run_dir", "model.attention.kind", "model.attention.feature_map",
            "model.attention.rpe")
"""Keys the grid sets for each run: an override of one of them would make every run the same."""


def quick(grid: Grid) -> Grid:
    """The ``--quick`` version of ``grid``: its first variant that is kernelized with PRF (the likeliest to break)
    and the paper's variant, at the top learning rate, 2 seeds, :data:`QUICK_STEPS` steps."""
    picked = tuple(v for v in (KERNELIZED_PRF, KERNELIZED_RPE_NPRF) if v in grid.variants) or grid.variants[:2]
    return Grid(name=f"{grid.name}-quick", variants=picked, lrs=(max(grid.lrs),), seeds=grid.seeds[:2],
                settings=(*grid.settings, f"max_steps={QUICK_STEPS}"), evaluate=grid.evaluate[:1],
                notes=f"{grid.notes}; quick: {QUICK_STEPS} steps")


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: its name (also its directory under ``OUT/runs``) and its complete overrides."""

    variant: Variant
    lr: float
    seed: int
    overrides: tuple[str, ...]
    evaluate: tuple[tuple[str, Optional[tuple[int, ...]]], ...] = field(default=(("valid", None),))

    @property
    def name(self) -> str:
        return run_name(self.variant.name, self.lr, self.seed)

    def as_dict(self) -> dict:
        return {"name": self.name, "variant": self.variant.name, "lr": self.lr, "seed": self.seed,
                "overrides": list(self.overrides), "evaluate": [[s, list(c) if c else None] for s, c in self.evaluate]}


def format_lr(lr: float) -> str:
    """``0.015`` -> ``1.5e-2``, ``0.05`` -> ``5e-2``: a learning rate as it appears in names and tables."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}_lr{format_lr(lr)}_seed{seed}"


def check_overrides(overrides: Sequence[str]) -> None:
    """A ConfigError when an override is malformed or sets a key the grid sets for each run."""
    from lm.config import ConfigError  # imports torch: not for a fast --help, which reads the grids' names
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"overrides must look like key=value, got {o!r}")
        key = o.split("=", 1)[0]
        if key in RESERVED:
            raise ConfigError(f"{key} is set by the study for each run; choose learning rates with --lrs, seeds with "
                              f"--seeds, the output folder with --out (override keys: {', '.join(RESERVED)} are "
                              f"reserved)")


def build_specs(grid: Grid, out_runs: str, overrides: Sequence[str] = ()) -> list[RunSpec]:
    """Every run of ``grid`` (variant-major, then learning rate, then seed), each with the grid's settings, its own
    variant, learning rate, seed and run directory ``out_runs/<name>``, then the user's ``overrides`` (which win).
    Each run's config is loaded once here, so a bad key or value fails before anything runs."""
    from lm.config import ConfigError, load_config
    check_overrides(overrides)
    for lr in grid.lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning rate {lr!r} must be a finite number > 0")
    specs = []
    for variant in grid.variants:
        for lr in grid.lrs:
            for seed in grid.seeds:
                name = run_name(variant.name, lr, seed)
                ov = (*grid.settings, *variant.overrides(), f"optim.lr={lr!r}", f"seed={seed}",
                      f"run_dir={out_runs}/{name}", *overrides)
                load_config([], ov)  # validates
                specs.append(RunSpec(variant, lr, seed, ov, grid.evaluate))
    return specs


def with_choices(grid: Grid, lrs: Optional[Sequence[float]] = None, seeds: Optional[Sequence[int]] = None,
                 variants: Optional[Sequence[str]] = None) -> Grid:
    """``grid`` with other learning rates, seeds or variants (by name) where given."""
    from lm.config import ConfigError
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    return Grid(grid.name, tuple(VARIANTS[v] for v in variants) if variants else grid.variants,
                tuple(lrs) if lrs else grid.lrs, tuple(seeds) if seeds else grid.seeds, grid.settings, grid.evaluate,
                grid.notes)
