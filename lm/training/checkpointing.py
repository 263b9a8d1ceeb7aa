"""Writing checkpoints during training and resuming from them: atomic save, pruning, the debris of crashes,
setting aside the weights of a diverged run, and restoring weights and optimizer state for an exact resume.
The format itself (layout, meta.json, integrity) is :mod:`lm.checkpoint`.

A checkpoint is written under ``checkpoints/.tmp-step_...`` and renamed into place only when complete, so a
crash while saving leaves the previous checkpoints intact; the debris of a crash (``.tmp-*``, ``.pruned-*``,
``.old-*``) is cleared by :func:`clean_debris` when the next run starts, before it writes anything. A save the
disk refuses (full, read-only) removes its partial files at once and stops the run with a one-line
:class:`lm.errors.DiskError`. A checkpoint directory may be a symbolic link (e.g. to an archive): pruning it
unlinks the link, never what it points to.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from lm.checkpoint import (CHECKPOINTS, DIVERGED, META, META_HASH, WEIGHTS, CheckpointError, checkpoint_name,
                           checkpoint_step, list_checkpoints, load_weights, meta_digest, newest_intact, read_meta)
from lm.config import TrainConfig, as_dict, to_yaml
from lm.errors import DiskError, disk_problem
from lm.fileio import (atomic_write, atomic_write_text, free_bytes, fsync_dir, fsync_tree, open_for_writing,
                       remove_path, sha256_file)
from lm.training.distributed import all_reduce, barrier, check_ranks_agree
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
            with contextlib.suppress(OSError):  # what cannot go now goes at the next start
                remove_path(debris)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a crash midway leaves debris, never a half-deleted ``step_N``; a checkpoint
    that is a symbolic link loses the link only."""
    doomed = checkpoint.with_name(f".pruned-{checkpoint.name}")
    remove_path(doomed)  # left by an earlier deletion that could not finish
    os.replace(checkpoint, doomed)
    remove_path(doomed)


DISK_FULL_BYTES = 16 << 20
"""A write error on a file system with less than this free is taken for a full disk (DeepSpeed's and torch's own
writers report one as a RuntimeError without an errno)."""


def _save_problem(error: BaseException, where: Path) -> Optional[str]:
    """``<problem>: <path>`` when ``error`` is a disk refusing a write under ``where``, else None."""
    problem = disk_problem(error)
    if problem is None and isinstance(error, (OSError, RuntimeError)):
        free = free_bytes(where)
        if free is not None and free < DISK_FULL_BYTES:
            problem = f"no space left on the device ({free:,} bytes free)"
    if problem is None:
        return None
    return f"{problem}: {getattr(error, 'filename', None) or where}"


@contextlib.contextmanager
def _noting_disk_problems(found: list, where: Path):
    """Record in ``found`` (and swallow) a disk refusing a write inside the block; other errors pass."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        problem = _save_problem(e, where)
        if problem is None:
            raise
        found.append(problem)


def _save_failed(found: list, tmp: Path, step: int, main: bool) -> None:
    """Every rank learns whether any rank's part of the save met a disk problem; if one did, rank 0 removes the
    partial checkpoint (freeing its space) and every rank raises :class:`DiskError`. Collective."""
    failed = all_reduce(torch.tensor([float(bool(found))]), op=torch.distributed.ReduceOp.MAX).item() > 0
    if not failed:
        return
    if main:
        with contextlib.suppress(OSError):
            remove_path(tmp)
    what = found[0] if found else "another rank could not write its part of the checkpoint (its error says why)"
    raise DiskError(f"{what}; the checkpoint of step {step} was not saved and its partial files were removed "
                    f"(earlier checkpoints are untouched): free space there, then run the same command again to "
                    f"resume from the newest checkpoint")


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
    found: list[str] = []  # disk problems met by this rank
    if main:
        with _noting_disk_problems(found, root):
            if root.is_dir():  # debris of crashes mid-save
                for debris in root.glob(".tmp-*"):
                    remove_path(debris)
            tmp.mkdir(parents=True)
    _save_failed(found, tmp, step, main)
    check_ranks_agree(engine.module)
    barrier()
    with _noting_disk_problems(found, tmp):
        engine.save_state(tmp)
    weights = engine.consolidated_state_dict()
    if main and not found:
        with _noting_disk_problems(found, tmp):
            with open_for_writing(tmp / WEIGHTS) as f:  # a full disk: an OSError with its errno and path
                torch.save(weights, f)
            tokenizer.save(tmp / "tokenizer")
            atomic_write_text(tmp / "config.yaml", to_yaml(cfg))
            fsync_tree(tmp)
            written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
            meta = {"step": step, "tokenizer_hash": tokenizer.hash, "engine": engine.info.kind,
                    "world_size": engine.info.world_size, "counters": counters, "config": as_dict(cfg),
                    "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in written},
                    "sha256": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in written},
                    "meta_sha256": META_HASH}
            text = json.dumps(meta, indent=1).encode()
            atomic_write(tmp / META, lambda f: f.write(text))
            atomic_write_text(tmp / META_HASH, meta_digest(text) + "\n")  # last: covers meta.json itself
    _save_failed(found, tmp, step, main)
    if main:
        if final.exists() or final.is_symlink():  # the same step saved again (e.g. a resumed run stopping at
            old = root / f".old-{final.name}"   # once): swap atomically
            remove_path(old)
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
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


