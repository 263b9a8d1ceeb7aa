"""``KernelizedLMConfig``: a transformers config that carries our :class:`lm.config.model.ModelConfig` whole
(``lm_model``), so the Hugging Face model is built exactly as the checkpoint's model was."""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from lm.config.model import ConfigError, model_config_from_dict

MODEL_TYPE = "lm_kernelized"


class KernelizedLMConfig(PretrainedConfig):
    """transformers config of a model trained with ``lm``.

    ``lm_model``: the ``model`` section of the training config (``lm.config.model.ModelConfig`` as a dict).
    ``n_positions``: the training context (``data.seq_len``). It is not a limit: the model runs on any length (RPE
    tables clamp, absolute positions are sinusoidal), so no ``max_position_embeddings`` is declared; tools that ask
    a config for a context (lm-evaluation-harness) take ``n_positions``, as our own tools default to it.
    """

    model_type = MODEL_TYPE

    def __init__(self, lm_model: dict | None = None, n_positions: int = 512, bos_token_id: int = 1,
                 eos_token_id: int = 2, pad_token_id: int | None = None, use_cache: bool = True, **kwargs):
        self.lm_model = dict(lm_model or {})
        self.n_positions = n_positions
        self.use_cache = use_cache
        self.vocab_size = int(self.lm_model.get("vocab_size", 0))
        self.hidden_size = int(self.lm_model.get("d_model", 0))
        self.num_hidden_layers = int(self.lm_model.get("n_layers", 0))
        self.num_attention_heads = int(self.lm_model.get("n_heads", 0))
        kwargs.setdefault("tie_word_embeddings", True)  # the output layer is the token embedding
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def model_config(self):
        """The :class:`lm.config.model.ModelConfig` this config carries (validated)."""
        try:
            return model_config_from_dict(self.lm_model)
        except ConfigError as e:
            raise ConfigError(f"config.json's lm_model is not a model config of this lm version: {e}") from None

    @classmethod
    def from_model_config(cls, model_cfg, train_context: int, **kwargs) -> "KernelizedLMConfig":
        return cls(lm_model=dataclasses.asdict(model_cfg), n_positions=train_context, **kwargs)
