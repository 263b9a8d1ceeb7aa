"""Process-wide numeric settings of the compute device, set explicitly from the config when a command starts
(training, eval_ppl, generate), never as a side effect of importing a module."""
from __future__ import annotations

import torch


def set_tf32(enabled: bool, device: str | torch.device) -> None:
    """On CUDA, let float32 matmuls (cuBLAS) and cuDNN convolutions use TF32 tensor cores (``compute.tf32``), or
    keep both in full fp32 precision (``enabled=False``). Nothing to do on other devices.

    Set through ``allow_tf32``: torch >= 2.9 mirrors it into its newer ``fp32_precision`` switches, whereas setting
    those makes every later read of ``allow_tf32`` (by torch.compile, DeepSpeed, ...) raise a RuntimeError."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
