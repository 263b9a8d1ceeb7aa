"""Bad steps: the spike rule on synthetic loss curves, the divergence bookkeeping, the per-step JSONL, and the
engines skipping a spike (parameters and optimizer state untouched)."""
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import cpu_info, tiny_model, tiny_train_config
from lm.config import DivergenceConfig
from lm.training.distributed import free_port
from lm.training.divergence import DivergenceMonitor, replay, spike_limit
from lm.training.engine import StepStats, TorchEngine
from lm.training.steplog import StepLog, read_steps, truncate_after


def healthy_curve(n=200, seed=0):
    """A loss falling from ~ln(16000) towards 3 with 3% multiplicative batch noise."""
    g = torch.Generator().manual_seed(seed)
    noise = 1 + 0.03 * torch.randn(n, generator=g)
    return [float((3 + 6.7 * math.exp(-i / 30)) * noise[i]) for i in range(n)]


# ------------------------------------------------------------------ the rule
def test_a_healthy_curve_has_no_bad_steps():
    assert set(replay(healthy_curve(), DivergenceConfig())) == {""}


def test_a_spike_is_bad_and_stays_out_of_the_reference():
    losses = healthy_curve(60)
    losses[40] *= 1.8
    verdicts = replay(losses, DivergenceConfig(spike_factor=1.5, spike_window=10))
    assert verdicts[40] == "spike" and verdicts.count("spike") == 1
    monitor = DivergenceMonitor(DivergenceConfig(spike_factor=1.5, spike_window=10))
    for step, loss in enumerate(losses[:41], start=1):
        limit = monitor.loss_limit()
        monitor.record(step, loss, "spike" if loss > limit else "", limit)
    assert monitor.loss_limit() == pytest.approx(1.5 * statistics.median(losses[30:40]))  # good steps 31..40
    assert monitor.bad_in_a_row == 1 and monitor.last_good_step == 40


def test_the_rule_is_armed_from_the_first_good_step_and_can_be_turned_off():
    assert spike_limit([], 1.5) == math.inf and spike_limit([4.0], 0) == math.inf
    assert spike_limit([6.0], 1.5) == 9.0 and spike_limit([1.0, 5.0, 3.0], 2) == 6.0
    assert replay([6.0, 12.4, 12.3], DivergenceConfig(spike_factor=1.5)) == ["", "spike", "spike"]
    assert replay([6.0, 12.4, 12.3], DivergenceConfig(spike_factor=0)) == ["", "", ""]


def test_nonfinite_losses_and_gradients_are_bad():
    cfg = DivergenceConfig()
    assert replay([5.0, math.nan, math.inf, 5.0, 4.9], cfg, nonfinite_gradients=[False, False, False, True]) == \
        ["", "loss", "loss", "gradients", ""]


def test_an_explosion_diverges_after_max_bad_steps_and_says_which_steps():
    cfg = DivergenceConfig(max_bad_steps=3, spike_factor=1.5, spike_window=5)
    monitor = DivergenceMonitor(cfg, start_step=100)
    for step, loss in enumerate([4.0, 4.1, 3.9, 9.0, math.nan, 8.5], start=101):
        limit = monitor.loss_limit()
        bad = "loss" if not math.isfinite(loss) else "spike" if loss > limit else ""
        monitor.record(step, loss, bad, limit)
    assert monitor.diverged and monitor.last_good_step == 103 and monitor.streak == [(104, "spike"), (105, "loss"),
                                                                                         (106, "spike")]
    summary = monitor.streak_summary()
    assert "steps 104-106 were bad (1 x non-finite loss, 2 x loss spike; the last: loss 8.5 > limit" in summary


def test_a_slow_climb_is_not_a_spike_but_the_run_ends_far_above_its_start():
    climb = [6.0 * 1.02 ** i for i in range(60)]  # 2% a step: never 1.5 x the median of the last 20
    cfg = DivergenceConfig(spike_factor=1.5, spike_window=20)
    assert set(replay(climb, cfg)) == {""}
    monitor = DivergenceMonitor(cfg)
    for step, loss in enumerate(climb, start=1):
        monitor.record(step, loss, "", monitor.loss_limit())
    assert monitor.first_loss == 6.0 and monitor.ended_far_above_start()
    fell = DivergenceMonitor(cfg)
    for step, loss in enumerate(healthy_curve(40), start=1):
        fell.record(step, loss, "", fell.loss_limit())
    assert not fell.ended_far_above_start()


def test_the_state_round_trip_gives_the_same_decisions_and_a_fresh_streak():
    cfg = DivergenceConfig(spike_window=8)
    monitor = DivergenceMonitor(cfg)
    for step, loss in enumerate(healthy_curve(30), start=1):
        monitor.record(step, loss, "", monitor.loss_limit())
    monitor.record(31, 50.0, "spike", monitor.loss_limit())
    state = json.loads(json.dumps(monitor.state_dict()))  # as stored in meta.json
    resumed = DivergenceMonitor(cfg, state, start_step=30)
    assert resumed.loss_limit() == monitor.loss_limit() and resumed.first_loss == monitor.first_loss
    assert resumed.bad_in_a_row == 0 and resumed.last_good_step == 30
    old = DivergenceMonitor(cfg, {"nonfinite_in_a_row": 2}, start_step=30, first_loss_guess=9.7)  # older checkpoint
    assert old.first_loss == 9.7 and old.loss_limit() == math.inf and old.bad_in_a_row == 0


# ------------------------------------------------------------------ steps.jsonl
def stats(loss, bad=""):
    return StepStats(loss, 0.5 if math.isfinite(loss) else math.nan, 1e-3, bool(bad), bad)


def test_step_log_records_every_step_in_strict_json(tmp_path):
    log = StepLog(tmp_path, start_step=0)
    log.write(1, stats(5.0), math.inf, 0)
    log.write(2, stats(math.nan, "loss"), 7.5, 1)
    log.write(3, stats(9.0, "spike"), 7.5, 2)
    log.close()
    text = (tmp_path / "steps.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = read_steps(tmp_path / "steps.jsonl")
    assert records[0] == {"step": 1, "loss": 5.0, "grad_norm": 0.5, "lr": 1e-3, "skipped": False, "bad": "",
                          "loss_limit": None, "bad_in_a_row": 0}
    assert records[1]["loss"] is None and records[1]["bad"] == "loss" and records[1]["skipped"]
    assert records[2]["bad"] == "spike" and records[2]["loss_limit"] == 7.5 and records[2]["bad_in_a_row"] == 2
    assert StepLog(tmp_path, 0, enabled=False).file is None


def test_a_resumed_run_cuts_the_log_back_to_its_checkpoint_and_a_torn_line_is_dropped(tmp_path):
    path = tmp_path / "steps.jsonl"
    log = StepLog(tmp_path, start_step=0)
    for step in range(1, 8):
        log.write(step, stats(5.0 - step / 10), math.inf, 0)
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"step": 8, "lo')  # killed mid-write
    assert [r["step"] for r in read_steps(path)] == list(range(1, 8))
    log = StepLog(tmp_path, start_step=5)  # resumed from the checkpoint of step 5: steps 6, 7 and the torn 8 go
    log.write(6, stats(1.0), math.inf, 0)
    log.close()
    records = read_steps(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[-1]["loss"] == 1.0
    truncate_after(path, 0)  # a new run in the same directory starts an empty log
    assert path.read_bytes() == b""


# ------------------------------------------------------------------ the engines skip a spike
def batch(step):
    return torch.randint(0, 50, (8, 13), generator=torch.Generator().manual_seed(100 + step))


def test_plain_engine_skips_a_spike_leaving_weights_and_moments_alone():
    cfg = tiny_train_config()
    engine = TorchEngine(cfg, tiny_model(config=cfg.model), cpu_info())
    b = batch(0)
    first = engine.train_step(list(b.split(2)), b[:, 1:].numel(), lr=1e-2)
    assert not first.skipped and first.bad == ""
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in engine.optimizer.state.items()}
    b = batch(1)
    spike = engine.train_step(list(b.split(2)), b[:, 1:].numel(), lr=1e-2, loss_limit=first.loss / 10)
    assert spike.skipped and spike.spike and spike.bad == "spike" and spike.nonfinite == ""
    assert math.isfinite(spike.loss) and math.isfinite(spike.grad_norm)
    assert all(torch.equal(v, weights[k]) for k, v in engine.module.state_dict().items())
    for p, s in engine.optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in s.items())
    after = engine.train_step(list(b.split(2)), b[:, 1:].numel(), lr=1e-2, loss_limit=spike.loss * 2)
    assert not after.skipped and after.bad == "" and after.loss == spike.loss
    assert any(not torch.equal(v, weights[k]) for k, v in engine.module.state_dict().items())


DEEPSPEED_SETUPS = [(0, "fp32"), (1, "fp32"), (2, "bf16"), (0, "bf16")]
"""(ZeRO stage, precision): GuardedAdamW; ZeRO's optimizer in fp32 and bf16; DeepSpeed's bf16 optimizer. fp16
needs a GPU (DeepSpeed refuses it on CPU)."""


def _deepspeed_spike_worker(rank, out_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    from lm.training.distributed import init_distributed
    from lm.training.engine import DeepSpeedEngine
    results = {}
    try:
        for zero_stage, precision in DEEPSPEED_SETUPS:
            cfg = tiny_train_config("engine=deepspeed", f"deepspeed.zero_stage={zero_stage}",
                                    f"compute.precision={precision}")
            engine = DeepSpeedEngine(cfg, tiny_model(config=cfg.model), init_distributed(cfg))
            step = [engine.train_step(list(batch(i).split(2)), 96, lr=1e-2, loss_limit=limit)
                    for i, limit in [(0, math.inf)]]
            before = engine.consolidated_state_dict()
            state = [v.clone() for s in engine.engine.basic_optimizer.state.values() for v in s.values()
                     if torch.is_tensor(v)]
            step.append(engine.train_step(list(batch(1).split(2)), 96, lr=1e-2, loss_limit=step[0].loss / 10))
            middle = engine.consolidated_state_dict()
            state_after = [v.clone() for s in engine.engine.basic_optimizer.state.values() for v in s.values()
                           if torch.is_tensor(v)]
            step.append(engine.train_step(list(batch(2).split(2)), 96, lr=1e-2, loss_limit=math.inf))
            after = engine.consolidated_state_dict()
            results[(zero_stage, precision)] = {
                "steps": step, "optimizer": type(engine.engine.optimizer).__name__,
                "weights_kept": all(torch.equal(before[k], middle[k]) for k in before),
                "state_kept": len(state) == len(state_after) > 0 and all(map(torch.equal, state, state_after)),
                "then_moved": any(not torch.equal(middle[k], after[k]) for k in middle)}
        torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_skips_a_spike_under_zero_and_bf16(tmp_path):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))
    out = tmp_path / "out.pt"
    mp.spawn(_deepspeed_spike_worker, args=(str(out), free_port()), nprocs=1, join=True)
    results = torch.load(out, weights_only=False)
    assert set(results) == set(DEEPSPEED_SETUPS)
    for setup, r in results.items():
        good, spike, after = r["steps"]
        assert not good.skipped and good.bad == "", setup
        assert spike.skipped and spike.bad == "spike" and math.isfinite(spike.loss), setup
        assert r["weights_kept"] and r["state_kept"], f"{setup} ({r['optimizer']}): a skipped spike changed the state"
        assert not after.skipped and after.bad == "" and r["then_moved"], setup
