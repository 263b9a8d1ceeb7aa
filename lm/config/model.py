"""The model's configuration: :class:`ModelConfig` and its :class:`AttentionConfig`, plain dataclasses that
validate themselves in ``__post_init__``, and :func:`model_config_from_dict`.

Part of the training config tree (:mod:`lm.config` merges YAML files and overrides onto them with OmegaConf), and
kept apart from it because a Hugging Face export carries the model's code: this module imports nothing beyond
torch (through the op's method names) and the standard library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Sequence

from lm.errors import UserError
from lm.ops.kernelized import METHODS, RPE_METHODS


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message says which key and what to change."""


def _choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}")


def _positive(name: str, value) -> None:
    if value is None or not value > 0:  # written so that nan fails too
        raise ConfigError(f"{name}={value!r} must be > 0")


def _in_range(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
              hint: str = "") -> None:
    """``value`` is a finite number in the interval from ``low`` to ``high`` (open at the ends asked for)."""
    ok = (value is not None and math.isfinite(value) and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        if math.isinf(high):
            wanted = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            wanted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name}={value!r} must be {wanted}{hint}")


def check_buckets(num_buckets: int, max_distance: int) -> None:
    """The rule of T5 log buckets (``model.attention.rpe=bucketed``): at least 2 buckets, and offsets beyond the
    exact ones (``num_buckets // 2``) to spread logarithmically up to ``max_distance``. A ConfigError naming the
    keys otherwise (also raised by :class:`lm.model.rpe.BucketedRPE` built by hand)."""
    if not (num_buckets >= 2 and max_distance > num_buckets // 2):
        raise ConfigError(f"model.attention.rpe=bucketed needs rpe_num_buckets >= 2 and rpe_max_distance > "
                          f"rpe_num_buckets // 2; got model.attention.rpe_num_buckets={num_buckets}, "
                          f"model.attention.rpe_max_distance={max_distance}: raise rpe_max_distance or lower "
                          f"rpe_num_buckets")


@dataclass
class AttentionConfig:
    kind: str = "kernelized_rpe"
    """kernelized_rpe (random features + learned RPE, the paper) | kernelized (random features, no RPE,
    sinusoidal absolute positions; the rpe keys are ignored) | softmax (exact attention via SDPA, RPE as
    additive bias unless rpe=none)."""
    feature_map: str = "nprf"
    """nprf (L2-normalised q, k then positive random features, the paper) | prf (Performer) | elu | relu
    (elu+1 and relu use head_dim deterministic features). Kernelized kinds only."""
    num_features: int = 64
    """Random features M per head (nprf/prf)."""
    orthogonal: bool = True
    """Draw orthogonal random projections (block-orthogonal Gaussian rows)."""
    redraw_every: int = 0
    """Redraw the random projections every this many training steps; 0 keeps them fixed."""
    rpe: str = "per_offset"
    """per_offset (one learnable scalar per offset up to rpe_max_distance) | bucketed (T5 log buckets) | none."""
    rpe_max_distance: int = 512
    """per_offset: offsets >= this share the last scalar (clipped RPE; set it >= the context for fully general
    RPE). bucketed: offsets >= this fall in the last bucket. Decoding costs O(rpe_max_distance) per token."""
    rpe_num_buckets: int = 32
    """bucketed: number of log buckets."""
    rpe_shared: bool = False
    """One RPE shared by all heads and layers (as in the paper) instead of one per head per layer."""
    method: str = "auto"
    """Op method for kernelized attention: auto | dense | fft | band | prefix | fused (forcing is for benchmarks)."""

    def __post_init__(self) -> None:
        _choice("model.attention.kind", self.kind, ["kernelized_rpe", "kernelized", "softmax"])
        _choice("model.attention.feature_map", self.feature_map, ["nprf", "prf", "elu", "relu"])
        _choice("model.attention.rpe", self.rpe, ["per_offset", "bucketed", "none"])
        _choice("model.attention.method", self.method, METHODS)
        _positive("model.attention.num_features", self.num_features)
        _positive("model.attention.rpe_max_distance", self.rpe_max_distance)
        _positive("model.attention.rpe_num_buckets", self.rpe_num_buckets)
        if self.redraw_every < 0:
            raise ConfigError("model.attention.redraw_every must be >= 0 (0 = never redraw)")
        if self.rpe == "bucketed":
            check_buckets(self.rpe_num_buckets, self.rpe_max_distance)
        if self.kind == "kernelized_rpe" and self.method not in RPE_METHODS:
            raise ConfigError(f"model.attention.method={self.method} computes attention without RPE: use it with "
                              f"model.attention.kind=kernelized, or pick one of {' | '.join(RPE_METHODS)}")
        if self.kind == "kernelized_rpe" and self.rpe == "none":
            raise ConfigError("model.attention.kind=kernelized_rpe needs an RPE: set model.attention.rpe to "
                              "per_offset or bucketed, or use model.attention.kind=kernelized")


@dataclass
class ModelConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 = take it from the tokenizer (filled in by training before the model is built)."""
    n_layers: int = 6
    """Transformer blocks (pre-norm attention + GELU MLP)."""
    d_model: int = 512
    """Residual stream width; tied token embedding / output dimension."""
    n_heads: int = 8
    """Attention heads; head_dim = d_model / n_heads."""
    d_ff: int = 2048
    """MLP hidden width."""
    dropout: float = 0.1
    """Dropout on the embeddings and on every residual branch (training only)."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention kind, feature map and RPE. No maximum sequence length: RPE tables clamp and the absolute
    positions of kind=kernelized are sinusoidal, so every model runs on sequences of any length."""

    def __post_init__(self) -> None:
        for k in ("n_layers", "d_model", "n_heads", "d_ff"):
            _positive(f"model.{k}", getattr(self, k))
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.vocab_size < 0:
            raise ConfigError("model.vocab_size must be >= 0 (0 = from the tokenizer)")


def model_config_from_dict(d: dict) -> ModelConfig:
    """A validated :class:`ModelConfig` from a plain dict (``dataclasses.asdict`` of one, as a Hugging Face
    ``config.json`` stores it); keys left out take their defaults, an unknown key is a :class:`ConfigError`."""
    return _from_dict(ModelConfig, d, "model")


def _from_dict(cls, d, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a key of {cls.__name__} (keys: {', '.join(known)})")
    values = {}
    for name, value in d.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        values[name] = _from_dict(type(default), value, f"{where}.{name}") if is_dataclass(default) else value
    return cls(**values)
