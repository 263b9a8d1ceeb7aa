"""Adam moments by parameter name, gathered from and put back into DeepSpeed's optimizers: the part of a
DeepSpeed checkpoint that does not depend on how many ranks wrote it.

DeepSpeed's own optimizer files (``deepspeed/``) are cut into one partition per rank under ZeRO 1/2 (and under
its bf16 optimizer), so they load only on the same number of ranks. Sequence parallelism itself does not change
them (DeepSpeed partitions over all ranks, its sequence-data-parallel group, whatever the SP degree), but a run
that moves to another number of GPUs does. :func:`gather_moments` writes the full fp32 ``exp_avg`` /
``exp_avg_sq`` of every parameter (plus the step count) once, keyed by parameter name; :func:`scatter_moments`
puts them into a freshly built engine of any layout, and :func:`scatter_master_weights` its fp32 master weights.

Supported: torch's AdamW (``deepspeed.torch_adam=true``, the default) as DeepSpeed's client optimizer at ZeRO
stage 0 in fp32, or under ZeRO 1/2 or DeepSpeed's bf16 optimizer (any parameter with DeepSpeed's ``_hp_mapping``).
Anything else raises :class:`MomentsUnsupported` with what to do instead.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["MOMENT_KEYS", "MomentsUnsupported", "gather_moments", "scatter_moments", "scatter_master_weights"]

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


class MomentsUnsupported(RuntimeError):
    """This engine's optimizer keeps its state in a form the consolidated moments do not cover."""


def _base_optimizer(ds_optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state: DeepSpeed's wrapper's ``.optimizer``, or the client optimizer."""
    return getattr(ds_optimizer, "optimizer", ds_optimizer)


def _flat_partitions(ds_optimizer) -> Optional[list[torch.Tensor]]:
    """The flat fp32 partitions DeepSpeed's ZeRO 1/2 or bf16 optimizer steps (None for a client optimizer)."""
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flat = getattr(ds_optimizer, name, None)
        if flat is not None:
            return flat
    return None


def _partitioned(ds_optimizer) -> bool:
    """True for DeepSpeed's ZeRO 1/2 and bf16 optimizers (state on flat fp32 partitions), False for a client
    optimizer stepped as it is (stage 0, fp32); :class:`MomentsUnsupported` for anything else."""
    base = _base_optimizer(ds_optimizer)
    if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        raise MomentsUnsupported(f"the optimizer is {type(base).__name__}; moving a run to another layout needs "
                                 f"torch's AdamW (deepspeed.torch_adam=true): resume with the layout it was saved with")
    if base is ds_optimizer:
        return False
    if _flat_partitions(ds_optimizer) is None:
        raise MomentsUnsupported(f"DeepSpeed's {type(ds_optimizer).__name__} (fp16 at ZeRO stage 0) keeps its state "
                                 f"in a form that cannot be moved: resume with the layout it was saved with, or "
                                 f"train with deepspeed.zero_stage>=1")
    return True


def _link_state(ds_optimizer) -> None:
    """(Re)link every parameter's DeepSpeed mapping to its slice of the optimizer state as it is now (saving a
    checkpoint may rebuild the mappings without their state links)."""
    ds_optimizer._hp_optimizer_states_linked = False
    ds_optimizer._lazy_init_hp_params_optimizer_state()


def _step_of(base: torch.optim.Optimizer) -> float:
    """The optimizer's step count (every parameter steps together), 0 before the first step."""
    for state in base.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


@torch.no_grad()
def gather_moments(module: nn.Module, ds_optimizer) -> dict:
    """``{"step": float, "exp_avg": {name: fp32 CPU tensor}, "exp_avg_sq": {...}}`` of every trainable parameter
    of ``module``. Collective under ZeRO / bf16 (one all-reduce per parameter and key, in parameter order):
    every rank calls it, every rank gets the result. Empty dicts before the first optimizer step."""
    partitioned, base = _partitioned(ds_optimizer), _base_optimizer(ds_optimizer)
    out = {"step": _step_of(base), **{key: {} for key in MOMENT_KEYS}}
    if not base.state:
        return out
    if partitioned:
        from deepspeed.utils import safe_get_full_optimizer_state
        _link_state(ds_optimizer)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        for key in MOMENT_KEYS:
            value = safe_get_full_optimizer_state(p, key) if partitioned else base.state[p][key]
            out[key][name] = value.detach().float().cpu().clone()
    return out


def _fresh_adam_state(like: torch.Tensor, step: float) -> dict:
    """What torch's Adam/AdamW creates on its first step (non-fused, non-capturable), with ``step`` steps taken."""
    return {"step": torch.tensor(step, dtype=torch.float32),
            **{key: torch.zeros_like(like, memory_format=torch.preserve_format) for key in MOMENT_KEYS}}


@torch.no_grad()
def scatter_moments(module: nn.Module, ds_optimizer, moments: dict) -> None:
    """Load :func:`gather_moments`' result into a freshly built engine (any number of ranks, any ZeRO stage that
    :func:`gather_moments` supports). Not collective: each rank writes its own partition."""
    partitioned, base = _partitioned(ds_optimizer), _base_optimizer(ds_optimizer)
    if not moments[MOMENT_KEYS[0]]:
        return  # saved before the first step: nothing to restore
    named = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(named) ^ set(moments[MOMENT_KEYS[0]]))
    if missing:
        raise ValueError(f"the saved Adam moments do not match the model's parameters (differing: {missing[:5]})")
    if not partitioned:  # client optimizer: one state per parameter
        for name, p in named.items():
            state = base.state[p] = _fresh_adam_state(p, moments["step"])
            for key in MOMENT_KEYS:
                state[key].copy_(moments[key][name])
        return
    from deepspeed.utils import safe_set_full_optimizer_state
    for partition in _flat_partitions(ds_optimizer):
        base.state[partition] = _fresh_adam_state(partition, moments["step"])
    _link_state(ds_optimizer)
    for name, p in named.items():
        for key in MOMENT_KEYS:
            safe_set_full_optimizer_state(p, moments[key][name].to(p.device), key)


@torch.no_grad()
def scatter_master_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Set DeepSpeed's fp32 master copy (ZeRO / bf16 optimizer partitions) of every parameter from the
    consolidated fp32 ``weights`` (a state_dict). Parameters without a master copy hold the weights themselves
    (already loaded): nothing to do for them."""
    from deepspeed.utils import safe_set_full_fp32_param
    for name, p in module.named_parameters():
        if hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, weights[name].to(p.device))
