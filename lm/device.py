"""The compute device: which one a ``--device`` / ``device=`` value names, and its process-wide numeric settings,
set explicitly from the config when a command starts (training, eval_ppl, generate, harness), never as a side
effect of importing a module."""
from __future__ import annotations

import torch

from lm.errors import UserError


class DeviceError(UserError, ValueError):
    """A device this machine does not have (or no device at all); the message says what to use instead."""


def resolve_device(name: str) -> str:
    """A device as given (``auto``, ``cpu``, ``cuda``, ``cuda:N``) -> the device to use: ``auto`` is ``cuda`` when
    CUDA is available, else ``cpu``. A CUDA device on a machine without it (or without that index) is a
    :class:`DeviceError`, raised here rather than by the first tensor moved there."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device={name} but CUDA is not available; use --device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


def set_tf32(enabled: bool, device: str | torch.device) -> None:
    """On CUDA, let float32 matmuls (cuBLAS) and cuDNN convolutions use TF32 tensor cores (``compute.tf32``), or
    keep both in full fp32 precision (``enabled=False``). Nothing to do on other devices.

    Set through ``allow_tf32``: torch >= 2.9 mirrors it into its newer ``fp32_precision`` switches, whereas setting
    those makes every later read of ``allow_tf32`` (by torch.compile, DeepSpeed, ...) raise a RuntimeError."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
