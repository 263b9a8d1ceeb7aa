"""Writing checkpoints during training and resuming from them: atomic save, pruning, the debris of crashes,
setting aside the weights of a diverged run, and restoring weights and optimizer state for an exact resume.
The format itself (layout, meta.json, integrity) is :mod:`lm.checkpoint`.

A checkpoint is written under ``checkpoints/.tmp-step_...`` and renamed into place only when complete, so a
crash while saving leaves the previous checkpoints intact; the debris of a crash (``.tmp-*``, ``.pruned-*``,
``.old-*``) is cleared by :func:`clean_debris` when the next run starts.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from lm.checkpoint import (CHECKPOINTS, DIVERGED, META, WEIGHTS, CheckpointError, checkpoint_name, checkpoint_step,
                           list_checkpoints, load_weights, newest_intact, read_meta)
from lm.config import TrainConfig, as_dict, to_yaml
from lm.fileio import atomic_write_text, fsync_dir, fsync_tree, sha256_file
from lm.training.distributed import barrier, check_ranks_agree
from lm.training.engine import Engine


def clean_debris(run_dir: str | Path) -> None:
    """Clear what a crash left in ``run_dir/checkpoints``: unfinished saves (``.tmp-*``) and deletions
    (``.pruned-*``) go; a checkpoint set aside while the same step was saved again (``.old-step_N``) comes back
    if the new one never arrived. Only for the process that holds the run directory's lock."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for debris in sorted(root.iterdir()):
        if debris.name.startswith(".old-") and not (root / debris.name[len(".old-"):]).exists():
            os.replace(debris, root / debris.name[len(".old-"):])
        elif debris.name.startswith((".tmp-", ".pruned-", ".old-")):
            shutil.rmtree(debris, ignore_errors=True)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a crash midway leaves debris, never a half-deleted ``step_N``."""
    doomed = checkpoint.with_name(f".pruned-{checkpoint.name}")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def set_aside_diverged(run_dir: str | Path, last_update_step: int) -> tuple[Optional[Path], Optional[Path]]:
    """After a run stopped for divergence: rename the checkpoint of ``last_update_step`` (if one was written),
    whose weights then failed on ``max_bad_steps`` batches in a row, to ``step_N.diverged``, so that a resume or a
    tool given the run directory never picks it. Returns (the newest intact checkpoint left, which a good step
    confirmed; the renamed one)."""
    root = Path(run_dir) / CHECKPOINTS
    bad = root / checkpoint_name(last_update_step)
    renamed = None
    if bad.is_dir():
        renamed = bad.with_name(bad.name + DIVERGED)
        n = 1
        while renamed.exists():
            renamed, n = bad.with_name(f"{bad.name}{DIVERGED}.{n}"), n + 1
        os.replace(bad, renamed)
        fsync_dir(root)
    return newest_intact(run_dir, "training"), renamed


def save_checkpoint(run_dir: str | Path, engine: Engine, step: int, cfg: TrainConfig, tokenizer,
                    counters: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically and prune older ones to the newest ``keep`` (the newest older
    one is always kept: see below). Collective (all ranks). Call it only after a good step (lm.training.divergence).

    ``counters`` (the divergence monitor's state) go into meta.json and come back from
    :func:`load_training_state`. Checkpoints of later steps (left by a run that was resumed from an earlier one)
    are never pruned: saving their step again replaces them.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    main = engine.info.is_main
    if main:
        if root.is_dir():  # debris of crashes mid-save
            for debris in root.glob(".tmp-*"):
                shutil.rmtree(debris, ignore_errors=True)
        tmp.mkdir(parents=True)
    check_ranks_agree(engine.module)
    barrier()
    engine.save_state(tmp)
    weights = engine.consolidated_state_dict()
    if main:
        torch.save(weights, tmp / WEIGHTS)
        tokenizer.save(tmp / "tokenizer")
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        fsync_tree(tmp)
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        meta = {"step": step, "tokenizer_hash": tokenizer.hash, "engine": engine.info.kind,
                "world_size": engine.info.world_size, "counters": counters, "config": as_dict(cfg),
                "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in written},
                "sha256": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in written}}
        atomic_write_text(tmp / META, json.dumps(meta, indent=1))
        if final.exists():  # the same step saved again (e.g. a resumed run stopping at once): swap atomically
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        # the newest older checkpoint stays whatever ``keep`` says: until a good step confirms the weights just
        # saved, it is the last one known to be good
        older = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) < step]
        for stale in older[:-max(keep - 1, 1)]:
            _remove(stale)
    barrier()
    return final


def load_training_state(checkpoint: Path, engine: Engine, tokenizer_hash: str) -> dict:
    """Restore weights and optimizer/engine state for an exact resume; returns the checkpoint's meta.json."""
    meta = read_meta(checkpoint)
    if meta["tokenizer_hash"] != tokenizer_hash:
        raise CheckpointError(f"{checkpoint} was trained with another tokenizer (hash {meta['tokenizer_hash'][:12]}, "
                              f"this run's is {tokenizer_hash[:12]}): its token ids mean other things. Use the "
                              f"data/tokenizer settings of that run, or another run_dir")
    if meta["engine"] != engine.info.kind:
        how = {"deepspeed": "through launch.sh (or engine=deepspeed)", "torch": "with python tools/train.py"}
        raise CheckpointError(f"{checkpoint} was written by the {meta['engine']} engine; resume it "
                              f"{how[meta['engine']]}, or load its weights with load_for_inference")
    state = load_weights(checkpoint)
    with torch.no_grad():  # copy_ casts fp32 weights to whatever dtype the engine runs the module in
        own = engine.module.state_dict()
        missing = set(own) ^ set(state)
        if missing:
            raise CheckpointError(f"{checkpoint}: weights do not match the model (differing keys: "
                                  f"{sorted(missing)[:5]}); the model config must equal the checkpoint's")
        shapes = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
                  if v.shape != own[k].shape]
        if shapes:
            raise CheckpointError(f"{checkpoint}: weights of another shape than the model: {', '.join(shapes[:3])}"
                                  f"; resume with the model settings of that run, or use another run_dir")
        for k, v in state.items():
            own[k].copy_(v)
    try:
        engine.load_state(checkpoint)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:  # damage its sizes did not show
        raise CheckpointError(f"cannot load the optimizer state of {checkpoint} ({str(e).splitlines()[0]}): the "
                              f"checkpoint is damaged; rename it (e.g. to {checkpoint.name}.damaged) to resume from "
                              f"the one before") from None
    return meta


