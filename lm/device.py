"""The compute device: which one a ``--device`` / ``device=`` value names, and its process-wide settings (TF32, CPU
threads), set explicitly from the config when a command starts (training, eval_ppl, generate, harness), never as a
side effect of importing a module."""
from __future__ import annotations

from lm.errors import UserError


class DeviceError(UserError, ValueError):
    """A device this machine does not have (or no device at all); the message says what to use instead."""


def resolve_device(name: str) -> str:
    """A device as given (``auto``, ``cpu``, ``cuda``, ``cuda:N``) -> the device to use: ``auto`` is ``cuda`` when
    CUDA is available, else ``cpu``. A CUDA device on a machine without it (or without that index) is a
    :class:`DeviceError`, raised here rather than by the first tensor moved there."""
    import torch  # here, not at the top: the command lines import this module before parsing (a fast --help)

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


def set_tf32(enabled: bool, device) -> None:
    """On CUDA, let float32 matmuls (cuBLAS) and cuDNN convolutions use TF32 tensor cores (``compute.tf32``), or
    keep both in full fp32 precision (``enabled=False``). Nothing to do on other devices.

    Set through ``allow_tf32``: torch >= 2.9 mirrors it into its newer ``fp32_precision`` switches, whereas setting
    those makes every later read of ``allow_tf32`` (by torch.compile, DeepSpeed, ...) raise a RuntimeError."""
    import torch

    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def set_cpu_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads in torch's CPU kernels (``compute.cpu_threads``; 0 leaves torch's own
    choice); returns the count in use."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
