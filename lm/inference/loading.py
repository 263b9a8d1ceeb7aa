"""Loading a trained model to run it: a checkpoint (or the newest intact one of a run directory), its config
and tokenizer, without DeepSpeed, the training engine or a process group."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lm.checkpoint import CheckpointError, find_checkpoint, load_weights, read_meta
from lm.config import TrainConfig, config_from_dict
from lm.model import Transformer
from lm.tokenizer import Tokenizer, TokenizerError

__all__ = ["Inference", "load_for_inference"]


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
    Beside a trainer that prunes old checkpoints, a run directory's checkpoint deleted while it is read is not
    damage: the newest one is picked again.
    """
    for attempt in range(PRUNED_RETRIES):
        checkpoint = find_checkpoint(path)
        try:
            return _load(checkpoint, overrides, device)
        except CheckpointError:
            # a run directory's newest checkpoint, pruned by its trainer while it was read (a trainer saving every
            # few steps keeps only the newest ones): not damage; the next newest is read instead
            if checkpoint.exists() or attempt == PRUNED_RETRIES - 1:
                raise
            if checkpoint == Path(path):
                raise CheckpointError(f"checkpoint {checkpoint} was deleted while it was read (pruned by its "
                                      f"trainer?): give the run directory to load its newest checkpoint") from None
    raise AssertionError("unreachable")


PRUNED_RETRIES = 10
"""How often :func:`load_for_inference` picks a run directory's newest checkpoint again when the one it was
reading was deleted meanwhile."""


def _load(checkpoint: Path, overrides: Sequence[str], device: str | torch.device) -> Inference:
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
    state = load_weights(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: weights do not fit the model built from its config with overrides "
                              f"{list(overrides)}: {str(e).splitlines()[0]}") from None
    return Inference(model.to(device).eval(), cfg, tokenizer, int(meta["step"]), checkpoint)
