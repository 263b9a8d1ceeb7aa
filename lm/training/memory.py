"""Whether a training step can fit in the memory of its device, told in one line before anything is written
(:func:`check_fits`), and the line for an allocation that fails anyway (:func:`out_of_memory`).

The estimate is a lower bound: the weights, gradients and Adam moments of the parameters, plus the activations
autograd keeps for one micro-batch, per token (float32 values)::

    layers x (6 d_model + 3 d_ff + 7 heads x num_features)      kernelized attention (per_offset / bucketed RPE)
    layers x (6 d_model + 3 d_ff + 2 heads x seq_len)            softmax attention (the n x n scores)
    + 4 vocab + 10 d_model                                       embeddings, logits and their gradients

(coefficients read off the measured peak memory of forward + backward on the CPU for a few shapes, then taken
times :data:`MARGIN` so that the bound stays below every measured peak; with ``compute.activation_checkpointing``
a layer keeps only its input, d_model values, and one layer is recomputed at a time). A run is refused only when
this lower bound exceeds the device's whole memory, so a run that could fit is never refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from lm.config import ConfigError, TrainConfig

GB = 2 ** 30
MARGIN = 0.85
"""The activation estimate is taken times this: a bound below the measured peaks, never above."""


def parameter_count(cfg: TrainConfig) -> int:
    """Parameters of the model ``cfg`` describes (embedding tied to the output; RPE tables and norms left out:
    small beside the matrices). A vocabulary taken from the tokenizer counts as ``data.tokenizer.vocab_size``."""
    m = cfg.model
    vocab = m.vocab_size or cfg.data.tokenizer.vocab_size
    return vocab * m.d_model + m.n_layers * (4 * m.d_model * m.d_model + 2 * m.d_model * m.d_ff)


def activation_floats_per_token(cfg: TrainConfig) -> int:
    """Values autograd keeps per token of a micro-batch (see the module docstring)."""
    m, a = cfg.model, cfg.model.attention
    vocab = m.vocab_size or cfg.data.tokenizer.vocab_size
    attention = 2 * m.n_heads * cfg.data.seq_len if a.kind == "softmax" else 7 * m.n_heads * a.num_features
    layer = 6 * m.d_model + 3 * m.d_ff + attention
    layers = (m.n_layers * m.d_model + layer) if cfg.compute.activation_checkpointing else m.n_layers * layer
    return layers + 4 * vocab + 10 * m.d_model


def step_bytes(cfg: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(parameter bytes, activation bytes) of one rank's training step, lower bounds: float32 weights and
    gradients, and the Adam moments (ZeRO splits them over the data-parallel ranks); activations of one
    micro-batch (half the bytes under bf16 / fp16)."""
    params = parameter_count(cfg)
    zero = cfg.deepspeed.zero_stage > 0 and world_size > 1
    param_bytes = params * (8 + (8 // world_size if zero else 8))
    width = 2 if cfg.compute.precision in ("bf16", "fp16") else 4
    tokens = cfg.micro_batch_size * cfg.data.seq_len
    return param_bytes, int(MARGIN * tokens * activation_floats_per_token(cfg) * width)


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory ``device`` has: a GPU's total, or the machine's RAM (capped by a cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _what_to_lower(cfg: TrainConfig, param_bytes: int, activation_bytes: int) -> str:
    if param_bytes >= activation_bytes:
        return "lower model.d_model, model.n_layers, model.d_ff or the vocabulary"
    advice = (f"lower data.seq_len={cfg.data.seq_len} or micro_batch_size={cfg.micro_batch_size} (batch_size stays: "
              f"more micro-batches accumulate)")
    if not cfg.compute.activation_checkpointing:
        advice += ", or set compute.activation_checkpointing=true"
    return advice


def check_fits(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
    """A one-line ConfigError when a training step of ``cfg`` cannot fit in ``device``'s memory even by the
    lower bound of :func:`step_bytes`."""
    have = device_memory(device)
    param_bytes, activation_bytes = step_bytes(cfg, world_size)
    need = param_bytes + activation_bytes
    if have is None or need <= have:
        return
    where = f"{device.type.upper()} ({have / GB:,.1f} GB)" if device.type == "cuda" else \
        f"this machine's memory ({have / GB:,.1f} GB)"
    raise ConfigError(f"a training step needs at least {need / GB:,.1f} GB ({parameter_count(cfg):,} parameters with "
                      f"their gradients and Adam moments: {param_bytes / GB:,.1f} GB; activations of "
                      f"{cfg.micro_batch_size} x {cfg.data.seq_len:,} tokens: {activation_bytes / GB:,.1f} GB), more "
                      f"than {where}: {_what_to_lower(cfg, param_bytes, activation_bytes)}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError, Python's MemoryError)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error)
                                                or "out of memory" in str(error))


def out_of_memory(cfg: TrainConfig, device: torch.device, error: BaseException, world_size: int = 1
                  ) -> ConfigError:
    """The one-line error for an allocation that failed while building or training the model."""
    param_bytes, activation_bytes = step_bytes(cfg, world_size)
    first = (str(error).splitlines() or [type(error).__name__])[0]
    advice = _what_to_lower(cfg, param_bytes, activation_bytes)
    return ConfigError(f"out of memory on {device} ({first[:160]}): {advice}")
