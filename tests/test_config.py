import json
from pathlib import Path

import pytest

from lm.config import (ConfigError, as_dict, config_from_dict, load_config, load_stored_config, migrate_stored,
                       to_yaml)


def test_defaults_and_overrides():
    cfg = load_config([], ["model.n_layers=2", "data.path=/some/dir", "optim.lr=1e-3"])
    assert cfg.model.n_layers == 2 and cfg.optim.lr == 1e-3
    assert cfg.data.source == "local"  # data.path selects local files


@pytest.mark.parametrize("override, needle", [
    ("model.nlayers=2", "model.nlayers"),
    ("model.n_layers=abc", "model.n_layers"),
    ("model.attention.kind=transformer", "model.attention.kind"),
    ("batch_size=10", "micro_batch_size"),
    ("model.d_model=100", "n_heads"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config([], [override])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["model.n_layers"])


def test_yaml_file_and_dict_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  d_model: 64\n  n_heads: 4\ndata:\n  source: synthetic\n")
    cfg = load_config([f], ["model.attention.rpe=bucketed"])
    assert cfg.model.d_model == 64 and cfg.data.source == "synthetic"
    assert config_from_dict(as_dict(cfg)) == cfg
    assert "rpe: bucketed" in to_yaml(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  colour: red\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config([bad])


# ------------------------------------------------------------------ keys that moved (deepspeed.* -> compute.*)
OLD_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint_v0"
"""meta.json and config.yaml of a checkpoint written by a version before compute.* existed (the smoke config with
deepspeed.precision=bf16 deepspeed.activation_checkpointing=true)."""


@pytest.mark.parametrize("override, new", [
    ("deepspeed.precision=bf16", "use compute.precision=bf16"),
    ("deepspeed.activation_checkpointing=true", "use compute.activation_checkpointing=true"),
])
def test_moved_keys_given_by_a_user_are_refused_naming_the_new_key(tmp_path, override, new):
    with pytest.raises(ConfigError, match=new) as e:
        load_config([], [override])
    assert "\n" not in str(e.value)
    f = tmp_path / "old.yaml"
    f.write_text("deepspeed:\n  zero_stage: 1\n  precision: bf16\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: deepspeed\.precision was renamed compute\.precision"):
        load_config([f])


def test_compute_section():
    cfg = load_config([], ["compute.precision=bf16", "compute.activation_checkpointing=true", "compute.tf32=false"])
    assert (cfg.compute.precision, cfg.compute.activation_checkpointing, cfg.compute.tf32) == ("bf16", True, False)
    assert load_config().compute.tf32 is True  # on by default
    with pytest.raises(ConfigError, match="compute.precision"):
        load_config([], ["compute.precision=fp8"])


def test_configs_stored_by_an_older_version_are_migrated_silently():
    cfg = load_config([], ["compute.precision=bf16", "compute.activation_checkpointing=true"])
    old = as_dict(cfg)
    compute = old.pop("compute")
    old["deepspeed"].update(precision=compute["precision"], activation_checkpointing=True)  # the old layout
    assert config_from_dict(old) == cfg
    assert migrate_stored(old)["compute"] == {"precision": "bf16", "activation_checkpointing": True}
    assert "precision" in old["deepspeed"]  # the caller's dict is not modified
    with pytest.raises(ConfigError, match="compute.precision"):  # the user's overrides are still checked
        config_from_dict(old, ["deepspeed.precision=fp32"])


@pytest.mark.parametrize("load", [
    lambda: config_from_dict(json.loads((OLD_CHECKPOINT / "meta.json").read_text())["config"]),
    lambda: load_stored_config(OLD_CHECKPOINT / "config.yaml"),
], ids=["meta.json", "config.yaml"])
def test_a_config_written_by_the_previous_version_loads(load):
    cfg = load()
    assert cfg.compute.precision == "bf16" and cfg.compute.activation_checkpointing and cfg.compute.tf32
    assert cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.torch_adam and cfg.model.vocab_size == 384
    with pytest.raises(ConfigError, match="renamed compute.precision"):  # the same file given as a training config
        load_config([OLD_CHECKPOINT / "config.yaml"])


def test_batch_divisibility_is_checked_in_the_config():
    cfg = load_config([], ["batch_size=24", "micro_batch_size=4"])
    assert [cfg.gradient_accumulation_steps(w) for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    with pytest.raises(ConfigError, match="batch_size=24 must be a multiple of micro_batch_size x ranks = 4 x 4"):
        cfg.gradient_accumulation_steps(4)


# ------------------------------------------------------------------ every optimiser, schedule and divergence field
@pytest.mark.parametrize("override, needle", [
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number > 0"),
    ("optim.lr=0", "optim.lr=0.0 must be a finite number > 0"),
    ("optim.min_lr_ratio=-3", "optim.min_lr_ratio=-3.0 must be a number in [0, 1]"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must be a number in [0, 1]"),
    ("optim.beta1=1", "optim.beta1=1.0 must be a number in [0, 1)"),
    ("optim.beta1=-0.1", "optim.beta1=-0.1 must be a number in [0, 1)"),
    ("optim.beta2=1.0", "optim.beta2=1.0 must be a number in [0, 1)"),
    ("optim.beta2=nan", "optim.beta2=nan must be a number in [0, 1)"),
    ("optim.eps=0", "optim.eps=0.0 must be a finite number > 0"),
    ("optim.eps=-1e-8", "optim.eps=-1e-08 must be a finite number > 0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay=-0.01 must be a finite number >= 0"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan must be a finite number >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be a finite number >= 0"),
    ("optim.grad_clip=inf", "optim.grad_clip=inf must be a finite number >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("optim.schedule=linear", "optim.schedule='linear' is not one of"),
    ("divergence.max_bad_steps=0", "divergence.max_bad_steps=0 must be > 0"),
    ("divergence.spike_window=0", "divergence.spike_window=0 must be > 0"),
    ("divergence.spike_factor=1", "divergence.spike_factor=1.0 must be 0 (off) or a number > 1"),
    ("divergence.spike_factor=-2", "divergence.spike_factor=-2.0 must be 0 (off) or a number > 1"),
    ("divergence.spike_factor=nan", "divergence.spike_factor=nan must be 0 (off) or a number > 1"),
    ("divergence.final_loss_factor=0.5", "divergence.final_loss_factor=0.5 must be 0 (off) or a number > 1"),
])
def test_every_optimiser_schedule_and_divergence_field_is_validated(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_valid_edge_values_are_accepted():
    cfg = load_config([], ["optim.min_lr_ratio=0", "optim.beta1=0", "optim.weight_decay=0", "optim.grad_clip=0",
                           "divergence.spike_factor=0", "optim.min_lr_ratio=1"])
    assert cfg.optim.min_lr_ratio == 1 and cfg.divergence.spike_factor == 0


def test_max_nonfinite_steps_moved_to_divergence_max_bad_steps(tmp_path):
    with pytest.raises(ConfigError, match=r"max_nonfinite_steps was renamed divergence\.max_bad_steps .*: use "
                                          r"divergence\.max_bad_steps=3"):
        load_config([], ["max_nonfinite_steps=3"])
    old = as_dict(load_config())
    del old["divergence"]
    old["max_nonfinite_steps"] = 7  # a config stored before the divergence section existed
    assert config_from_dict(old).divergence.max_bad_steps == 7
    assert load_stored_config(OLD_CHECKPOINT / "config.yaml").divergence.max_bad_steps == 5


@pytest.mark.parametrize("text, needle", [
    ("model:\n  d_model: [64\n", "YAML syntax error at line 3, column 1"),
    ("optim: {lr: 1e-3\n", "YAML syntax error at line 2"),
    ("model:\n\td_model: 64\n", "YAML syntax error at line 2"),
    ("- optim.lr=1e-3\n- max_steps=10\n", "the top level must be a mapping of keys"),
])
@pytest.mark.parametrize("loader", [load_config, load_stored_config], ids=["training config", "stored config"])
def test_yaml_errors_are_one_line_config_errors(tmp_path, text, needle, loader):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        loader([f]) if loader is load_config else loader(f)
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)
