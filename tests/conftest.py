"""Shared test scaffolding: paths, tiny model and config builders, a smoke-training command, and `assert_close`.

Test files import the helpers from here (``from conftest import tiny_model``); fixtures are found by pytest.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.config import AttentionConfig, ModelConfig, TrainConfig, load_config
from lm.distributed import DistInfo
from lm.model import Transformer

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
SAMPLE_DIR = REPO.parent / "shared" / "data" / "wikitext-103-sample"
"""Real WikiText-103 files (train: a 0.5% prefix; valid and test complete), next to the repository when present."""


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """:data:`SAMPLE_DIR`; the test is skipped when it is not there."""
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"{SAMPLE_DIR} not present")
    return SAMPLE_DIR


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_model_config(vocab_size: int = 50, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, d_ff: int = 64,
                      dropout: float = 0.0, **attention) -> ModelConfig:
    """A model config small enough for exhaustive CPU tests; ``attention`` are AttentionConfig fields
    (``num_features`` defaults to 16)."""
    attention.setdefault("num_features", 16)
    return ModelConfig(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_ff=d_ff,
                       dropout=dropout, attention=AttentionConfig(**attention))


def tiny_model(seed: int = 0, *, config: ModelConfig | None = None, init_weights: bool = True,
               looks_trained: bool = False, **config_fields) -> Transformer:
    """A tiny Transformer in eval mode, every random draw fixed by ``seed``.

    Args:
        config: the model config; default ``tiny_model_config(**config_fields)``.
        init_weights: the GPT-2 initialisation (:meth:`Transformer.init_weights`); False keeps PyTorch's default.
        looks_trained: then redraw the RPE biases from N(0, 1) and the token embeddings from N(0, 0.5), so that
            the RPE is far from flat and the logits are O(1), as in a trained model.
    """
    torch.manual_seed(seed)
    model = Transformer(config if config is not None else tiny_model_config(**config_fields))
    if init_weights:
        model.init_weights()
    if looks_trained:
        with torch.no_grad():
            for p in model.rpe.parameters():
                p.normal_(0.0, 1.0)
            model.tok_emb.weight.normal_(0.0, 0.5)
    return model.eval()


def tiny_train_config(*overrides: str) -> TrainConfig:
    """A full training config around a 2-layer, 32-wide model on 12-token windows, batch 8 (micro-batches of 2)."""
    return load_config([], ["model.vocab_size=50", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                            "model.d_ff=64", "model.dropout=0.0", "model.attention.num_features=8",
                            "model.attention.rpe_max_distance=16", "data.source=synthetic", "data.seq_len=12",
                            "batch_size=8", "micro_batch_size=2", "optim.warmup_steps=0", *overrides])


def cpu_info(rank: int = 0, world: int = 1) -> DistInfo:
    """Where a plain-torch engine runs in a CPU test."""
    return DistInfo("torch", rank, world, rank, torch.device("cpu"))


def smoke_argv(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    """Arguments of ``lm.cli.train.main`` (= ``tools/train.py``) for a short smoke run: configs/smoke.yaml on a
    small synthetic corpus, a loss line every step, no validation; later ``overrides`` win."""
    return [str(SMOKE_CONFIG), f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "data.progress=false",
            "data.synthetic.train_tokens=60000", "log_every=1", "eval_every=0", *overrides]


# ---------------------------------------------------------------------------------------------- comparisons
def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """``got`` equals ``want`` up to ``rtol`` times the largest magnitude of ``want`` (a max-norm relative error:
    the scale-free check for logits and activations, which have no natural per-element tolerance)."""
    assert got.shape == want.shape, f"{what} shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    err = ((got - want).abs().max() / scale).item()
    assert err <= rtol, f"{what} relative error {err:.2e} > {rtol:.1e}"
