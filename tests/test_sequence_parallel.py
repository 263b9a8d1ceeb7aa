"""Ulysses sequence parallelism (``deepspeed.sequence_parallel_size``): config errors, the model on 2 ranks against
the unsharded model in float64, and real 2-rank DeepSpeed runs through ``launch.sh`` against one-process runs.

The multi-rank tests are slow (each start of DeepSpeed costs 10-20 s here); they share processes where they can:
one launch per attention kind; for the FFT path, its step-15 checkpoint is then resumed at SP=1 on one rank."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import REPO, launch_env, scalars, smoke_argv, tiny_model, tiny_train_config
from lm import checkpoint
from lm.cli.train import main
from lm.config import ConfigError, load_config
from lm.training.distributed import DistInfo, SequenceShard, free_port
from lm.training.engine import TorchEngine, deepspeed_config, token_nll_sum

LAUNCH = str(REPO / "launch.sh")
SP2 = "deepspeed.sequence_parallel_size=2"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("overrides, needle", [
    (["model.n_heads=4", "deepspeed.sequence_parallel_size=3"], "must divide model.n_heads=4"),
    (["data.seq_len=12", "deepspeed.sequence_parallel_size=8", "model.n_heads=8", "model.d_model=32"],
     "data.seq_len=12 must be divisible by deepspeed.sequence_parallel_size=8"),
    (["deepspeed.sequence_parallel_size=0"], "deepspeed.sequence_parallel_size=0 must be > 0"),
])
def test_config_errors_that_need_no_world_size(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        tiny_train_config(*overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("world, needle", [
    (1, "deepspeed.sequence_parallel_size=2 is larger than the 1 rank"),
    (3, "deepspeed.sequence_parallel_size=2 must divide the number of ranks \\(3\\)"),
    (6, "batch_size=8 must be a multiple of micro_batch_size x data-parallel ranks = 4 x 3"),
])
def test_config_errors_that_need_the_world_size(world, needle):
    cfg = tiny_train_config(SP2, "micro_batch_size=4")
    with pytest.raises(ConfigError, match=needle) as e:
        cfg.gradient_accumulation_steps(world)
    assert "\n" not in str(e.value)


def test_data_parallel_size_and_batch_split():
    cfg = tiny_train_config(SP2, "micro_batch_size=2")  # batch 8
    assert [cfg.data_parallel_size(w) for w in (2, 4, 8)] == [1, 2, 4]
    assert [cfg.gradient_accumulation_steps(w) for w in (2, 4, 8)] == [4, 2, 1]
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["sequence_parallel_size"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert "sequence_parallel_size" not in deepspeed_config(tiny_train_config(), world_size=4)
    info = DistInfo("deepspeed", 5, 8, 1, torch.device("cpu"), SequenceShard(1, 2))
    assert (info.sp_size, info.dp_size, info.dp_rank) == (2, 4, 2)


def test_plain_torch_refuses_sequence_parallelism_before_any_work(tmp_path, capsys):
    """``python tools/train.py`` with SP > 1: a one-line error naming launch.sh, before the corpus or the run
    directory is touched."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(smoke_argv(run, cache, SP2)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "launch.sh" in err and "sequence_parallel_size=2" in err
    assert not run.exists() and not cache.exists()
    cfg = tiny_train_config(SP2)
    with pytest.raises(ConfigError, match="needs the DeepSpeed engine: start through launch.sh"):
        TorchEngine(cfg, tiny_model(config=cfg.model), DistInfo("torch", 0, 2, 0, torch.device("cpu")))


def test_the_32k_config_runs_sequence_parallel_on_the_fft_path():
    from lm.ops.kernelized import choose_method
    cfg = load_config([REPO / "configs" / "wikitext103_32k.yaml"])
    a = cfg.model.attention
    assert cfg.data.seq_len == 32768 and cfg.deepspeed.sequence_parallel_size == 8 and a.rpe == "per_offset"
    assert a.rpe_max_distance >= cfg.data.seq_len and cfg.compute.activation_checkpointing
    assert choose_method(cfg.data.seq_len, cfg.data.seq_len, "cuda") == "fft"
    assert cfg.gradient_accumulation_steps(8) == 1 and cfg.data_parallel_size(16) == 2
    with pytest.raises(ConfigError, match="larger than the 4 rank"):
        cfg.gradient_accumulation_steps(4)


def test_launch_passes_the_override_through_unchanged():
    env = launch_env(DRY_RUN="1", NGPU="8")
    r = subprocess.run(["bash", LAUNCH, "configs/wikitext103_32k.yaml", "deepspeed.sequence_parallel_size=4"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[-3:] == ["tools/train.py", "configs/wikitext103_32k.yaml", "deepspeed.sequence_parallel_size=4"]


def test_shard_takes_contiguous_token_blocks():
    x = torch.arange(2 * 12).view(2, 12)
    blocks = [SequenceShard(r, 3).tokens(x) for r in range(3)]
    assert torch.equal(torch.cat(blocks, dim=1), x) and blocks[1].shape == (2, 4)
    with pytest.raises(ValueError):
        SequenceShard(2, 2)


def test_adam_moments_by_name_carry_a_client_optimizer_over():
    """The consolidated moments of a (stage 0) client AdamW, put into a fresh optimizer on a fresh copy of the
    model, give the very next update of the original; without them the update differs."""
    from lm.training.engine import GuardedAdamW
    from lm.training.optimizer_state import gather_moments, scatter_moments

    def step(model, opt, seed):
        ids = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(seed))
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    model = tiny_model(0).train()
    opt = GuardedAdamW(model.parameters(), lr=1e-2)
    for s in range(3):
        step(model, opt, s)
    saved = gather_moments(model, opt)
    assert saved["step"] == 3.0 and set(saved["exp_avg"]) == {n for n, _ in model.named_parameters()}
    copies = []
    for restore in (True, False):
        twin = tiny_model(1).train()
        twin.load_state_dict(model.state_dict())
        twin_opt = GuardedAdamW(twin.parameters(), lr=1e-2)
        if restore:
            scatter_moments(twin, twin_opt, saved)
        step(twin, twin_opt, 3)
        copies.append(twin)
    step(model, opt, 3)
    for name, p in model.named_parameters():
        assert torch.equal(dict(copies[0].named_parameters())[name], p), name
    assert any(not torch.equal(dict(copies[1].named_parameters())[n], p) for n, p in model.named_parameters())


def test_bench_sp_memory_counts_shrink_with_the_sequence_parallel_size():
    """tools/bench_sp_memory.py on the smoke config: kept activations shrink with P, the all-to-all volume is the
    formula's (8 exchanges without checkpointing, (P-1)/P of a (B, N/P, d_model) fp32 tensor each)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_sp_memory", REPO / "tools" / "bench_sp_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = tiny_train_config("model.n_heads=4", "data.seq_len=32", "micro_batch_size=2")
    one, two = bench.measure(cfg, 1), bench.measure(cfg, 2)
    assert one["a2a"] == 0 and two["a2a"] == 8 * 2 * 16 * 32 * 4 / 2
    assert 0 < two["kept"] < one["kept"] and 0 < two["block"] < one["block"] and one["param_count"] > 0
    x = torch.arange(12).view(1, 12)
    assert torch.equal(bench.ShapeShard(1, 3).tokens(x), SequenceShard(1, 3).tokens(x))


# ------------------------------------------------------------------------- the model on 2 ranks, float64
MODEL_CASES = {
    "per_offset_fft": dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=40, method="fft"),
    "per_offset_clipped_band": dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=5, method="band"),
    "bucketed_shared": dict(kind="kernelized_rpe", rpe="bucketed", rpe_num_buckets=8, rpe_max_distance=20,
                            rpe_shared=True),
    "absolute_prf": dict(kind="kernelized", rpe="none", feature_map="prf"),
    "softmax_rpe": dict(kind="softmax", rpe="per_offset", rpe_max_distance=40),
}
"""Attention kinds and RPE forms checked at the model level (per-head tables sliced, shared ones whole)."""
DOCUMENT_CASES = ["per_offset_clipped_band", "absolute_prf", "softmax_rpe"]
"""Checked again with documents in the batch (data.document_mask), through the engines' token_nll_sum."""


def _model_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from lm.training.distributed import all_reduce
    deepspeed.init_distributed(dist_backend="gloo")
    shard = SequenceShard(rank, world, dist.new_group(list(range(world))))
    results = {}
    try:
        for name, attention in MODEL_CASES.items():
            for checkpointing in (False, True):
                model = tiny_model(3, looks_trained=True, n_heads=4, d_model=32, **attention).double().train()
                model.activation_checkpointing = checkpointing
                batch = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(7))
                params = [p for p in model.parameters()]
                logits = model(batch[:, :-1])  # the reference: the whole sequence on this rank
                want = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                           reduction="sum"), params)
                mine = model(shard.tokens(batch[:, :-1]), shard=shard)
                loss = F.cross_entropy(mine.flatten(0, 1), shard.tokens(batch[:, 1:]).flatten(), reduction="sum")
                got = [all_reduce(g.clone()) for g in torch.autograd.grad(loss, params)]
                logit_err = ((mine - shard.tokens(logits)).abs().max() / logits.abs().max()).item()
                grad_err = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item()
                               for g, w in zip(got, want))
                results[(name, checkpointing)] = (logit_err, grad_err)
        for name in DOCUMENT_CASES:  # data.document_mask: the starts of the whole sequence reach every rank's heads
            model = tiny_model(3, looks_trained=True, n_heads=4, d_model=32, **MODEL_CASES[name]).double().train()
            batch = torch.randint(3, 50, (2, 33), generator=torch.Generator().manual_seed(7))
            batch[0, [5, 6, 20]] = batch[1, [0, 16, 17, 31]] = 2  # documents across the ranks' blocks
            params = list(model.parameters())
            want = torch.autograd.grad(token_nll_sum(model, batch, document_eos=2), params)
            whole = token_nll_sum(model, batch, document_eos=2).detach()
            loss = token_nll_sum(model, batch, shard, document_eos=2)
            got = [all_reduce(g.clone()) for g in torch.autograd.grad(loss, params)]
            loss_err = ((all_reduce(loss.detach().clone()) - whole).abs() / whole).item()
            grad_err = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-300)).item() for g, w in zip(got, want))
            results[(name, "documents")] = (loss_err, grad_err)
    finally:
        torch.save(results, f"{out}.{rank}")
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_model_equals_the_whole_model_in_float64(tmp_path):
    """On 2 ranks (gloo, DeepSpeed's all-to-all), each rank's logits equal the unsharded model's on its tokens and
    the gradients summed over ranks equal the unsharded gradients, to float64 round-off: for every attention kind
    and RPE form, with and without activation checkpointing; and with documents kept apart (data.document_mask)."""
    mp.spawn(_model_worker, args=(2, free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"out.{rank}")
        assert set(results) == {(n, c) for n in MODEL_CASES for c in (False, True)} | {
            (n, "documents") for n in DOCUMENT_CASES}
        for case, (logit_err, grad_err) in results.items():
            print(f"rank {rank} {case}: logits {logit_err:.1e}, gradients {grad_err:.1e}")
            # documents: the first number is the loss's error (token_nll_sum sums in float32)
            assert logit_err < (1e-6 if case[1] == "documents" else 1e-12) and grad_err < 1e-12, (case, logit_err,
                                                                                                grad_err)


# ----------------------------------------------------------------------- real runs: launch.sh vs one process
STEPS = 30
LAUNCH_CASES = {
    # the paper's method on the FFT path (forced: at 128 tokens auto takes the dense form), per-head RPE,
    # activation checkpointing, ZeRO-1: the pieces of configs/wikitext103_32k.yaml
    "per_offset_fft": ["model.attention.method=fft", "compute.activation_checkpointing=true",
                       "deepspeed.zero_stage=1"],
    "bucketed": ["model.attention.rpe=bucketed", "model.attention.rpe_num_buckets=16",
                 "model.attention.rpe_max_distance=64"],
    "absolute": ["model.attention.kind=kernelized", "model.attention.rpe=none", "model.attention.redraw_every=10",
                 "eval_every=15", "eval_batches=1"],
    "softmax_rpe": ["model.attention.kind=softmax"],
}
"""One 2-rank launch each (``per_offset_fft`` then resumes on one rank); the random features of ``absolute`` are redrawn
every 10 steps (same draw on every rank) and it validates on rank 0 at steps 15 and 30."""


def _launch(args, ngpu, tmp_path):
    env = launch_env(NGPU=str(ngpu), OMP_NUM_THREADS="1",
                     TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    r = subprocess.run(["bash", LAUNCH, *args], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _common(cache, run, case):
    """Smoke config, 30 steps of 8 sequences in 2 micro-batches of 4 (so accumulation runs under SP too)."""
    return smoke_argv(run, cache, f"max_steps={STEPS}", "batch_size=8", "micro_batch_size=4", *LAUNCH_CASES[case])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _plain(cache, tmp_path, case, *extra):
    run = tmp_path / f"plain_{case}"
    argv = [a for a in _common(cache, run, case) if not a.startswith("deepspeed.zero_stage")]
    assert main([*argv, *extra]) == 0
    return run


def _relative(a: dict, b: dict) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


def _weights_relative(a_dir, b_dir) -> float:
    a, b = (torch.load(Path(d) / "model.pt", weights_only=True) for d in (a_dir, b_dir))
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def _compare_runs(ds_run, plain, steps=range(1, STEPS + 1)) -> dict[str, float]:
    """Max relative differences of two runs over ``steps``: ``loss``, ``norm`` (the gradient norm before clipping:
    the norm of the whole reduced gradient, so a gradient scaled wrongly (the loss multiplier, a reduction over the
    wrong group) shows there even where Adam's scale invariance would hide it in the losses), ``norm_first`` (that
    of the first step: one step's gradient from the same weights) and ``weights`` (the final ones)."""
    out = {}
    for key, tag in (("loss", "train/loss"), ("norm", "train/grad_norm")):
        got, want = scalars(ds_run, tag), scalars(plain, tag)
        assert sorted(got) == list(steps) and set(steps) <= set(want), tag
        out[key] = _relative({s: got[s] for s in steps}, {s: want[s] for s in steps})
        out[f"{key}_first"] = _relative({s: got[s] for s in steps[:1]}, {s: want[s] for s in steps[:1]})
    out["weights"] = _weights_relative(checkpoint.find_checkpoint(ds_run), checkpoint.find_checkpoint(plain))
    return out


def _check(d: dict[str, float]) -> None:
    assert d["loss"] <= 1e-5 and d["norm_first"] <= 1e-5, d
    assert d["norm"] <= LATER_NORMS and d["weights"] <= WEIGHTS_AFTER_30_STEPS, d


def _report(d: dict[str, float]) -> str:
    return (f"losses {d['loss']:.2e}, grad norms {d['norm']:.2e} (first step {d['norm_first']:.2e}), final weights "
            f"{d['weights']:.2e}")


WEIGHTS_AFTER_30_STEPS = 1e-3
"""Final weights after 30 AdamW steps: Adam divides each update by the gradient's own magnitude, so an entry
whose gradient is mostly round-off moves by up to the learning rate in a direction round-off decides; such
entries reach ~2e-4 relative here (measured, softmax) while the losses agree to ~3e-7."""
LATER_NORMS = 1e-4
"""Gradient norms after the first step: the weights have drifted apart by the round-off above, and the norm is
more sensitive to it than the loss (measured up to 1.7e-5 with softmax at steps 20-27; 1e-7 before step 15).
A wrongly scaled gradient is off by tens of percent."""


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("case", ["bucketed", "absolute", "softmax_rpe"])
def test_two_sequence_parallel_ranks_train_like_one_process(case, cache, tmp_path):
    """``NGPU=2 ./launch.sh configs/smoke.yaml deepspeed.sequence_parallel_size=2``: every step's loss and gradient
    norm over 30 steps equal a one-process ``tools/train.py`` run's to 1e-5 relative."""
    ds_run = tmp_path / "sp2"
    out = _launch([*_common(cache, ds_run, case), SP2], 2, tmp_path)
    assert "sequence parallel: 2 ranks per sequence (64 tokens each) x 1 data-parallel replica(s)" in out
    plain = _plain(cache, tmp_path, case)
    d = _compare_runs(ds_run, plain)
    print(f"{case}: 30 steps at SP=2 vs one process, max relative differences: {_report(d)}")
    _check(d)
    if case == "absolute":  # validation on rank 0 over the full sequence, as the one-process run
        assert _relative(scalars(ds_run, "valid/loss"), scalars(plain, "valid/loss")) <= 1e-5


@pytest.mark.slow
@pytest.mark.long
def test_sequence_parallel_run_on_the_fft_path_then_resumed_at_sp1_on_one_rank(cache, tmp_path):
    """Per-offset RPE on the FFT path, ZeRO-1, activation checkpointing.

    SP=2 on 2 ranks for 30 steps: losses (and the first step's gradient norm) equal the one-process run's to 1e-5.
    Its step-15 checkpoint then resumes at SP=1 on one rank (another layout: fp32 weights from model.pt, Adam
    moments from adam_moments.pt): steps 16-30 equal the one-process run's too, the first one (same weights) and
    the later ones (same updates: moments lost or wrong change the next update far beyond 1e-5)."""
    case = "per_offset_fft"
    ds_run, sp1_run = tmp_path / "sp2", tmp_path / "sp1"
    _launch([*_common(cache, ds_run, case), SP2, "save_every=15"], 2, tmp_path)
    plain = _plain(cache, tmp_path, case)
    sp2 = _compare_runs(ds_run, plain)

    step15 = ds_run / "checkpoints" / checkpoint.checkpoint_name(15)
    assert (step15 / "adam_moments.pt").is_file() and checkpoint.read_meta(step15)["world_size"] == 2
    (sp1_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(step15, sp1_run / "checkpoints" / step15.name)
    out = _launch([*_common(cache, sp1_run, case)], 1, tmp_path)  # SP=1 (the default), one rank
    assert "written on another layout" in out and f"resumed from {sp1_run / 'checkpoints' / step15.name}" in out
    # steps 16-30 (a run that starts from the step-15 checkpoint logs only those); the first is the next step
    sp1 = _compare_runs(sp1_run, plain, steps=range(16, STEPS + 1))
    print(f"{case}: 30 steps at SP=2 vs one process: {_report(sp2)}; resumed at SP=1 on one rank, steps 16-30: "
          f"{_report(sp1)}, step 16 loss {sp1['loss_first']:.2e}")
    _check(sp2)
    _check(sp1)
    meta = checkpoint.read_meta(checkpoint.find_checkpoint(sp1_run))
    assert meta["world_size"] == 1 and meta["config"]["deepspeed"]["sequence_parallel_size"] == 1


def test_a_launch_with_more_sequence_parallel_ranks_than_ranks_fails_before_work(tmp_path, capsys, monkeypatch):
    """What a rank started by ``NGPU=1 ./launch.sh ... deepspeed.sequence_parallel_size=2`` does (the launcher's
    environment, the DeepSpeed engine): a one-line error before the process group, the corpus or the run directory."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(smoke_argv(run, cache, SP2, "engine=deepspeed")) == 1
    want = ("error: deepspeed.sequence_parallel_size=2 is larger than the 1 rank(s) of this run; start at least 2 "
            "ranks (NGPU=2 ./launch.sh ...) or lower it")
    assert capsys.readouterr().err.strip() == want
    assert not run.exists() and not cache.exists()
