"""The stability study (tools/stability_study.py, lm.stability): the divergence verdict on synthetic step logs,
the grid and its settings, the reports' schema, resuming a study, the probe's mechanism measurements, and the
--quick study end to end (slow)."""
import json
import math
import struct

import pytest
import torch

from conftest import tiny_model
from lm.cli.stability_study import main as study_main
from lm.config import ConfigError, DivergenceConfig, load_config
from lm.training.divergence import DivergenceMonitor, bad_step
from lm.stability.grid import (GRIDS, KERNELIZED_PRF, KERNELIZED_RPE_NPRF, QUICK_STEPS, STABILITY, Grid,
                               build_specs, format_lr, quick, with_choices)
from lm.stability.probe import measure
from lm.stability.report import (VARIANT_FIELDS, Study, format_mean_std, mean_std, plot_curves, quality_tables,
                                 stability_tables)
from lm.stability.runner import RESULT, SPEC, _claim, run_all
from lm.stability.verdict import (RUN_FIELDS, Outcome, divergence_reasons, stop_cause, streak_reasons,
                                  summarize_run)
from lm.training.steplog import read_steps


# ------------------------------------------------------------------ step logs as the trainer writes them
def simulate(losses, cfg=DivergenceConfig(), grad_norms=None, nonfinite_gradients=()):
    """(records, outcome) of a run whose steps have ``losses``, through the training loop's bookkeeping
    (lm.training.loop: the monitor's verdict per step, a record per step, the stop after max_bad_steps in a row, the
    end-of-run checks)."""
    monitor, records = DivergenceMonitor(cfg), []
    for i, loss in enumerate(losses):
        step, limit = i + 1, monitor.loss_limit()
        grads_bad = i < len(nonfinite_gradients) and nonfinite_gradients[i]
        bad = bad_step(loss, limit, gradients_finite=not grads_bad)
        monitor.record(step, loss, bad, limit)
        grad = None if bad in ("loss", "gradients") else (grad_norms[i] if grad_norms else 1.0)
        records.append({"step": step, "loss": loss if math.isfinite(loss) else None, "grad_norm": grad, "lr": 1e-3,
                        "skipped": bool(bad), "bad": bad, "loss_limit": None if math.isinf(limit) else limit,
                        "bad_in_a_row": monitor.bad_in_a_row})
        if monitor.diverged:
            return records, Outcome("stopped", "diverged", step, "training diverged")
    if monitor.bad_in_a_row:
        return records, Outcome("stopped", "bad_streak_at_end", len(losses))
    if monitor.ended_far_above_start():
        return records, Outcome("stopped", "ended_far_above_start", len(losses))
    return records, Outcome("completed", step=len(losses))


def healthy(n=120):
    return [3 + 5 * math.exp(-i / 25) + 0.05 * math.sin(i) for i in range(n)]


def test_a_healthy_run_did_not_diverge_and_keeps_its_perplexity():
    grads = [0.5 + 0.01 * i for i in range(120)]
    records, outcome = simulate(healthy(), grad_norms=grads)
    run = summarize_run(7, records, outcome, 5, 123.4)
    assert list(run) == list(RUN_FIELDS)
    assert run == {"seed": 7, "diverged": False, "first_bad_step": None, "steps_completed": 120,
                   "final_valid_ppl": 123.4, "max_grad_norm": max(grads), "loss_spikes": 0}


def test_a_skipped_spike_with_recovery_is_counted_but_is_not_a_divergence():
    losses = healthy()
    losses[60] *= 2.5
    losses[61] *= 2.5
    records, outcome = simulate(losses)
    run = summarize_run(1, records, outcome, 5, 50.0)
    assert outcome.status == "completed"
    assert run["diverged"] is False and run["loss_spikes"] == 2 and run["first_bad_step"] == 61
    assert run["final_valid_ppl"] == 50.0


def test_an_explosion_is_stopped_and_diverged_with_no_perplexity():
    losses = healthy(50) + [20.0 + i for i in range(30)]
    records, outcome = simulate(losses)
    run = summarize_run(1, records, outcome, 5, 99.0)
    assert outcome.kind == "diverged"
    assert run["diverged"] is True and run["first_bad_step"] == 51 and run["steps_completed"] == 55
    assert run["loss_spikes"] == 5 and run["final_valid_ppl"] is None


def test_one_skipped_nonfinite_step_makes_a_surviving_run_diverged():
    """Divergence handling must not hide instability: the skip saved the run, the run was not stable."""
    nonfinite = [False] * 120
    nonfinite[40] = True
    records, outcome = simulate(healthy(), nonfinite_gradients=nonfinite)
    run = summarize_run(1, records, outcome, 5, 60.0)
    assert outcome.status == "completed" and records[40]["bad"] == "gradients"
    assert run["diverged"] is True and run["first_bad_step"] == 41 and run["final_valid_ppl"] is None
    assert run["steps_completed"] == 120 and run["loss_spikes"] == 0
    assert divergence_reasons(records, outcome, 5) == ["1 non-finite step(s), the first at step 41"]
    losses = healthy()
    losses[30] = math.nan
    records, outcome = simulate(losses)
    assert summarize_run(1, records, outcome, 5, 60.0)["diverged"] is True and records[30]["loss"] is None


def test_nonfinite_steps_until_the_stop_and_the_largest_finite_gradient():
    nonfinite = [False] * 30 + [True] * 10
    grads = [float(i) for i in range(40)]
    records, outcome = simulate(healthy(40), grad_norms=grads, nonfinite_gradients=nonfinite)
    run = summarize_run(3, records, outcome, 5, None)
    assert outcome.kind == "diverged" and run["steps_completed"] == 35 and run["first_bad_step"] == 31
    assert run["max_grad_norm"] == 29.0 and run["diverged"] is True


def test_a_slow_climb_ends_far_above_its_start_and_diverged():
    losses = [5.0 + 0.05 * i for i in range(120)]  # never 1.5 x the recent median, ends > 1.5 x the first loss
    records, outcome = simulate(losses)
    assert outcome.kind == "ended_far_above_start"
    assert not any(r["bad"] for r in records)
    run = summarize_run(1, records, outcome, 5, 400.0)
    assert run["diverged"] is True and run["first_bad_step"] is None and run["final_valid_ppl"] is None


def test_a_streak_reaching_max_bad_steps_is_a_divergence_even_if_the_outcome_says_completed():
    losses = healthy(50) + [20.0] * 5
    records, _ = simulate(losses)
    assert records[-1]["bad_in_a_row"] == 5
    assert summarize_run(1, records, Outcome("completed", step=55), 5, 10.0)["diverged"] is True
    assert summarize_run(1, records, Outcome("completed", step=55), 6, 10.0)["diverged"] is False


def test_the_verdict_matches_the_step_log_a_real_trainer_wrote(tmp_path):
    """Records read back from a steps.jsonl the trainer's StepLog wrote (null for non-finite numbers)."""
    from lm.training.engine import StepStats
    from lm.training.steplog import StepLog
    log = StepLog(tmp_path, 0)
    log.write(1, StepStats(loss=5.0, grad_norm=1.0, lr=1e-3, skipped=False), math.inf, 0)
    log.write(2, StepStats(loss=5.1, grad_norm=math.nan, lr=1e-3, skipped=True, bad="gradients"), 7.5, 1)
    log.write(3, StepStats(loss=4.9, grad_norm=2.0, lr=1e-3, skipped=False), 7.5, 0)
    log.close()
    records = read_steps(tmp_path / "steps.jsonl")
    assert records[1]["grad_norm"] is None and records[1]["bad"] == "gradients"
    run = summarize_run(1, records, Outcome("completed", step=3), 5, 10.0)
    assert run["diverged"] is True and run["first_bad_step"] == 2 and run["max_grad_norm"] == 2.0


def test_the_stop_cause_names_the_final_streak():
    spikes, stop = simulate(healthy(50) + [20.0] * 5)
    assert stop_cause(spikes, stop) == "spikes"
    nonfinite, stop2 = simulate(healthy(40), nonfinite_gradients=[False] * 30 + [True] * 10)
    assert stop_cause(nonfinite, stop2) == "non-finite"
    assert "the last 5 steps were bad (5 non-finite)" in divergence_reasons(nonfinite, stop2, 5)[0]
    mixed, stop3 = simulate(healthy(50) + [20.0, 20.0, 5.0, 20.0, 20.0], nonfinite_gradients=[False] * 52 + [True])
    assert stop_cause(mixed, stop3) == "mixed" and streak_reasons(mixed[-5:]) == "4 loss spikes, 1 non-finite"
    climb, stop4 = simulate([5.0 + 0.05 * i for i in range(120)])
    assert stop_cause(climb, stop4) == "final loss"
    assert stop_cause(*simulate(healthy())) == ""


def test_outcome_status_is_checked():
    with pytest.raises(ValueError, match="status"):
        Outcome("exploded")


# ------------------------------------------------------------------ the grid
def test_the_stability_grid_is_five_variants_at_three_lrs_and_three_seeds():
    assert {(v.kind, v.feature_map, v.rpe) for v in STABILITY.variants} == {
        ("kernelized", "prf", "none"), ("kernelized", "nprf", "none"), ("kernelized_rpe", "prf", "per_offset"),
        ("kernelized_rpe", "nprf", "per_offset"), ("softmax", None, "per_offset")}
    assert len(STABILITY.lrs) == 3 and len(STABILITY.seeds) >= 3
    specs = build_specs(STABILITY, "/tmp/x/runs")
    assert len(specs) == 45 and len({s.name for s in specs}) == 45
    for s in specs:
        cfg = load_config([], s.overrides)
        assert cfg.optim.lr == s.lr and cfg.seed == s.seed and cfg.run_dir == f"/tmp/x/runs/{s.name}"
        assert cfg.model.attention.kind == s.variant.kind and cfg.model.attention.rpe == s.variant.rpe
        if s.variant.feature_map:
            assert cfg.model.attention.feature_map == s.variant.feature_map
        assert cfg.engine == "torch" and cfg.max_steps == 300


def test_quick_is_two_variants_at_the_top_lr_two_seeds_fewer_steps():
    g = quick(STABILITY)
    assert g.variants == (KERNELIZED_PRF, KERNELIZED_RPE_NPRF) and g.lrs == (max(STABILITY.lrs),)
    assert len(g.seeds) == 2
    specs = build_specs(g, "r")
    assert len(specs) == 4 and all(load_config([], s.overrides).max_steps == QUICK_STEPS for s in specs)
    assert all(load_config([], s.overrides + ("max_steps=7",)).max_steps == 7 for s in specs)  # user's win


def test_overrides_apply_to_every_run_but_not_to_what_the_grid_sets():
    specs = build_specs(STABILITY, "r", ["max_steps=11", "data.seq_len=64"])
    assert {load_config([], s.overrides).max_steps for s in specs} == {11}
    for bad in ("optim.lr=0.1", "seed=3", "run_dir=x", "model.attention.kind=softmax"):
        with pytest.raises(ConfigError, match="set by the study"):
            build_specs(STABILITY, "r", [bad])
    with pytest.raises(ConfigError, match="nlayers"):
        build_specs(STABILITY, "r", ["model.nlayers=2"])
    with pytest.raises(ConfigError, match="variant"):
        with_choices(STABILITY, variants=["performer"])
    with pytest.raises(ConfigError, match="learning rate"):
        build_specs(with_choices(STABILITY, lrs=[math.nan]), "r")


def test_quality_grid_scores_test_at_contexts_64_to_2048():
    g = GRIDS["quality"]
    assert [v.name for v in g.variants] == ["kernelized_rpe_nprf", "kernelized_nprf", "softmax_rpe"]
    assert ("test", (64, 128, 256, 512, 1024, 2048)) in g.evaluate and len(g.seeds) == 3
    cfg = load_config([], build_specs(g, "r")[0].overrides)
    assert (cfg.data.seq_len, cfg.max_steps, cfg.batch_size, cfg.optim.lr) == (256, 400, 16, 2e-3)


def test_format_lr():
    assert [format_lr(x) for x in (0.015, 0.05, 3e-3, 0.15)] == ["1.5e-2", "5e-2", "3e-3", "1.5e-1"]


# ------------------------------------------------------------------ reports
def _fake_study(tmp_path, outcomes):
    """A Study over a 2-variant x 1-lr grid whose runs have the given (losses, nonfinite) logs and no training."""
    grid = Grid("t", (KERNELIZED_PRF, KERNELIZED_RPE_NPRF), (0.05,), (1, 2), ("max_steps=300", "data.seq_len=128"),
                evaluate=(("valid", None), ("test", (64, 128, 256))))
    specs = build_specs(grid, str(tmp_path / "runs"))
    results = {}
    for spec, (losses, nonfinite, ppl) in zip(specs, outcomes):
        run_dir = tmp_path / "runs" / spec.name
        run_dir.mkdir(parents=True)
        records, outcome = simulate(losses, nonfinite_gradients=nonfinite)
        (run_dir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        evals = [] if ppl is None else [{"split": "valid", "context": 128, "token_perplexity": ppl,
                                          "word_perplexity": 2 * ppl, "bits_per_byte": 2.0}] + [
            {"split": "test", "context": c, "token_perplexity": ppl + c / 64, "word_perplexity": 2 * ppl + c / 64,
             "bits_per_byte": 2.0 + spec.seed / 100} for c in (64, 128, 256)]
        results[spec.name] = {"spec": spec.as_dict(), "outcome": outcome.as_dict(), "evaluations": evals}
    return Study(grid, specs, results, tmp_path / "runs")


def test_summary_json_schema_tables_and_plot(tmp_path):
    explode = healthy(40) + [30.0] * 10
    study = _fake_study(tmp_path, [(explode, (), None), (healthy(), [False] * 20 + [True], 80.0),
                                   (healthy(), (), 70.0), (healthy(), (), 74.0)])
    summary = json.loads(json.dumps(study.summary()))  # what summary.json holds
    assert list(summary) == ["variants"]
    assert [v["name"] for v in summary["variants"]] == ["kernelized_prf", "kernelized_rpe_nprf"]
    for v in summary["variants"]:
        assert list(v) == list(VARIANT_FIELDS) and v["lr"] == 0.05 and len(v["runs"]) == 2
        for r in v["runs"]:
            assert list(r) == list(RUN_FIELDS)
            assert isinstance(r["diverged"], bool) and isinstance(r["steps_completed"], int)
            assert (r["final_valid_ppl"] is None) == r["diverged"]
    prf, nprf = summary["variants"]
    assert prf["kind"] == "kernelized" and prf["feature_map"] == "prf" and prf["rpe"] == "none"
    assert [r["diverged"] for r in prf["runs"]] == [True, True] and prf["runs"][0]["steps_completed"] == 45
    assert nprf["feature_map"] == "nprf" and nprf["rpe"] == "per_offset"
    assert [r["final_valid_ppl"] for r in nprf["runs"]] == [70.0, 74.0]
    md = stability_tables(study)
    assert "| kernelized_prf | 2 / 2 diverged |" in md and "| kernelized_rpe_nprf | 0 / 2 diverged |" in md
    assert "72.00 ± 2.83 (2)" in md and "### lr 5e-2" in md
    plot_curves(study, tmp_path / "curves.png")
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 400 and height >= 500  # one column (one lr), two rows (variants)


def test_quality_tables_are_means_over_the_seeds_that_did_not_diverge(tmp_path):
    study = _fake_study(tmp_path, [(healthy(), (), 10.0), (healthy(), [False] * 20 + [True], 30.0),
                                   (healthy(), (), 70.0), (healthy(), (), 74.0)])
    md = quality_tables(study)
    # kernelized_prf: seed 2 diverged (a non-finite step), so only seed 1 counts; the test row is the training
    # context (128): token ppl = ppl + 2, word ppl = 2 ppl + 2
    assert "| kernelized_prf | 10.00 (1) | 20.0 (1) | 12.00 (1) | 22.0 (1) | 2.0100 (1) |" in md
    assert "| kernelized_rpe_nprf | 72.00 ± 2.83 (2) | 144.0 ± 5.7 (2) | 74.00 ± 2.83 (2) | 146.0 ± 5.7 (2) | " \
           "2.0150 ± 0.0071 (2) |" in md
    assert "| attention | 64 | 128 | 256 |" in md
    assert "| kernelized_rpe_nprf | 145.0 ± 5.7 (2) | 146.0 ± 5.7 (2) | 148.0 ± 5.7 (2) |" in md


def test_a_run_without_a_result_is_listed_as_failed(tmp_path):
    study = _fake_study(tmp_path, [(healthy(), (), 70.0)] * 4)
    name = study.specs[1].name
    del study.results[name]
    summary = study.summary()
    assert summary["failed"] == [{"name": name, "seed": 2, "lr": 0.05, "why": summary["failed"][0]["why"]}]
    assert "log.txt" in summary["failed"][0]["why"]
    assert len(summary["variants"][0]["runs"]) == 1


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, None) and mean_std([None]) == (None, None)
    assert format_mean_std([1.0, 3.0]) == "2.00 ± 1.41 (2)" and format_mean_std([]) == "—"


def test_a_run_folder_of_other_settings_is_refused_never_overwritten(tmp_path):
    specs = build_specs(quick(STABILITY), str(tmp_path))
    _claim(specs[0], tmp_path / specs[0].name, 1)
    _claim(specs[0], tmp_path / specs[0].name, 2)  # the same run (thread count aside): fine
    other = build_specs(quick(STABILITY), str(tmp_path), ["max_steps=5"])[0]
    before = (tmp_path / specs[0].name / SPEC).read_text()
    with pytest.raises(ConfigError, match="other settings"):
        _claim(other, tmp_path / specs[0].name, 1)
    assert (tmp_path / specs[0].name / SPEC).read_text() == before


def test_runs_with_a_result_are_not_run_again(tmp_path):
    specs = build_specs(quick(STABILITY), str(tmp_path))
    for s in specs:
        (tmp_path / s.name).mkdir()
        (tmp_path / s.name / RESULT).write_text(json.dumps({"outcome": {"status": "completed"}, "marker": s.name}))
    lines = []
    results = run_all(specs, tmp_path, jobs=2, threads=1, report=lines.append)
    assert lines == ["4 of 4 runs already have a result (kept)"]
    assert [r["marker"] for r in results.values()] == [s.name for s in specs]


def test_command_line_errors_are_one_line(capsys, tmp_path):
    assert study_main(["--out", str(tmp_path), "optim.lr=0.1"]) == 2
    assert "set by the study" in capsys.readouterr().err
    assert study_main(["--out", str(tmp_path), "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert study_main(["--out", str(tmp_path), "--lrs", "fast"]) == 2
    assert "--lrs" in capsys.readouterr().err
    assert study_main(["--out", str(tmp_path), "--plan", "--quick"]) == 0
    assert "kernelized_prf_lr1.5e-1_seed1" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ the mechanism probe
@pytest.mark.parametrize("feature_map", ["prf", "nprf"])
def test_large_queries_and_keys_kill_prf_normalisers_and_gradients_but_not_nprf(feature_map):
    """The mechanism the probe found in the diverged runs (docs/results.md, "The mechanism"): as |q| and |k| grow, PRF key
    log-features fall below float32's exp range (keys die), the normaliser of some queries underflows, and the
    backward of 1 / normaliser overflows into non-finite gradients while the loss stays finite. NPRF normalises q
    and k first: the same weights leave it untouched."""
    model = tiny_model(0, vocab_size=60, d_model=64, n_heads=2, kind="kernelized", rpe="none",
                       feature_map=feature_map)
    batch = torch.randint(0, 60, (2, 25), generator=torch.Generator().manual_seed(0))
    before = measure(model, batch)
    assert not before["nonfinite_params"] and math.isfinite(before["grad_norm"])
    assert all(L["dead_keys"] == 0 and L["normaliser_min"] > 1e-3 for L in before["layers"])
    with torch.no_grad():
        for block in model.blocks:
            d = block.attn.qkv_proj.weight.shape[1]
            block.attn.qkv_proj.weight[:2 * d] *= 40.0  # q and k rows: |q|, |k| 40x
            block.attn.qkv_proj.weight[2 * d:] *= 100.0  # v rows
    after = measure(model, batch)
    layer0 = after["layers"][0]
    assert math.isfinite(after["loss"])
    if feature_map == "prf":
        assert layer0["key_exponent_min"] < -104 and layer0["dead_keys"] > 0  # below exp's float32 range
        assert layer0["normaliser_min"] == 0 and layer0["tiny_normalisers"] > 0
        assert math.isnan(layer0["grad_phi_k_max"]) and math.isnan(after["grad_norm"])
        assert "blocks.0.attn.qkv_proj.weight" in after["nonfinite_params"]
        # the division by the normaliser, or the causal mask's product with its overflowed gradient
        assert after["first_nonfinite_backward"].split(":")[0] in ("DivBackward0 at lm/ops/dense.py",
                                                                   "MulBackward0 at lm/ops/dense.py")
    else:
        assert layer0["key_exponent_min"] > -20 and layer0["dead_keys"] == 0 and layer0["normaliser_min"] > 1e-3
        assert not after["nonfinite_params"] and math.isfinite(after["grad_norm"])
        assert after["first_nonfinite_backward"] is None


# ------------------------------------------------------------------ the whole study, small
QUICK_TINY = ["data.source=synthetic", "data.synthetic.train_tokens=60000", "data.tokenizer.vocab_size=300",
              "model.d_model=64", "model.n_heads=2", "model.d_ff=64", "model.attention.num_features=16",
              "data.seq_len=32", "model.attention.rpe_max_distance=32", "max_steps=40", "optim.warmup_steps=10"]


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, capsys):
    """--quick through the real trainer (tiny model, synthetic data, lr 0.15 where PRF breaks): exit 0, the files,
    every run's summary equal to the verdict recomputed from its steps.jsonl, and a second call reuses them."""
    out = tmp_path / "study"
    argv = ["--quick", "--out", str(out), "--jobs", "2", "--threads", "1", "--lrs", "0.15", *QUICK_TINY]
    assert study_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["kernelized_prf", "kernelized_rpe_nprf"]
    for v in summary["variants"]:
        assert list(v) == list(VARIANT_FIELDS) and v["lr"] == 0.15
        for run in v["runs"]:
            assert list(run) == list(RUN_FIELDS)
            run_dir = out / "runs" / f"{v['name']}_lr1.5e-1_seed{run['seed']}"
            result = json.loads((run_dir / RESULT).read_text())
            records = read_steps(run_dir / "steps.jsonl")
            assert run == summarize_run(run["seed"], records, Outcome(**result["outcome"]), 5,
                                        result["evaluations"][0]["token_perplexity"] if result["evaluations"]
                                        else None)
            assert run["steps_completed"] == records[-1]["step"] <= 40
            if run["diverged"]:
                assert run["final_valid_ppl"] is None
            else:
                assert run["steps_completed"] == 40 and 1 < run["final_valid_ppl"] < 300
    prf, nprf = summary["variants"]
    assert any(r["diverged"] for r in prf["runs"]), "PRF at lr 0.15 is expected to break (non-finite gradients)"
    assert not all(r["diverged"] for r in nprf["runs"]), "NPRF + RPE at lr 0.15 is expected to survive"
    md = (out / "summary.md").read_text()
    assert "### lr 1.5e-1" in md and "| kernelized_prf |" in md and "diverged" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    settings = json.loads((out / "settings.json").read_text())
    assert [(i["jobs"], i["threads_per_run"], i["runs_run"]) for i in settings["invocations"]] == [(2, 1, 4)]
    capsys.readouterr()
    assert study_main(argv) == 0  # again: every run is reused
    assert "4 of 4 runs already have a result (kept)" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == summary
    invocations = json.loads((out / "settings.json").read_text())["invocations"]
    assert [i["runs_run"] for i in invocations] == [4, 0]  # the timing of the call that ran them is kept
    assert "4 run(s) in" in (out / "summary.md").read_text()
