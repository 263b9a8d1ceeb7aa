"""The plain-torch engine and the derived DeepSpeed config (DeepSpeed itself runs in tests/test_launch.py)."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import cpu_info, tiny_model, tiny_train_config
from lm.config import ConfigError
from lm.training.distributed import check_ranks_agree, collective_device, free_port
from lm.training.engine import GuardedAdamW, TorchEngine, deepspeed_config

VOCAB, SEQ = 50, 12
NCCL_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
               torch.int64}


def global_batch(step):
    return torch.randint(0, VOCAB, (8, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


def run_steps(engine, rank, world, micro, steps=2):
    losses = []
    for step in range(steps):
        batch = global_batch(step)
        mine = batch.chunk(world)[rank].split(micro)
        losses.append(engine.train_step(mine, batch[:, 1:].numel(), lr=1e-2).loss)
    return losses


def _record_collectives(calls):
    """Wrap torch.distributed's collectives so that each call records the device and dtype of its tensor."""
    for name in ("all_reduce", "broadcast"):
        real = getattr(dist, name)

        def recording(tensor, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, str(tensor.device), tensor.dtype))
            return _real(tensor, *args, **kwargs)
        setattr(dist, name, recording)


def _worker(rank, world, micro, out_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    _record_collectives(calls)
    try:
        cfg = tiny_train_config(f"micro_batch_size={micro}")
        model = tiny_model(rank, config=cfg.model)  # a different init on each rank: the engine must broadcast rank 0's
        engine = TorchEngine(cfg, model, cpu_info(rank, world))
        losses = run_steps(engine, rank, world, micro)
        check_ranks_agree(engine.module)
        torch.save({"losses": losses, "state": engine.module.state_dict(), "calls": calls,
                    "collective_device": str(collective_device())}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_rank_four_micro_equals_two_ranks_two_micro(tmp_path):
    cfg = tiny_train_config("micro_batch_size=2")
    single = TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())
    losses = run_steps(single, 0, 1, micro=2)  # 1 rank x 4 micro-batches of 2
    mp.spawn(_worker, args=(2, 2, str(tmp_path / "out"), free_port()), nprocs=2, join=True)  # 2 ranks x 2 micro
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert r0["losses"] == pytest.approx(losses, rel=1e-6)
    for k, v in single.module.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"update differs in {k}")
    # and the update is not trivially zero
    assert any(not torch.equal(v, tiny_model(config=cfg.model).state_dict()[k]) for k, v in single.module.state_dict().items())
    # every collective ran on the backend's device, in a dtype NCCL reduces too
    assert r0["collective_device"] == "cpu" and {"all_reduce", "broadcast"} <= {c[0] for c in r0["calls"]}
    assert all(device == r0["collective_device"] and dtype in NCCL_DTYPES for _, device, dtype in r0["calls"])


def mean_next_token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """The mean NLL of predicting token t + 1 from tokens <= t, written out: logits of ``ids[:, :-1]`` scored
    against ``ids[:, 1:]`` (the model's training objective, independent of the engine's code)."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def gradients_at_step(engine) -> dict:
    """Make ``engine``'s optimizer record the gradients it is given (after all reductions, before clipping and
    the update) at its next step; returns the dict they will be written into."""
    seen, real_step = {}, engine.optimizer.step

    def recording_step(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)
    engine.optimizer.step = recording_step
    return seen


def test_loss_is_the_mean_token_nll_of_the_global_batch():
    cfg = tiny_train_config("micro_batch_size=4")
    engine = TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())
    batch = global_batch(0)
    with torch.no_grad():
        expected = mean_next_token_nll(engine.module, batch).item()
    stats = engine.train_step(list(batch.split(4)), batch[:, 1:].numel(), lr=0.0)
    assert stats.loss == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(stats.grad_norm) and stats.grad_norm > 0 and not stats.skipped and stats.nonfinite == ""


def test_one_micro_batch_of_eight_equals_four_of_two():
    """Gradient accumulation is exact: the same gradient, grad norm and update however the batch is split (the
    loss of each micro-batch is divided by the global batch's tokens, not its own)."""
    batch, results = global_batch(0), []
    for micro in (8, 2):
        cfg = tiny_train_config(f"micro_batch_size={micro}", "optim.grad_clip=0")
        engine = TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())
        before = {k: v.clone() for k, v in engine.module.state_dict().items()}
        grads = gradients_at_step(engine)
        stats = engine.train_step(list(batch.split(micro)), batch[:, 1:].numel(), lr=1e-2)
        results.append((stats, grads, {k: v - before[k] for k, v in engine.module.state_dict().items()}))
    (one, grads_one, after_one), (four, grads_four, after_four) = results
    assert four.grad_norm == pytest.approx(one.grad_norm, rel=1e-5) and four.loss == pytest.approx(one.loss)
    assert grads_one.keys() == grads_four.keys() and grads_one
    for k in grads_one:
        torch.testing.assert_close(grads_four[k], grads_one[k], rtol=1e-5, atol=1e-7, msg=f"gradient of {k}")
    for k in after_one:  # Adam's first update is about lr = 1e-2 per element: 1e-6 is 1e-4 of it
        torch.testing.assert_close(after_four[k], after_one[k], rtol=1e-4, atol=1e-6, msg=f"update of {k}")


def test_grad_norm_is_the_norm_of_the_gradient_of_the_mean_token_nll():
    """The engine's grad norm (4 micro-batches) equals the norm of d(mean token NLL)/d(params) from one plain
    forward of the whole batch."""
    cfg = tiny_train_config("micro_batch_size=2")
    model = tiny_model(config=cfg.model)
    batch = global_batch(0)
    reference = tiny_model(config=cfg.model)
    reference.train()
    mean_next_token_nll(reference, batch).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()
                                                     if p.grad is not None])).item()
    stats = TorchEngine(cfg, model, cpu_info()).train_step(list(batch.split(2)), batch[:, 1:].numel(), lr=1e-2)
    assert stats.grad_norm == pytest.approx(expected, rel=1e-5)


def test_nonfinite_loss_skips_the_step_and_leaves_parameters_alone():
    cfg = tiny_train_config()
    engine = TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())
    with torch.no_grad():
        engine.module.tok_emb.weight[3] = float("nan")
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    batch = global_batch(0)
    batch[0, 0] = 3
    stats = engine.train_step(list(batch.split(2)), batch[:, 1:].numel(), lr=1e-2)
    assert stats.skipped and stats.nonfinite == "loss" and not math.isfinite(stats.loss)
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all() and torch.equal(
            v.nan_to_num(), before[k].nan_to_num()), k
    assert not engine.optimizer.state, "a skipped step must not touch the Adam moments"


def test_guarded_adamw_skips_nonfinite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step()
    assert opt.overflow and torch.equal(p.data, torch.ones(3)) and not opt.state
    p.grad = torch.tensor([1.0, 1.0, 0.0])
    opt.step()
    assert not opt.overflow and not torch.equal(p.data, torch.ones(3))


def test_deepspeed_config_is_derived_from_the_train_config():
    cfg = tiny_train_config("batch_size=16", "micro_batch_size=2", "optim.grad_clip=0.5", "deepspeed.zero_stage=2",
                   "compute.precision=bf16", "deepspeed.torch_adam=false")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert "optimizer" not in deepspeed_config(tiny_train_config("deepspeed.torch_adam=true"), world_size=1)
    assert "scheduler" not in ds  # the schedule is lm.training.schedule.lr_at, applied by the engine every step


def test_batch_that_does_not_split_over_ranks_is_a_clear_error():
    cfg = tiny_train_config("batch_size=8", "micro_batch_size=4")
    assert cfg.gradient_accumulation_steps(world_size=2) == 1
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x ranks = 4 x 3"):
        cfg.gradient_accumulation_steps(world_size=3)
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x ranks"):
        TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info(rank=0, world=3))


def test_plain_engine_refuses_what_only_deepspeed_does():
    cfg = tiny_train_config("deepspeed.zero_stage=1")
    with pytest.raises(ConfigError, match="zero_stage"):
        TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())
    cfg = tiny_train_config("compute.precision=fp16")
    with pytest.raises(ConfigError, match="fp16"):
        TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())


def test_activation_checkpointing_gives_the_same_update():
    cfg = tiny_train_config()
    out = []
    for recompute in (False, True):
        model = tiny_model(config=cfg.model)
        model.activation_checkpointing = recompute
        engine = TorchEngine(cfg, model, cpu_info())
        stats = run_steps(engine, 0, 1, micro=2, steps=1)
        out.append((stats, engine.module.state_dict()))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for k, v in out[0][1].items():
        torch.testing.assert_close(out[1][1][k], v, rtol=1e-5, atol=1e-7)


def _deepspeed_nonfinite_worker(rank, zero_stage, out_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    from lm.training.distributed import init_distributed
    from lm.training.engine import DeepSpeedEngine
    cfg = tiny_train_config("engine=deepspeed", f"deepspeed.zero_stage={zero_stage}", "deepspeed.torch_adam=true")
    info = init_distributed(cfg)
    try:
        engine = DeepSpeedEngine(cfg, tiny_model(config=cfg.model), info)
        batch = global_batch(0)
        good = engine.train_step(list(batch.split(2)), batch[:, 1:].numel(), lr=1e-2)
        with torch.no_grad():
            engine.module.tok_emb.weight[3] = float("nan")
        before = engine.consolidated_state_dict()
        batch[0, 0] = 3
        bad = engine.train_step(list(batch.split(2)), batch[:, 1:].numel(), lr=1e-2)
        after = engine.consolidated_state_dict()
        same = all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
        torch.save({"good": good, "bad": bad, "same": same}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_deepspeed_engine_skips_nonfinite_steps(tmp_path, zero_stage):
    """Stage 0 fp32 skips through GuardedAdamW, ZeRO through DeepSpeed's own overflow check."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))
    out = tmp_path / "out.pt"
    mp.spawn(_deepspeed_nonfinite_worker, args=(zero_stage, str(out), free_port()), nprocs=1, join=True)
    r = torch.load(out, weights_only=False)
    assert not r["good"].skipped and r["good"].nonfinite == "" and math.isfinite(r["good"].grad_norm)
    assert r["bad"].skipped and r["bad"].nonfinite == "loss"
    assert r["same"], "a skipped step changed the parameters"


# ------------------------------------------------------------------ collectives on the backend's device (NCCL: CUDA)
@pytest.mark.parametrize("backend, local_rank, expected", [
    ("nccl", "3", "cuda:3"), ("cpu:gloo,cuda:nccl", "1", "cuda:1"), ("gloo", "3", "cpu"), (None, "0", "cpu")])
def test_collectives_run_on_the_device_the_backend_takes(monkeypatch, backend, local_rank, expected):
    """NCCL rejects CPU tensors (gloo accepts CUDA ones), so the helper must route by the backend's name; it
    only names the device, so this runs without a GPU and allocates nothing."""
    import lm.training.distributed
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(lm.training.distributed.dist, "is_initialized", lambda: backend is not None)
    monkeypatch.setattr(lm.training.distributed.dist, "get_backend", lambda group=None: backend)
    assert collective_device() == torch.device(expected)


def test_nothing_outside_lm_distributed_calls_torch_distributed_collectives():
    import ast
    lm_dir = Path(__file__).resolve().parents[1] / "lm"
    collectives = {"all_reduce", "broadcast", "barrier", "all_gather", "all_gather_into_tensor", "reduce",
                   "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "send", "recv"}
    offenders = []
    for path in lm_dir.rglob("*.py"):
        if path == lm_dir / "training" / "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            owner = node.value if isinstance(node, ast.Attribute) else None
            if node.__class__ is ast.Attribute and node.attr in collectives and (
                    isinstance(owner, ast.Name) and owner.id == "dist"
                    or isinstance(owner, ast.Attribute) and owner.attr == "distributed"):
                offenders.append(f"{path.relative_to(lm_dir.parent)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                offenders.append(f"{path.relative_to(lm_dir.parent)}:{node.lineno} from torch.distributed import")
    assert not offenders, f"collectives must go through lm.training.distributed (the backend's device): {offenders}"


def test_skip_next_step_leaves_parameters_and_moments_alone():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.skip_next_step()
    opt.step()
    assert opt.overflow and torch.equal(p.data, torch.ones(3)) and not opt.state
    opt.step()  # only the next step
    assert not opt.overflow and not torch.equal(p.data, torch.ones(3))


# ------------------------------------------------------------------ the device and TF32 (lm/device.py)
def test_device_names_resolve_or_say_what_to_use():
    from lm.device import DeviceError, resolve_device
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("meta") == "meta"
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(DeviceError, match="is not a device; use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(DeviceError, match="CUDA is not available" if not torch.cuda.is_available() else
                       f"has {torch.cuda.device_count()} CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_tf32_follows_the_config_on_cuda_and_is_a_no_op_elsewhere():
    from lm.device import set_tf32
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for enabled in (True, False, True):
            set_tf32(enabled, "cuda")  # sets the process-wide switches only: no GPU needed
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
            set_tf32(not enabled, torch.device("cpu"))
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
        assert torch.get_float32_matmul_precision() == "high"  # readable by others (torch.compile, DeepSpeed)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("tf32", [True, False])
def test_the_engine_applies_compute_tf32_when_it_starts(monkeypatch, tf32):
    import lm.training.engine
    calls = []
    monkeypatch.setattr(lm.training.engine, "set_tf32", lambda enabled, device: calls.append((enabled, str(device))))
    cfg = tiny_train_config(f"compute.tf32={str(tf32).lower()}")
    TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())
    assert calls == [(tf32, "cpu")]


def _deepspeed_bf16_tables_worker(rank, out_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_fp32_param

    from lm.training.distributed import init_distributed
    from lm.training.engine import DeepSpeedEngine
    cfg = tiny_train_config("engine=deepspeed", "deepspeed.zero_stage=1", "deepspeed.torch_adam=true",
                            "compute.precision=bf16", "compute.tf32=false")
    info = init_distributed(cfg)
    try:
        engine = DeepSpeedEngine(cfg, tiny_model(config=cfg.model, looks_trained=True), info)
        rows = []
        for step in range(2):
            batch = global_batch(step)
            engine.train_step(list(batch.split(2)), batch[:, 1:].numel(), lr=1e-3)
            for r in engine.module.rpe:
                rows.append({"bias_dtype": str(r.bias.dtype), "values": r.values().detach().clone(),
                             "bias": r.bias.detach().float().clone(),
                             "master": safe_get_full_fp32_param(r.bias).detach().clone()})
        tables = engine.module.rpe_tables()
        saved = engine.consolidated_state_dict()
        torch.save({"rows": rows, "tables_dtype": [str(t.dtype) for t in tables if t is not None],
                    "saved": {k: v for k, v in saved.items() if k.startswith("rpe.")}}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rpe_tables_are_float32_master_values_under_deepspeed_bf16(tmp_path):
    """DeepSpeed bf16 keeps every parameter in bf16 (a log-weight of 5 nats then moves in steps of 0.03): after
    each step the tables the model uses are the optimizer's float32 master values, while the parameter that
    takes the gradient stays bf16."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))
    out = tmp_path / "out.pt"
    mp.spawn(_deepspeed_bf16_tables_worker, args=(str(out), free_port()), nprocs=1, join=True)
    r = torch.load(out, weights_only=False)
    assert r["rows"] and r["tables_dtype"] and set(r["tables_dtype"]) == {"torch.float32"}
    for row in r["rows"]:
        assert row["bias_dtype"] == "torch.bfloat16" and row["values"].dtype == torch.float32
        assert torch.equal(row["values"], row["master"])  # the float32 master, bit for bit
        assert not torch.equal(row["values"], row["bias"])  # which bf16 cannot hold
    last = r["rows"][-len(r["saved"]):]
    for (name, saved), row in zip(r["saved"].items(), last):
        assert torch.equal(saved, row["values"]), name  # checkpoints hold the same float32 values
