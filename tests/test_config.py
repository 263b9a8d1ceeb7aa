import pytest

from lm.config import ConfigError, as_dict, config_from_dict, load_config, to_yaml


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
