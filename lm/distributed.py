"""Where this process runs (:func:`init_distributed`: engine kind, rank, world size, device) and the collectives
the engines and checkpoints use.

Every collective here runs on :func:`collective_device`, the device the process group's backend takes: NCCL
(CUDA) accepts only CUDA tensors, gloo (CPU) CPU ones. Gloo on CPU accepts what NCCL rejects, so a CPU test
cannot see a collective on the wrong device: nothing outside this module calls ``torch.distributed`` directly.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lm.config import ConfigError, TrainConfig


@dataclass
class DistInfo:
    """Where this process runs: engine kind, rank, world size and device."""
    kind: str  # "deepspeed" | "torch"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on localhost that is free now (for a single-machine process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Pick the engine and the device, and start the process group.

    ``engine=auto`` means DeepSpeed when a launcher started this process (``WORLD_SIZE`` is set, as by
    ``launch.sh`` / ``deepspeed``), the plain-torch twin otherwise. Backend: nccl on CUDA, gloo on CPU.
    """
    launched = "WORLD_SIZE" in os.environ
    kind = cfg.engine if cfg.engine != "auto" else ("deepspeed" if launched else "torch")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this rank to its own GPU
    if kind == "deepspeed":
        if not launched:  # a single process without a launcher: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    elif launched and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return DistInfo(kind, rank, world, local_rank, device)


def collective_device() -> torch.device:
    """The device collective tensors must live on: ``cuda:<LOCAL_RANK>`` when the process group's backend is NCCL
    (or includes it, e.g. ``cpu:gloo,cuda:nccl``), else the CPU (gloo; also when there is no process group).
    Reads only the backend's name: it allocates nothing and does not initialise CUDA."""
    if not dist.is_initialized():
        return torch.device("cpu")
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``x`` over ranks in place (nothing to do without a process group) and return it. The collective
    runs on :func:`collective_device`; ``x`` is copied there and back only if it lives elsewhere. With a
    process group of one rank it still runs, so a single-GPU run exercises the NCCL path too."""
    if not dist.is_initialized():
        return x
    device = collective_device()
    buf = x if x.device == device else x.to(device)
    dist.all_reduce(buf, op=op)
    if buf is not x:
        x.copy_(buf)
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` in place with rank ``src``'s value (nothing to do without a process group); returns ``x``."""
    if not dist.is_initialized():
        return x
    device = collective_device()
    buf = x if x.device == device else x.to(device)
    dist.broadcast(buf, src=src)
    if buf is not x:
        x.copy_(buf)
    return x


def barrier() -> None:
    """Wait for every rank (nothing to do without a process group). On NCCL the barrier names this rank's GPU,
    so it never falls back to guessing a device."""
    if not dist.is_initialized():
        return
    device = collective_device()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def check_ranks_agree(module: nn.Module) -> None:
    """Raise if any rank holds different parameters than the others (collective; a no-op on one process).

    Compares per-tensor sums and sums of squares in float64 (which NCCL and gloo both reduce): cheap, and any
    divergence of data-parallel replicas shows up.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    device = collective_device()
    local = torch.stack([s for p in module.parameters()
                         for s in (p.detach().double().sum(), p.detach().double().square().sum())]).to(device)
    lo, hi = all_reduce(local.clone(), dist.ReduceOp.MIN), all_reduce(local.clone(), dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        worst = (hi - lo).abs().max().item()
        raise RuntimeError(f"data-parallel ranks hold different parameters (largest checksum gap {worst:.3e}); "
                           f"this is a bug in the engine, not in the config")


def shutdown() -> None:
    """End the process group, if one was started (at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()
