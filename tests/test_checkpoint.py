"""Checkpoints: round trip, atomic writes, pruning, and clear errors."""
import pytest
import torch

from conftest import copy_run, cpu_info, smoke_argv
from lm import checkpoint
from lm.checkpoint import CheckpointError, find_checkpoint, list_checkpoints
from lm.inference.loading import load_for_inference
from lm.training.checkpointing import save_checkpoint
from lm.cli.train import main
from lm.config import load_config, load_stored_config
from lm.training.engine import TorchEngine
from lm.model import Transformer


def test_round_trip_gives_identical_logits(trained_run):
    inf = load_for_inference(trained_run)
    assert inf.step == 6 and not inf.model.training and inf.path.name == "step_00000006"
    assert all(p.dtype == torch.float32 for p in inf.model.parameters())
    # rebuild by hand from the stored weights: the same logits, bit for bit
    cfg = inf.cfg
    model = Transformer(cfg.model)
    model.load_state_dict(torch.load(inf.path / "model.pt", weights_only=True))
    model.eval()
    ids = torch.tensor([inf.tokenizer.encode("what is kelo ? 37 .\nthe red fox sees a small bird .")])
    with torch.no_grad():
        assert torch.equal(inf.model(ids), model(ids))
    # an older checkpoint directory loads too, and differs (training moved the weights)
    old = load_for_inference(trained_run / "checkpoints/step_00000004")
    assert old.step == 4
    with torch.no_grad():
        assert not torch.equal(old.model(ids), model(ids))


def test_overrides_apply_to_the_stored_config(trained_run):
    inf = load_for_inference(trained_run, overrides=["model.attention.method=dense"])
    assert inf.cfg.model.attention.method == "dense"
    assert inf.tokenizer.hash == checkpoint.read_meta(inf.path)["tokenizer_hash"]


def test_overrides_that_change_the_architecture_fail_clearly(trained_run):
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_for_inference(trained_run, overrides=["model.n_layers=3"])


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_for_inference(tmp_path)


def test_crash_while_saving_keeps_the_previous_checkpoint(trained_run, tmp_path, monkeypatch):
    inf = load_for_inference(trained_run)
    cfg = load_config([trained_run / "config.yaml"], [f"run_dir={tmp_path}"])
    engine = TorchEngine(cfg, inf.model.train(), cpu_info())
    first = save_checkpoint(tmp_path, engine, 10, cfg, inf.tokenizer, {}, keep=3)
    good = (first / "model.pt").read_bytes()

    real_save = torch.save

    def dies_on_weights(obj, f, *a, **k):
        if str(getattr(f, "name", f)).endswith("model.pt"):
            raise OSError("disk full (injected)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_on_weights)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, engine, 20, cfg, inf.tokenizer, {}, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert list_checkpoints(tmp_path) == [first] and find_checkpoint(tmp_path) == first
    assert (first / "model.pt").read_bytes() == good
    assert (tmp_path / "checkpoints/.tmp-step_00000020").exists()  # debris, never read
    assert load_for_inference(tmp_path).step == 10

    # the next save cleans up, and pruning keeps the newest ones
    (tmp_path / "checkpoints/.tmp-step_00000015").mkdir()  # debris of another crashed save
    for step in (20, 30, 40):
        save_checkpoint(tmp_path, engine, step, cfg, inf.tokenizer, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]
    # saving a step that exists replaces it whole
    save_checkpoint(tmp_path, engine, 40, cfg, inf.tokenizer, {"nonfinite_in_a_row": 2}, keep=2)
    assert checkpoint.read_meta(find_checkpoint(tmp_path))["counters"] == {"nonfinite_in_a_row": 2}


def test_damaged_meta_is_a_clear_error(trained_run, tmp_path):
    import shutil
    damaged = tmp_path / "step_00000006"
    shutil.copytree(find_checkpoint(trained_run), damaged)
    (damaged / checkpoint.META).write_text('{"step": 6, "tok')  # e.g. a disk that lost the end of the file
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_for_inference(damaged)


LATER_KEYS = {"data": ("files", "text_field", "valid_fraction", "hf_splits", "hf_rows"),
              "": ("save_every_minutes", "time_limit_minutes", "preemption")}
"""Config keys added after the first stored checkpoints: such a checkpoint lacks them."""


def _as_written_by_an_older_version(checkpoint_dir):
    """Rewrite a checkpoint's stored config (meta.json and config.yaml) in the layout of an older version:
    compute.precision / compute.activation_checkpointing under deepspeed, no compute section, none of
    :data:`LATER_KEYS`."""
    import json

    import yaml
    meta = json.loads((checkpoint_dir / checkpoint.META).read_text())
    meta.pop("files"), meta.pop("sha256"), meta.pop("meta_sha256")  # nor did meta.json list the checkpoint's files
    (checkpoint_dir / checkpoint.META_HASH).unlink()                  # then, or have a hash of its own
    for stored in (meta["config"], yaml.safe_load((checkpoint_dir / "config.yaml").read_text())):
        compute = stored.pop("compute")
        stored["deepspeed"].update(precision=compute["precision"],
                                   activation_checkpointing=compute["activation_checkpointing"])
        for section, keys in LATER_KEYS.items():
            for key in keys:
                (stored[section] if section else stored).pop(key)
    (checkpoint_dir / checkpoint.META).write_text(json.dumps(meta, indent=1))
    (checkpoint_dir / "config.yaml").write_text(yaml.safe_dump(stored))


def test_checkpoints_of_an_older_version_load_and_resume(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    for ckpt in list_checkpoints(run):
        _as_written_by_an_older_version(ckpt)
    stored = (find_checkpoint(run) / checkpoint.META).read_text()
    assert "compute" not in stored and "text_field" not in stored and "preemption" not in stored
    old, new = load_for_inference(run), load_for_inference(trained_run)
    assert old.cfg == new.cfg and old.step == 6
    ids = torch.tensor([new.tokenizer.encode("what is kelo ? 37 .")])
    with torch.no_grad():
        assert torch.equal(old.model(ids), new.model(ids))
    assert load_stored_config(find_checkpoint(run) / "config.yaml") == old.cfg
    assert main(smoke_argv(run, trained_run.parent / "cache", "max_steps=8", "save_every=3")) == 0  # from step 6
    assert checkpoint.read_meta(find_checkpoint(run))["step"] == 8


def test_pruning_after_resuming_from_an_older_checkpoint_keeps_the_newer_ones(trained_run, tmp_path):
    """A run resumed from an older checkpoint (say the newest one's optimizer state was damaged) saves steps
    below its newer checkpoints: pruning removes only checkpoints older than the step saved, so the newer ones,
    whose weights may well be good, stay whole until their own step is saved again."""
    inf = load_for_inference(trained_run)
    cfg = load_config([trained_run / "config.yaml"], [f"run_dir={tmp_path}"])
    engine = TorchEngine(cfg, inf.model.train(), cpu_info())
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, engine, step, cfg, inf.tokenizer, {}, keep=10)
    newer = {c.name: (c / "model.pt").read_bytes() for c in list_checkpoints(tmp_path)[2:]}
    save_checkpoint(tmp_path, engine, 25, cfg, inf.tokenizer, {}, keep=2)  # resumed from step 20
    assert [checkpoint.checkpoint_step(c) for c in list_checkpoints(tmp_path)] == [20, 25, 30, 40]
    assert {name: (tmp_path / "checkpoints" / name / "model.pt").read_bytes() for name in newer} == newer
    assert all(checkpoint.damage(c, "training") is None for c in list_checkpoints(tmp_path))
    save_checkpoint(tmp_path, engine, 30, cfg, inf.tokenizer, {}, keep=2)  # its step again: replaced, 20 pruned
    assert [checkpoint.checkpoint_step(c) for c in list_checkpoints(tmp_path)] == [25, 30, 40]
