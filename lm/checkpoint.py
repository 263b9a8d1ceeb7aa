"""Checkpoints: atomic save, resume, pruning, integrity checks with fallback, and loading a model for inference
without DeepSpeed.

Layout of a run directory::

    RUN/checkpoints/step_00001000/
        model.pt        consolidated fp32 weights (state_dict), what tools load
        meta.json       step, tokenizer hash, engine kind, counters, and the size and sha256 of every other
                        file (written last)
        config.yaml     the resolved config the run trained with
        tokenizer/      the tokenizer, so a checkpoint directory is self-contained
        optimizer.pt    (plain-torch engine) or deepspeed/ (DeepSpeed engine): state for exact resume
        adam_moments.pt (DeepSpeed engine) Adam moments by parameter name: resume on another number of ranks

A checkpoint is written under ``checkpoints/.tmp-step_...`` and renamed into place only when complete, so a
crash while saving leaves the previous checkpoints intact; names starting with ``.`` are never read, and the
debris of a crash (``.tmp-*``, ``.pruned-*``, ``.old-*``) is cleared by :func:`clean_debris` when the next run
starts. A checkpoint is **intact** when its meta.json reads and every file it needs lists has the recorded size
and sha256 (torch.load does not notice a changed byte in tensor data); checkpoints written before meta.json listed
files count as intact when their ``.pt`` files are complete zip archives. Tools given a run directory use the newest intact
checkpoint and warn about each newer damaged one; a damaged checkpoint named explicitly is an error.
``step_N.diverged`` holds the weights a diverged run stopped at (see :func:`set_aside_diverged`); it is never
picked from a run directory, but can be named explicitly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from lm.config import TrainConfig, as_dict, config_from_dict, migrate_stored, to_yaml
from lm.distributed import barrier, check_ranks_agree
from lm.engine import Engine
from lm.fileio import atomic_write_text, fsync_dir, fsync_tree, sha256_file

CHECKPOINTS = "checkpoints"
META = "meta.json"
WEIGHTS = "model.pt"
DIVERGED = ".diverged"
_NAME = re.compile(r"step_(\d+)")
_TRAINING_ONLY = ("optimizer.pt", "deepspeed/")
"""Files only a resume needs (inference ignores their damage)."""


class CheckpointError(FileNotFoundError):
    """A path that is not a checkpoint or run directory, or a checkpoint that does not fit."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | Path) -> Optional[int]:
    """The step of a checkpoint directory named ``step_N``, else None."""
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every ``step_N`` directory of ``run_dir``, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()), key=checkpoint_step)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of ``run_dir`` that have a meta.json (written last, so the save completed), oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if (p / META).is_file()]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _complete_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def damage(checkpoint: str | Path, purpose: str = "inference", verify_hashes: bool = True) -> Optional[str]:
    """What makes ``checkpoint`` unusable for ``purpose`` (``"inference"``: weights, config, tokenizer;
    ``"training"``: also the optimizer / DeepSpeed state), in a few words; None when it is intact.

    Reads meta.json and compares the size of every file the purpose needs (a stat each), then, when
    ``verify_hashes``, their sha256 (one read of files that are about to be loaded anyway, at ~1.5 GB/s).
    Checkpoints written before meta.json listed its files: the ``.pt`` files must be complete zip archives (a
    truncated one is not).
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / META).is_file():
        return f"it has no {META} (an incomplete copy, or a save or deletion that was interrupted)"
    try:
        meta = json.loads((checkpoint / META).read_text())
    except ValueError as e:
        return f"{META} is not valid JSON ({str(e).splitlines()[0]})"
    except OSError as e:
        return f"{META} is unreadable ({e.strerror})"
    if not isinstance(meta, dict) or not {"step", "tokenizer_hash", "engine", "config"} <= set(meta):
        return f"{META} lacks the step, tokenizer hash, engine or config"
    training = purpose == "training"
    files = meta.get("files")
    if isinstance(files, dict):
        needed = sorted(rel for rel in files if training or not rel.startswith(_TRAINING_ONLY))
        for rel in needed:
            path = checkpoint / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != files[rel]:
                return f"{rel} is {path.stat().st_size:,} bytes but {files[rel]:,} were written"
        hashes = meta.get("sha256", {}) if verify_hashes else {}
        for rel in needed:
            if rel in hashes and sha256_file(checkpoint / rel) != hashes[rel]:
                return f"{rel} does not match the sha256 recorded when it was written (its bytes changed)"
        return None
    # written before meta.json listed files
    needed = [checkpoint / WEIGHTS]
    if training:
        state = checkpoint / ("deepspeed" if meta["engine"] == "deepspeed" else "optimizer.pt")
        if not state.exists():
            return f"{state.name} is missing"
        needed += sorted(state.rglob("*.pt")) if state.is_dir() else [state]
    for path in needed:
        if not path.is_file():
            return f"{path.relative_to(checkpoint)} is missing"
        if not _complete_zip(path):
            return f"{path.relative_to(checkpoint)} is truncated or damaged (not a complete archive)"
    return None


def newest_intact(run_dir: str | Path, purpose: str = "inference", warn: bool = True) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that is intact for ``purpose`` (see :func:`damage`), warning about
    every newer one that is not (naming it and what is wrong); None when there is none."""
    for candidate in reversed(checkpoint_dirs(run_dir)):
        problem = damage(candidate, purpose)
        if problem is None:
            return candidate
        if warn:
            _warn(f"skipping checkpoint {candidate}: {problem}; trying an older one")
    return None


def find_checkpoint(path: str | Path, purpose: str = "inference") -> Path:
    """``path`` itself when it is a checkpoint directory (an error if it is damaged), else the newest intact
    checkpoint of the run directory ``path`` (warning about newer damaged ones)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (give a run directory or one of its checkpoints/step_* dirs)")
    if (path / META).is_file() or checkpoint_step(path) is not None or path.name.endswith(DIVERGED):
        problem = damage(path, purpose)
        if problem is not None:
            fallback = newest_intact(path.parent.parent, purpose, warn=False) if path.parent.name == CHECKPOINTS \
                else None
            hint = f"; the newest intact one of that run is {fallback}" if fallback else ""
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}. Use another checkpoint{hint}")
        return path
    found = newest_intact(path, purpose)
    if found is None:
        if checkpoint_dirs(path):
            raise CheckpointError(f"{path} holds no intact checkpoint (see the warnings above); point at another "
                                  f"run directory or restore a checkpoint")
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/{CHECKPOINTS}/step_*/{META}); "
                              f"train longer than save_every steps or point at another run directory")
    return found


def read_meta(checkpoint: str | Path) -> dict:
    """The checkpoint's meta.json (step, tokenizer hash, engine, counters, and the config as a dict in today's
    layout, whatever version wrote it)."""
    path = Path(checkpoint) / META
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0]}): the checkpoint is damaged; use "
                              f"another one of {path.parent.parent}") from None
    meta["config"] = migrate_stored(meta["config"])  # written by an older version: today's key layout
    return meta


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
    one is always kept: see below). Collective (all ranks). Call it only after a good step (lm.divergence).

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
    state = _load_weights(checkpoint)
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


def _load_weights(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / WEIGHTS, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # torch reports a damaged archive as RuntimeError
        raise CheckpointError(f"cannot read {checkpoint / WEIGHTS} ({str(e).splitlines()[0]}): the checkpoint is "
                              f"damaged; use another one of {checkpoint.parent.parent}") from None


@dataclass
class Inference:
    """A trained model ready to run: ``model`` in eval mode with fp32 weights on ``device``."""
    model: nn.Module
    cfg: TrainConfig
    tokenizer: object
    step: int
    path: Path


def load_for_inference(path: str | Path, overrides: Sequence[str] = (), device: str | torch.device = "cpu"
                       ) -> Inference:
    """Load a checkpoint (or the newest one of a run directory) without DeepSpeed.

    ``overrides`` are ``key=value`` config overrides applied to the stored config (e.g. ``data.path=DIR``, or
    ``model.attention.method=fft``); overrides that change the architecture fail when the weights are loaded.
    """
    from lm.model import Transformer
    from lm.tokenizer import Tokenizer, TokenizerError

    checkpoint = find_checkpoint(path)
    meta = read_meta(checkpoint)
    cfg = config_from_dict(meta["config"], overrides)
    try:
        tokenizer = Tokenizer.load(checkpoint / "tokenizer")
    except TokenizerError as e:
        raise CheckpointError(f"the tokenizer of checkpoint {checkpoint} is damaged ({e}); it cannot be rebuilt (the "
                              f"model's token ids are its own): use another checkpoint of that run") from None
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise CheckpointError(f"{checkpoint}/tokenizer does not match the tokenizer the model was trained with; "
                              f"use another checkpoint of that run")
    model = Transformer(cfg.model)
    state = _load_weights(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: weights do not fit the model built from its config with overrides "
                              f"{list(overrides)}: {str(e).splitlines()[0]}") from None
    return Inference(model.to(device).eval(), cfg, tokenizer, int(meta["step"]), checkpoint)
