"""The plain-torch engine and the derived DeepSpeed config (DeepSpeed itself runs in tests/test_launch.py)."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lm.config import ConfigError, load_config
from lm.engine import DistInfo, GuardedAdamW, TorchEngine, check_ranks_agree, deepspeed_config, token_nll_sum
from lm.model import Transformer

VOCAB, SEQ = 50, 12


def tiny_cfg(*overrides):
    return load_config([], ["model.vocab_size=50", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                            "model.d_ff=64", "model.dropout=0.0", "model.attention.num_features=8",
                            "model.attention.rpe_max_distance=16", "data.source=synthetic", "data.seq_len=12",
                            "batch_size=8", "micro_batch_size=2", "optim.warmup_steps=0", *overrides])


def tiny_model(cfg):
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    return model


def global_batch(step):
    return torch.randint(0, VOCAB, (8, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


def cpu_info(rank=0, world=1):
    return DistInfo("torch", rank, world, rank, torch.device("cpu"))


def run_steps(engine, rank, world, micro, steps=2):
    losses = []
    for step in range(steps):
        batch = global_batch(step)
        mine = batch.chunk(world)[rank].split(micro)
        losses.append(engine.train_step(mine, batch[:, 1:].numel(), lr=1e-2).loss)
    return losses


def _worker(rank, world, micro, out_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = tiny_cfg(f"micro_batch_size={micro}")
        torch.manual_seed(rank)  # a different init on each rank: the engine must broadcast rank 0's
        model = Transformer(cfg.model)
        model.init_weights()
        if rank == 0:
            model.load_state_dict(tiny_model(cfg).state_dict())
        engine = TorchEngine(cfg, model, cpu_info(rank, world))
        losses = run_steps(engine, rank, world, micro)
        check_ranks_agree(engine.module)
        torch.save({"losses": losses, "state": engine.module.state_dict()}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_one_rank_four_micro_equals_two_ranks_two_micro(tmp_path):
    cfg = tiny_cfg("micro_batch_size=2")
    single = TorchEngine(cfg, tiny_model(cfg), cpu_info())
    losses = run_steps(single, 0, 1, micro=2)  # 1 rank x 4 micro-batches of 2
    from lm.engine import _free_port
    mp.spawn(_worker, args=(2, 2, str(tmp_path / "out"), _free_port()), nprocs=2, join=True)  # 2 ranks x 2 micro
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert r0["losses"] == pytest.approx(losses, rel=1e-6)
    for k, v in single.module.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"update differs in {k}")
    # and the update is not trivially zero
    assert any(not torch.equal(v, tiny_model(cfg).state_dict()[k]) for k, v in single.module.state_dict().items())


def test_loss_is_the_mean_token_nll_of_the_global_batch():
    cfg = tiny_cfg("micro_batch_size=4")
    engine = TorchEngine(cfg, tiny_model(cfg), cpu_info())
    batch = global_batch(0)
    with torch.no_grad():
        expected = token_nll_sum(engine.module, batch).item() / batch[:, 1:].numel()
    stats = engine.train_step(list(batch.split(4)), batch[:, 1:].numel(), lr=0.0)
    assert stats.loss == pytest.approx(expected, rel=1e-6)
    assert math.isfinite(stats.grad_norm) and stats.grad_norm > 0 and not stats.skipped and stats.nonfinite == ""


def test_nonfinite_loss_skips_the_step_and_leaves_parameters_alone():
    cfg = tiny_cfg()
    engine = TorchEngine(cfg, tiny_model(cfg), cpu_info())
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
    cfg = tiny_cfg("batch_size=16", "micro_batch_size=2", "optim.grad_clip=0.5", "deepspeed.zero_stage=2",
                   "compute.precision=bf16", "deepspeed.torch_adam=false")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert "optimizer" not in deepspeed_config(tiny_cfg("deepspeed.torch_adam=true"), world_size=1)
    assert "scheduler" not in ds  # the schedule is lm.schedule.lr_at, applied by the engine every step


def test_batch_that_does_not_split_over_ranks_is_a_clear_error():
    cfg = tiny_cfg("batch_size=8", "micro_batch_size=4")
    assert cfg.gradient_accumulation_steps(world_size=2) == 1
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x ranks = 4 x 3"):
        cfg.gradient_accumulation_steps(world_size=3)
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x ranks"):
        TorchEngine(cfg, tiny_model(cfg), cpu_info(rank=0, world=3))


def test_plain_engine_refuses_what_only_deepspeed_does():
    cfg = tiny_cfg("deepspeed.zero_stage=1")
    with pytest.raises(ConfigError, match="zero_stage"):
        TorchEngine(cfg, tiny_model(cfg), cpu_info())
    cfg = tiny_cfg("compute.precision=fp16")
    with pytest.raises(ConfigError, match="fp16"):
        TorchEngine(cfg, tiny_model(cfg), cpu_info())


def test_activation_checkpointing_gives_the_same_update():
    cfg = tiny_cfg()
    out = []
    for recompute in (False, True):
        model = tiny_model(cfg)
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
    from lm.engine import DeepSpeedEngine, init_distributed
    cfg = tiny_cfg("engine=deepspeed", f"deepspeed.zero_stage={zero_stage}", "deepspeed.torch_adam=true")
    info = init_distributed(cfg)
    try:
        engine = DeepSpeedEngine(cfg, tiny_model(cfg), info)
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
    from lm.engine import _free_port
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))
    out = tmp_path / "out.pt"
    mp.spawn(_deepspeed_nonfinite_worker, args=(zero_stage, str(out), _free_port()), nprocs=1, join=True)
    r = torch.load(out, weights_only=False)
    assert not r["good"].skipped and r["good"].nonfinite == "" and math.isfinite(r["good"].grad_norm)
    assert r["bad"].skipped and r["bad"].nonfinite == "loss"
    assert r["same"], "a skipped step changed the parameters"
