"""The checkpoint format: where checkpoints live in a run directory, what meta.json records, and whether a
checkpoint is intact. Shared by training (which writes and resumes them, :mod:`lm.training.checkpointing`) and
inference (which loads them, :mod:`lm.inference.loading`); it imports neither.

Layout of a run directory::

    RUN/checkpoints/step_00001000/
        model.pt        consolidated fp32 weights (state_dict), what tools load
        meta.json       step, tokenizer hash, engine kind, counters, and the size and sha256 of every other
                        file (written last but one)
        meta.json.sha256  meta.json's own sha256 (written last)
        config.yaml     the resolved config the run trained with
        tokenizer/      the tokenizer, so a checkpoint directory is self-contained
        optimizer.pt    (plain-torch engine) or deepspeed/ (DeepSpeed engine): state for exact resume
        adam_moments.pt (DeepSpeed engine) Adam moments by parameter name: resume on another number of ranks

A checkpoint is written under ``checkpoints/.tmp-step_...`` and renamed into place only when complete; names
starting with ``.`` are never read. A checkpoint is **intact** when its meta.json matches its own recorded sha256,
its step agrees with the directory's name, and every file it needs lists has the recorded size and sha256
(torch.load does not notice a changed byte in tensor data); checkpoints written before meta.json had a hash of its
own are checked without it, and those written before meta.json listed files count as intact when their ``.pt``
files are complete zip archives. Tools
given a run directory use the newest intact checkpoint and warn about each newer damaged one; a damaged
checkpoint named explicitly is an error. ``step_N.diverged`` holds the weights a diverged run stopped at; it is
never picked from a run directory, but can be named explicitly.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Optional

import torch

from lm.config import migrate_stored
from lm.errors import UserError
from lm.fileio import sha256_file

CHECKPOINTS = "checkpoints"
META = "meta.json"
META_HASH = "meta.json.sha256"
"""meta.json's own sha256 (hex), beside it: what covers the metadata that covers every other file."""
WEIGHTS = "model.pt"
DIVERGED = ".diverged"
_NAME = re.compile(r"step_(\d+)")
_TRAINING_ONLY = ("optimizer.pt", "deepspeed/")
"""Files only a resume needs (inference ignores their damage)."""


class CheckpointError(UserError, FileNotFoundError):
    """A path that is not a checkpoint or run directory, or a checkpoint that does not fit."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | Path) -> Optional[int]:
    """The step of a checkpoint directory named ``step_N``, else None."""
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def named_step(path: str | Path) -> Optional[int]:
    """The step a checkpoint directory's name gives: ``step_N``, ``step_N.diverged`` (``.1``, ...), else None."""
    m = re.match(r"step_(\d+)(?:$|\.)", Path(path).name)
    return int(m.group(1)) if m else None


def meta_digest(text: bytes) -> str:
    """What :data:`META_HASH` holds for meta.json's bytes ``text``."""
    return hashlib.sha256(text).hexdigest()


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
    try:
        return _damage(checkpoint, purpose, verify_hashes)
    except OSError as e:  # e.g. a file deleted while it was read: the checkpoint is not usable as it is
        return f"{Path(e.filename).name if e.filename else 'a file'} is unreadable ({e.strerror})"


def _damage(checkpoint: Path, purpose: str, verify_hashes: bool) -> Optional[str]:
    if not (checkpoint / META).is_file():
        return f"it has no {META} (an incomplete copy, or a save or deletion that was interrupted)"
    raw = (checkpoint / META).read_bytes()
    try:
        meta = json.loads(raw)
    except ValueError as e:
        return f"{META} is not valid JSON ({str(e).splitlines()[0]})"
    if not isinstance(meta, dict) or not {"step", "tokenizer_hash", "engine", "config"} <= set(meta):
        return f"{META} lacks the step, tokenizer hash, engine or config"
    if meta.get("meta_sha256") or (checkpoint / META_HASH).exists():  # written since meta.json has a hash
        if not (checkpoint / META_HASH).is_file():
            return f"{META_HASH} is missing (it holds the sha256 of {META})"
        if (checkpoint / META_HASH).read_text().strip() != meta_digest(raw):
            return f"{META} does not match the sha256 recorded in {META_HASH} (its bytes changed)"
    step = named_step(checkpoint)
    if step is not None and meta["step"] != step:
        return f"{META} says step {meta['step']!r} but the directory is named {checkpoint.name}"
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
        if not candidate.exists():  # pruned by its trainer while it was read: not damage, just gone
            continue
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


def load_weights(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / WEIGHTS, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # torch reports a damaged archive as RuntimeError
        raise CheckpointError(f"cannot read {checkpoint / WEIGHTS} ({str(e).splitlines()[0]}): the checkpoint is "
                              f"damaged; use another one of {checkpoint.parent.parent}") from None
