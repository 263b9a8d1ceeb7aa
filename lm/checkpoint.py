"""Checkpoints: atomic save, resume, pruning, and loading a model for inference without DeepSpeed.

Layout of a run directory::

    RUN/checkpoints/step_00001000/
        model.pt        consolidated fp32 weights (state_dict), what tools load
        meta.json       step, tokenizer hash, engine kind, counters (written last)
        config.yaml     the resolved config the run trained with
        tokenizer/      the tokenizer, so a checkpoint directory is self-contained
        optimizer.pt    (plain-torch engine) or deepspeed/ (DeepSpeed engine): state for exact resume
        adam_moments.pt (DeepSpeed engine) Adam moments by parameter name: resume on another number of ranks

A checkpoint is written under ``checkpoints/.tmp-step_...`` and renamed into place only when complete, so a
crash while saving leaves the previous checkpoints intact; names starting with ``.`` are never read.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lm.config import TrainConfig, as_dict, config_from_dict, migrate_stored, to_yaml
from lm.distributed import barrier, check_ranks_agree
from lm.engine import Engine
from lm.fileio import atomic_write_text, fsync_dir, fsync_tree

CHECKPOINTS = "checkpoints"
META = "meta.json"
WEIGHTS = "model.pt"


class CheckpointError(FileNotFoundError):
    """A path that is not a checkpoint or run directory, or a checkpoint that does not fit."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint directory, else the newest checkpoint of the run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (give a run directory or one of its checkpoints/step_* dirs)")
    if (path / META).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/{CHECKPOINTS}/step_*/{META}); "
                              f"train longer than save_every steps or point at another run directory")
    return found[-1]


def read_meta(checkpoint: str | Path) -> dict:
    """The checkpoint's meta.json (step, tokenizer hash, engine, counters, and the config as a dict in today's
    layout, whatever version wrote it)."""
    path = Path(checkpoint) / META
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; use another one of "
                              f"{path.parent.parent}") from None
    meta["config"] = migrate_stored(meta["config"])  # written by an older version: today's key layout
    return meta


def save_checkpoint(run_dir: str | Path, engine: Engine, step: int, cfg: TrainConfig, tokenizer,
                    counters: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the newest ``keep``. Collective (all ranks).

    ``counters`` (e.g. consecutive non-finite steps) go into meta.json and come back from
    :func:`load_training_state`.
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
        meta = {"step": step, "tokenizer_hash": tokenizer.hash, "engine": engine.info.kind,
                "world_size": engine.info.world_size, "counters": counters, "config": as_dict(cfg)}
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
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale)
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
    state = torch.load(checkpoint / WEIGHTS, map_location="cpu", weights_only=True)
    with torch.no_grad():  # copy_ casts fp32 weights to whatever dtype the engine runs the module in
        own = engine.module.state_dict()
        missing = set(own) ^ set(state)
        if missing:
            raise CheckpointError(f"{checkpoint}: weights do not match the model (differing keys: "
                                  f"{sorted(missing)[:5]}); the model config must equal the checkpoint's")
        for k, v in state.items():
            own[k].copy_(v)
    engine.load_state(checkpoint)
    return meta


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
    from lm.tokenizer import Tokenizer

    checkpoint = find_checkpoint(path)
    meta = read_meta(checkpoint)
    cfg = config_from_dict(meta["config"], overrides)
    tokenizer = Tokenizer.load(checkpoint / "tokenizer")
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise CheckpointError(f"{checkpoint}/tokenizer does not match the tokenizer the model was trained with")
    model = Transformer(cfg.model)
    state = torch.load(checkpoint / WEIGHTS, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: weights do not fit the model built from its config with overrides "
                              f"{list(overrides)}: {str(e).splitlines()[0]}") from None
    return Inference(model.to(device).eval(), cfg, tokenizer, int(meta["step"]), checkpoint)
