"""The stability study: does kernelized attention train stably, for which feature maps, with or without
RPE, at which learning rates? A grid of small models trained by the normal trainer, several seeds each.

    grid.py      the variants, the grids (stability; quality) and every run's settings
    verdict.py   what a run says: diverged (the rule), first bad step, loss spikes, ... from its steps.jsonl
    runner.py    one process per run through lm.training.loop.train, --jobs at a time, resumable; the child's entry
    report.py    summary.json, summary.md (tables per learning rate; quality tables), curves.png
    probe.py     the mechanism: per-layer q/k norms, feature extremes, normalisers and gradients up to a bad step

The command line is ``tools/stability_study.py`` (:mod:`lm.cli.stability_study`) and ``tools/stability_probe.py``
(:mod:`lm.cli.stability_probe`).
"""
