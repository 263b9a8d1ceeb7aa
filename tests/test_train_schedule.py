"""The learning-rate schedule: warmup, cosine to the floor, constant; a pure function of the step."""
import math

import pytest

from lm.config import load_config
from lm.training.schedule import lr_at


def optim(*overrides):
    return load_config([], ["optim.lr=1e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", *overrides]).optim


def test_warmup_is_linear_and_reaches_the_peak():
    cfg = optim()
    assert [lr_at(s, cfg, 100) for s in range(10)] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert lr_at(10, cfg, 100) == pytest.approx(1e-3)


def test_cosine_decays_monotonically_to_the_floor_at_the_last_step():
    cfg = optim()
    lrs = [lr_at(s, cfg, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(1e-4) and lr_at(500, cfg, 100) == pytest.approx(1e-4)
    mid = 10 + (100 - 1 - 10) / 2
    assert lr_at(int(mid), cfg, 100) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_constant_and_no_warmup():
    assert lr_at(50, optim("optim.schedule=constant"), 100) == 1e-3
    assert lr_at(0, optim("optim.warmup_steps=0"), 100) == pytest.approx(1e-3)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, optim(), 100)
