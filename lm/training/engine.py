"""One training step, two interchangeable engines: DeepSpeed, and a plain-torch twin with the same interface.

``train.py`` calls only :meth:`Engine.train_step`, :meth:`Engine.save_state` / :meth:`Engine.load_state` and
:meth:`Engine.consolidated_state_dict`; which engine runs is decided once by :func:`lm.training.distributed.init_distributed`.
Collectives go through :mod:`lm.training.distributed` (on the device the backend takes).

Loss normalisation: every micro-batch contributes ``sum of token NLLs / global_tokens``, where ``global_tokens``
counts the targets of the whole optimizer step (all ranks, all micro-batches). Gradients are then summed over
micro-batches and ranks, so the update is the gradient of the mean token NLL of the global batch, independent of
how the batch is split. (DeepSpeed averages gradients over data-parallel replicas, so its loss is multiplied by
their number, ``world_size / sequence_parallel_size``.)

Sequence parallelism (DeepSpeed only): each rank of a sequence-parallel group feeds the model its block of the
inputs and of the shifted targets (sharded after the shift) and contributes the NLL sum of its block's tokens.
DeepSpeed sums gradients over all ranks (its sequence-data-parallel group) and divides by the data-parallel
size, so with the multiplier above the update is again that of the mean token NLL of the global batch.

Skipped steps: a step whose loss or gradients are non-finite, or whose loss exceeds the ``loss_limit`` the
caller passes (a loss spike, see :mod:`lm.training.divergence`), leaves the parameters and the optimizer state untouched,
whichever engine and DeepSpeed optimizer runs it (:class:`GuardedAdamW` is told to skip; DeepSpeed's own ZeRO /
bf16 / fp16 optimizers skip a step whose gradients are non-finite, so a spike's last backward is given a NaN loss).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ConfigError, TrainConfig
from lm.data.batches import document_starts
from lm.device import set_cpu_threads, set_tf32
from lm.fileio import open_for_writing
from lm.training.distributed import DistInfo, all_reduce, broadcast
from lm.training.divergence import bad_step
from lm.training.optimizer_state import MomentsUnsupported, gather_moments, scatter_master_weights, scatter_moments

MOMENTS = "adam_moments.pt"
"""Beside DeepSpeed's checkpoint: the Adam moments by parameter name, for resuming on another layout."""

Flags = Callable[[], Sequence[bool]]
"""This rank's booleans for a step's reduction, read when the reduction runs (:meth:`Engine.train_step`)."""


@dataclass
class StepStats:
    """Outcome of one optimizer step (identical on every rank)."""
    loss: float
    """Mean token NLL of the global batch in nats (non-finite if any micro-batch was)."""
    grad_norm: float
    """Global gradient 2-norm before clipping (inf / nan when non-finite)."""
    lr: float
    skipped: bool
    """True when the parameters were left unchanged."""
    bad: str = ""
    """Why the step counts as bad (:func:`lm.training.divergence.bad_step`): "loss" / "gradients" (non-finite),
    "spike" (a finite loss above the step's ``loss_limit``), or "" for a good step."""
    flags: tuple[bool, ...] = ()
    """The caller's ``flags`` (see :meth:`Engine.train_step`), each true when any rank raised it: agreed by every
    rank in the step's one reduction (e.g. "stop after this step", :mod:`lm.training.preemption`)."""

    @property
    def nonfinite(self) -> str:
        """What went non-finite: "loss", "gradients", or ""."""
        return self.bad if self.bad in ("loss", "gradients") else ""

    @property
    def spike(self) -> bool:
        return self.bad == "spike"


def token_nll_sum(model: nn.Module, batch: torch.Tensor, shard=None, document_eos: int | None = None) -> torch.Tensor:
    """Sum of next-token NLLs (nats, float32 scalar) of a ``(B, N + 1)`` window batch: inputs ``[:, :-1]``,
    targets ``[:, 1:]``. With a sequence-parallel ``shard`` (:class:`lm.training.distributed.SequenceShard`), only this
    rank's block of inputs and targets (cut after the shift): the NLL sum of the block's tokens. With
    ``document_eos`` (``data.document_mask``), the inputs' document starts (:func:`lm.data.batches.document_starts`,
    over the whole sequence, computed on the device) keep documents apart."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    extra = {} if document_eos is None else {"document_starts": document_starts(inputs, document_eos)}
    if shard is None:
        logits = model(inputs, **extra)
    else:
        inputs, targets = shard.tokens(inputs), shard.tokens(targets)
        logits = model(inputs, shard=shard, **extra)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (dim >= 2) only, none on norms, biases and RPE scalars."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves parameters and moments untouched when a gradient is non-finite, or when told to skip.

    Gradients are already reduced over ranks when ``step`` runs, so every rank takes the same decision.
    ``overflow`` is the flag DeepSpeed reads after a step to count it as skipped.
    """
    overflow: bool = False
    _skip_next: bool = False

    def skip_next_step(self) -> None:
        """Make the next :meth:`step` a skipped one whatever the gradients (e.g. the loss was non-finite)."""
        self._skip_next = True

    @torch.no_grad()
    def step(self, closure=None):
        if self._skip_next:
            self.overflow, self._skip_next = True, False
        else:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            return None
        return super().step(closure)


def _adamw(cfg: TrainConfig, params, guarded: bool = True) -> torch.optim.AdamW:
    o = cfg.optim
    kind = GuardedAdamW if guarded else torch.optim.AdamW
    return kind(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config, derived from ``cfg`` (never written by hand).

    The learning rate is not scheduled by DeepSpeed: :func:`lm.training.schedule.lr_at` sets it before every step, so a
    skipped step or a resume can never shift the schedule. With ``deepspeed.torch_adam=true`` the optimizer is
    torch's AdamW passed as a client optimizer (:class:`GuardedAdamW` under plain stage 0 fp32; no extension
    to compile); otherwise DeepSpeed builds its
    own (fused on GPU, compiled CPU Adam on CPU) from the ``optimizer`` block below.
    """
    ds, precision = cfg.deepspeed, cfg.compute.precision
    o = cfg.optim
    conf = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps(world_size),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.sequence_parallel_size > 1:  # DeepSpeed then counts world / SP data-parallel replicas in the batch
        conf["sequence_parallel_size"] = ds.sequence_parallel_size
    if not ds.torch_adam:
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                         "weight_decay": o.weight_decay}}
    return conf


class Engine:
    """Interface shared by both engines (``module`` is the bare model, for eval, redraw and checkpoints)."""
    module: nn.Module
    info: DistInfo
    cfg: TrainConfig

    def _start(self, cfg: TrainConfig, info: DistInfo) -> None:
        """What every engine does first: keep the config and placement, and apply ``compute.tf32`` and
        ``compute.cpu_threads``."""
        self.cfg, self.info = cfg, info
        set_tf32(cfg.compute.tf32, info.device)
        set_cpu_threads(cfg.compute.cpu_threads)

    def train_step(self, micro_batches: Sequence[torch.Tensor], global_tokens: int, lr: float,
                   loss_limit: float = math.inf, flags: Optional[Flags] = None,
                   document_eos: Optional[int] = None) -> StepStats:
        """Forward/backward every ``(micro, N + 1)`` micro-batch of this rank, then one optimizer step at ``lr``,
        skipped when the step's loss is non-finite or above ``loss_limit`` (the same on every rank), or its
        gradients are non-finite. ``flags``, called once right before the step's reduction, gives this rank's
        host-side booleans; :attr:`StepStats.flags` says which of them any rank raised (no extra collective).
        ``document_eos``: keep the documents of each window apart (``data.document_mask``; :func:`token_nll_sum`)."""
        raise NotImplementedError

    def save_state(self, directory: Path) -> None:
        """Write optimizer/engine state under ``directory`` (collective: every rank calls it)."""
        raise NotImplementedError

    def load_state(self, directory: Path) -> None:
        raise NotImplementedError

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 model weights on CPU (the optimizer's fp32 master copy under mixed precision).
        Collective: every rank calls it; every rank gets the same dict."""
        raise NotImplementedError

    @staticmethod
    def _global_loss(nll: list[torch.Tensor], flags: Optional[Flags] = None) -> tuple[float, bool, tuple[bool, ...]]:
        """(summed token NLL of the whole step over every micro-batch of every rank, whether any of them was
        non-finite, which of this rank's ``flags()`` any rank raised), from this rank's per-micro-batch sums: one
        all-reduce and one host read per step. The flags ride in the same tensor as counts of ranks (SUM > 0 is
        "any"), written by fill kernels from host scalars: no host-to-device copy to wait for."""
        total = sum(nll)
        finite = torch.stack([torch.isfinite(x) for x in nll]).all().float()
        votes = [total.new_full((), float(bool(f))) for f in (flags() if flags is not None else ())]
        loss_sum, nonfinite, *raised = all_reduce(torch.stack([total, 1.0 - finite, *votes]).double()).tolist()
        return loss_sum, nonfinite > 0, tuple(r > 0 for r in raised)


class TorchEngine(Engine):
    """Plain torch: autocast for bf16, gradients summed over ranks with one all-reduce per step."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, info: DistInfo):
        if cfg.compute.precision == "fp16":
            raise ConfigError("compute.precision=fp16 needs the DeepSpeed engine (loss scaling): start through "
                              "launch.sh / set engine=deepspeed, or use compute.precision=bf16 or fp32")
        if cfg.deepspeed.zero_stage:
            raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} needs the DeepSpeed engine: "
                              f"start through launch.sh / set engine=deepspeed, or use deepspeed.zero_stage=0")
        if cfg.deepspeed.sequence_parallel_size > 1:
            raise ConfigError(f"deepspeed.sequence_parallel_size={cfg.deepspeed.sequence_parallel_size} needs the "
                              f"DeepSpeed engine: start through launch.sh (NGPU=N ./launch.sh CONFIG ...), or set "
                              f"deepspeed.sequence_parallel_size=1")
        cfg.gradient_accumulation_steps(info.world_size)
        self._start(cfg, info)
        self.module = model.to(info.device)
        if info.world_size > 1:  # identical start on every rank, whatever each rank's init did
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                broadcast(t.data, src=0)
        self.optimizer = _adamw(cfg, param_groups(self.module, cfg.optim.weight_decay))
        self.autocast = (torch.autocast(info.device.type, dtype=torch.bfloat16)
                         if cfg.compute.precision == "bf16" else nullcontext())

    def train_step(self, micro_batches, global_tokens, lr, loss_limit=math.inf, flags=None, document_eos=None):
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        nll = []
        for mb in micro_batches:
            with self.autocast:
                loss = token_nll_sum(self.module, mb.to(self.info.device), document_eos=document_eos)
            nll.append(loss.detach())
            (loss / global_tokens).backward()
        loss_sum, loss_bad, raised = self._global_loss(nll, flags)
        if self.info.world_size > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = all_reduce(torch._utils._flatten_dense_tensors(grads))
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                p.grad = g
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        _set_lr(self.optimizer, lr)
        loss = math.nan if loss_bad else loss_sum / global_tokens
        known = bad_step(loss, loss_limit)  # what the loss alone says, before the update
        if known:  # the guard itself only sees gradients
            self.optimizer.skip_next_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        skipped = self.optimizer.overflow
        return StepStats(loss_sum / global_tokens, grad_norm, lr, skipped,
                         bad_step(loss, loss_limit, gradients_finite=not (skipped and not known)), raised)

    def save_state(self, directory):
        if self.info.is_main:
            with open_for_writing(Path(directory) / "optimizer.pt") as f:  # a full disk: OSError, errno and path
                torch.save({"optimizer": self.optimizer.state_dict()}, f)

    def load_state(self, directory):
        path = Path(directory) / "optimizer.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by the plain-torch engine "
                                    f"(resume it with engine=deepspeed through launch.sh)")
        self.optimizer.load_state_dict(torch.load(path, map_location=self.info.device, weights_only=True)["optimizer"])

    def consolidated_state_dict(self):
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}


class DeepSpeedEngine(Engine):
    """DeepSpeed: ZeRO 0-2, bf16/fp16, accumulation and clipping as configured by :func:`deepspeed_config`."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, info: DistInfo):
        import deepspeed
        ds = cfg.deepspeed
        if not ds.torch_adam and ds.zero_stage == 0 and cfg.compute.precision == "fp32":
            raise ConfigError("deepspeed.torch_adam=false with deepspeed.zero_stage=0 and compute.precision=fp32 "
                              "cannot skip steps with non-finite gradients; set deepspeed.torch_adam=true, "
                              "deepspeed.zero_stage>=1 or compute.precision=bf16/fp16")
        self._start(cfg, info)
        self.ds_config = deepspeed_config(cfg, info.world_size)
        groups = param_groups(model, cfg.optim.weight_decay)
        # DeepSpeed's ZeRO / bf16 / fp16 optimizers skip steps with non-finite gradients themselves; only plain
        # stage 0 in fp32 steps the client optimizer directly, so only there does it need the guard.
        plain = ds.zero_stage == 0 and cfg.compute.precision == "fp32"
        optimizer = _adamw(cfg, groups, guarded=plain) if ds.torch_adam else None
        mpu = None
        if info.sequence is not None:  # its groups were built by init_distributed; DeepSpeed reduces over them
            from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, config=self.ds_config, mpu=mpu)
        self.module = self.engine.module
        self._use_master_tables()
        if info.world_size > 1:  # DeepSpeed broadcasts parameters only; random-feature projections are buffers
            for t in self.module.buffers():
                broadcast(t.data, src=0)
        if info.sequence is not None and info.is_main:
            print(f"sequence parallel: {info.sp_size} ranks per sequence ({cfg.data.seq_len // info.sp_size} tokens "
                  f"each) x {info.dp_size} data-parallel replica(s)", flush=True)

    def _set_lr(self, lr):
        _set_lr(self.engine.optimizer, lr)
        basic = getattr(self.engine, "basic_optimizer", None)
        if basic is not None:
            _set_lr(basic, lr)

    def train_step(self, micro_batches, global_tokens, lr, loss_limit=math.inf, flags=None, document_eos=None):
        engine = self.engine
        engine.train()
        if len(micro_batches) != engine.gradient_accumulation_steps():
            raise ValueError(f"got {len(micro_batches)} micro-batches, DeepSpeed expects "
                             f"{engine.gradient_accumulation_steps()}")
        self._set_lr(lr)
        skipped_before = engine.skipped_steps
        guarded = isinstance(engine.optimizer, GuardedAdamW)  # stage 0, fp32: gradients are reduced in .grad
        nll = []
        for i, mb in enumerate(micro_batches):
            loss = token_nll_sum(engine, mb.to(self.info.device), self.info.sequence, document_eos)
            nll.append(loss.detach())
            scale = self.info.dp_size / global_tokens  # DeepSpeed averages over data-parallel replicas
            if i == len(micro_batches) - 1:  # the step's loss is known before its last backward
                loss_sum, loss_bad, raised = self._global_loss(nll, flags)
                known = bad_step(math.nan if loss_bad else loss_sum / global_tokens, loss_limit)
                spike = known == "spike"
                if spike and not guarded:  # DeepSpeed's own optimizers skip a step whose gradients are non-finite
                    scale = math.nan
            engine.backward(loss * scale, scale_wrt_gas=False)
            if i < len(micro_batches) - 1:
                engine.step()
        grad_norm = None
        if guarded:
            grads = [p.grad.float() for p in self.module.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if known:  # DeepSpeed steps this optimizer itself and counts the step skipped on overflow
                engine.optimizer.skip_next_step()
        scaler = _LossScaleState(engine.optimizer) if spike and not guarded else None
        engine.step()
        self._use_master_tables()
        if scaler is not None:
            scaler.restore()  # a forced skip is not an fp16 overflow: the loss scale stays as it was
            grad_norm = math.nan  # unknown: the gradients were made non-finite on purpose
        if grad_norm is None:
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        skipped = engine.skipped_steps > skipped_before
        # a skip the loss did not ask for: non-finite gradients, unless fp16's loss scaler overflowed (not a bad step)
        unasked = skipped and not known and self.cfg.compute.precision != "fp16"
        return StepStats(loss_sum / global_tokens, grad_norm, lr, skipped,
                         bad_step(math.nan if loss_bad else loss_sum / global_tokens, loss_limit,
                                  gradients_finite=not unasked), raised)

    def _use_master_tables(self) -> None:
        """Half precision: the RPE tables the model uses are the optimizer's float32 master values (collective: one
        small all-reduce per table under ZeRO; see ``lm.model.rpe``)."""
        if self.cfg.compute.precision not in ("bf16", "fp16"):
            return
        from deepspeed.utils import safe_get_full_fp32_param
        for m in self.module.modules():
            if hasattr(m, "use_master") and isinstance(getattr(m, "bias", None), nn.Parameter):
                m.use_master(safe_get_full_fp32_param(m.bias))

    def layout(self) -> dict:
        """What DeepSpeed's own optimizer files depend on (not the sequence-parallel degree: DeepSpeed partitions
        over all ranks whatever it is)."""
        return {"world_size": self.info.world_size, "zero_stage": self.cfg.deepspeed.zero_stage,
                "precision": self.cfg.compute.precision}

    def save_state(self, directory):
        """DeepSpeed's checkpoint (``deepspeed/``, exact resume on the same layout) and, beside it, the Adam moments
        by parameter name (``adam_moments.pt``, see :mod:`lm.training.optimizer_state`) for a resume on another layout."""
        self.engine.save_checkpoint(str(directory), tag="deepspeed", save_latest=False)
        try:
            moments = gather_moments(self.module, self.engine.optimizer)  # collective
        except MomentsUnsupported:
            return  # such a checkpoint resumes on its own layout only (load_state says so)
        if self.info.is_main:
            with open_for_writing(Path(directory) / MOMENTS) as f:
                torch.save({"layout": self.layout(), "sequence_parallel_size": self.info.sp_size, **moments}, f)

    def load_state(self, directory):
        """DeepSpeed's own state when the checkpoint was written on this layout (same number of ranks, ZeRO stage
        and precision; the sequence-parallel degree may differ); otherwise the fp32 master weights from
        ``model.pt`` and the Adam moments from ``adam_moments.pt`` (DeepSpeed's partitioned files fit only their
        own layout; a fp16 loss scale then starts afresh)."""
        path = Path(directory) / "deepspeed"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing: this checkpoint was written by the plain-torch engine "
                                    f"(resume it with engine=torch, i.e. python tools/train.py without launch.sh)")
        moments_path = Path(directory) / MOMENTS
        saved = torch.load(moments_path, map_location="cpu", weights_only=True) if moments_path.is_file() else None
        if saved is None or saved["layout"] == self.layout():
            load_path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed",
                                                       load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
            self._use_master_tables()
            return
        weights = torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True)
        scatter_master_weights(self.module, weights)
        self._use_master_tables()
        scatter_moments(self.module, self.engine.optimizer, saved)
        if self.info.is_main:
            print(f"{directory} was written on another layout ({saved['layout']}; now {self.layout()}): weights "
                  f"and Adam moments restored from model.pt and {MOMENTS}", flush=True)

    def consolidated_state_dict(self):
        from deepspeed.utils import safe_get_full_fp32_param
        params = dict(self.module.named_parameters(remove_duplicate=False))
        out = {}
        for name, value in self.module.state_dict().items():
            full: Optional[torch.Tensor] = safe_get_full_fp32_param(params[name]) if name in params else None
            out[name] = (full if full is not None else value).detach().float().cpu().clone()
        return out


class _LossScaleState:
    """A copy of the loss-scaler state of a DeepSpeed optimizer (ZeRO keeps it in ``loss_scaler``, the fp16
    optimizer in ``loss_scale_config``), to undo what a deliberately skipped step did to it."""

    def __init__(self, optimizer):
        self.saved = [(obj, dict(vars(obj))) for obj in (getattr(optimizer, name, None)
                                                          for name in ("loss_scaler", "loss_scale_config"))
                      if obj is not None and hasattr(obj, "__dict__")]

    def restore(self) -> None:
        for obj, state in self.saved:
            obj.__dict__.update(state)


def build_engine(cfg: TrainConfig, model: nn.Module, info: DistInfo) -> Engine:
    return DeepSpeedEngine(cfg, model, info) if info.kind == "deepspeed" else TorchEngine(cfg, model, info)
