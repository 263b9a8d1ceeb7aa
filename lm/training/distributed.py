"""Where this process runs (:func:`init_distributed`: engine kind, rank, world size, device, sequence-parallel
layout) and the collectives the engines and checkpoints use.

Every collective here runs on :func:`collective_device`, the device the process group's backend takes: NCCL
(CUDA) accepts only CUDA tensors, gloo (CPU) CPU ones. Gloo on CPU accepts what NCCL rejects, so a CPU test
cannot see a collective on the wrong device: nothing outside this module calls ``torch.distributed`` directly.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from lm.config import ConfigError, TrainConfig


class SequenceShard:
    """This rank's part of Ulysses sequence parallelism (DeepSpeed's ``DistributedAttention``): the ``size``
    consecutive ranks of one sequence-parallel group each hold a contiguous block of ``seq_len / size`` tokens
    of every sequence (``rank``: the block's index = the rank within the group), and attention trades tokens
    for heads with an all-to-all (rank ``r`` attends over every token of heads ``[r H/size, (r+1) H/size)``).

    The model uses only :meth:`tokens` (this rank's block of a ``(B, N, ...)`` tensor), ``rank`` and ``size``
    (global positions, head slices) and :meth:`attention`; it never sees the process group.
    """

    def __init__(self, rank: int, size: int, group=None):
        if not 0 <= rank < size:
            raise ValueError(f"sequence-parallel rank {rank} must be in [0, {size})")
        self.rank, self.size, self.group = rank, size, group
        self._exchange = None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of dim 1 of ``x`` ``(B, N, ...)`` -> ``(B, N / size, ...)``."""
        n = x.shape[1] // self.size
        return x[:, self.rank * n:(self.rank + 1) * n]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  local: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Ulysses attention: ``q``, ``k``, ``v`` ``(B, N / size, H, d)`` (this rank's tokens, all heads) go
        through an all-to-all to ``(B, N, H / size, d)`` (all tokens, this rank's heads), ``local`` maps those
        to the heads' outputs ``(B, N, H / size, d)``, and a second all-to-all returns ``(B, N / size, H, d)``.
        Differentiable (the backward is the reverse all-to-all). The exchange runs on the tensors' own device
        (the model's: CUDA under NCCL), through ``deepspeed.comm`` on this shard's group."""
        if self._exchange is None:
            from deepspeed.sequence.layer import DistributedAttention
            # batch-first (B, N, H, d): scatter heads (dim 2), gather tokens (dim 1)
            self._exchange = DistributedAttention(_CallLocal(), self.group, scatter_idx=2, gather_idx=1)
        return self._exchange(q, k, v, 0, None, local)


class _CallLocal(nn.Module):
    """The "local attention" handed to DeepSpeed's DistributedAttention: it calls the function passed with the
    tensors, so one exchange serves every layer (the layer is not registered inside DeepSpeed's module)."""

    def forward(self, q, k, v, local):
        return local(q, k, v)


@dataclass
class DistInfo:
    """Where this process runs: engine kind, rank, world size, device, and the sequence-parallel layout.

    Ranks ``[g * sp, (g + 1) * sp)`` form sequence-parallel group ``g`` (they share sequences); the group's
    index is the data-parallel rank (which rows of the global batch it takes)."""
    kind: str  # "deepspeed" | "torch"
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sequence: Optional[SequenceShard] = field(default=None)
    """This rank's sequence-parallel shard; None without sequence parallelism (sequence_parallel_size=1)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sp_size(self) -> int:
        return self.sequence.size if self.sequence is not None else 1

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: groups of ranks that hold different sequences."""
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size


def free_port() -> int:
    """A TCP port on localhost that is free now (for a single-machine process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_PORTS = (15000, 10000)
"""MASTER_PORT under SLURM when none is set: ``15000 + SLURM_JOB_ID % 10000`` (below the ephemeral ports; every
task of a job derives the same one, a requeued job too)."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list in its compressed form: ``node[007-009,012],gpu1`` -> ``node007``,
    ``rack[1-2]-n[01-04]`` -> ``rack1-n01``, ``a,b`` -> ``a``."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if first is None:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}: set MASTER_ADDR to the first node's name")
    return re.sub(r"\[([^,\]-]*)[^\]]*\]", r"\1", first.group(0))


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The ``torch.distributed`` variables of a task that ``srun`` started (one task per rank), from SLURM's:
    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), LOCAL_RANK = SLURM_LOCALID (0 when
    SLURM bound one GPU to the task: CUDA_VISIBLE_DEVICES names one), MASTER_ADDR = the first node of
    SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST), MASTER_PORT from SLURM_JOB_ID (:data:`SLURM_PORTS`). MASTER_*
    already set are kept. Nothing (``{}``) outside a job step (``SLURM_STEP_ID`` is set by srun, not in the batch
    script itself) or when a launcher already set RANK (``srun torchrun ...``, ``srun launch.sh``)."""
    if "RANK" in env or "SLURM_PROCID" not in env or not env.get("SLURM_STEP_ID", "").isdigit():
        return {}
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not world or (not nodes and "MASTER_ADDR" not in env):
        raise ConfigError("srun started this task but SLURM_NTASKS or SLURM_JOB_NODELIST is not set; start it "
                          "with srun inside a job (sbatch / salloc), or set RANK, WORLD_SIZE, LOCAL_RANK, "
                          "MASTER_ADDR and MASTER_PORT yourself")
    one_gpu = len([d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]) == 1
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world,
           "LOCAL_RANK": "0" if one_gpu else env.get("SLURM_LOCALID", "0"),
           "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes)}
    job = env.get("SLURM_JOB_ID", "")
    port = SLURM_PORTS[0] + (int(job) % SLURM_PORTS[1] if job.isdigit() else 0)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(port)
    return out


_BUILD_NOTICE = re.compile(r"^DeepSpeed [\w.]+ built successfully$")


@contextlib.contextmanager
def _without_build_notices(after_a_build_s: float = 30.0):
    """DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every CPU start,
    also when it only loads the op compiled on first use; the notice stays when the start took ``after_a_build_s``
    or more (a compile: about 2 minutes). The rest of what it prints passes through."""
    captured = io.StringIO()
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        built = time.monotonic() - start >= after_a_build_s
        kept = [line for line in captured.getvalue().splitlines(keepends=True)
                if built or not _BUILD_NOTICE.match(line.strip())]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Pick the engine and the device, start the process group, and (``deepspeed.sequence_parallel_size > 1``)
    DeepSpeed's sequence-parallel groups.

    ``engine=auto`` means DeepSpeed when a launcher started this process (``WORLD_SIZE`` is set, as by
    ``launch.sh`` / ``deepspeed`` / ``torchrun``, or derived here from SLURM's variables under ``srun``:
    :func:`slurm_environment`, written into ``os.environ`` where DeepSpeed reads them), the plain-torch twin
    otherwise. Backend: nccl on CUDA, gloo on CPU. The sequence-parallel size is checked against the world size
    here, before anything is built.
    """
    os.environ.update(slurm_environment(os.environ))
    launched = "WORLD_SIZE" in os.environ
    kind = cfg.engine if cfg.engine != "auto" else ("deepspeed" if launched else "torch")
    sp = cfg.deepspeed.sequence_parallel_size
    if sp > 1 and kind != "deepspeed":
        raise ConfigError(f"deepspeed.sequence_parallel_size={sp} needs the DeepSpeed engine: start with "
                          f"NGPU=<a multiple of {sp}> ./launch.sh CONFIG ... (not python tools/train.py), or set "
                          f"deepspeed.sequence_parallel_size=1")
    if launched:  # fail before the process group starts when the launcher's world cannot hold the layout
        cfg.gradient_accumulation_steps(int(os.environ["WORLD_SIZE"]))
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
        with _without_build_notices():
            deepspeed.init_distributed(dist_backend=backend)
    elif launched and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg.gradient_accumulation_steps(world)  # sequence-parallel size and batch split fit this world
    sequence = None
    if sp > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
        mpu.initialize_sequence_parallel(sp)  # groups of consecutive ranks + the sequence-data-parallel group
        sequence = SequenceShard(mpu.get_sequence_parallel_rank(), sp, mpu.get_sequence_parallel_group())
    return DistInfo(kind, rank, world, local_rank, device, sequence)


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
    """Raise if any rank holds different parameters or buffers (e.g. random-feature projections) than the others
    (collective; a no-op on one process).

    Compares per-tensor sums and sums of squares in float64 (which NCCL and gloo both reduce): cheap, and any
    divergence of data-parallel replicas (or of the ranks sharing a sequence) shows up.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    device = collective_device()
    local = torch.stack([s for p in [*module.parameters(), *module.buffers()]
                         for s in (p.detach().double().sum(), p.detach().double().square().sum())]).to(device)
    lo, hi = all_reduce(local.clone(), dist.ReduceOp.MIN), all_reduce(local.clone(), dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        worst = (hi - lo).abs().max().item()
        raise RuntimeError(f"ranks hold different parameters or buffers (largest checksum gap {worst:.3e}); "
                           f"this is a bug in the engine, not in the config")


def deepspeed_shm_buffer(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce (its shm comm op, used when the accelerator is the CPU
    and every rank is on one machine) creates for ``rank`` of this run (named by uid, MASTER_ADDR, MASTER_PORT and
    rank). DeepSpeed never unlinks it: about 66 MiB of memory (tmpfs) per rank and run, until reboot."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def shutdown() -> None:
    """End the process group, if one was started (at the end of a command), unlink this rank's shared-memory
    all-reduce buffer of DeepSpeed's (:func:`deepspeed_shm_buffer`; the other ranks have mapped it since the
    start, and a mapping outlives its name), and forget DeepSpeed's sequence-parallel groups (so a later run in
    the same process may build its own)."""
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if "deepspeed" in sys.modules:
            deepspeed_shm_buffer(rank).unlink(missing_ok=True)
    mpu = sys.modules.get("deepspeed.runtime.sequence_parallel.parallel_state_sp")
    if mpu is not None:
        mpu._SEQUENCE_PARALLEL_GROUP = mpu._SEQUENCE_DATA_PARALLEL_GROUP = None
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None and getattr(groups, "mpu", None) is mpu:
            groups.mpu = None
