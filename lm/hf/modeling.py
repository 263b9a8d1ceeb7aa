"""``KernelizedLMForCausalLM``: our :class:`lm.model.Transformer` as a transformers causal LM, and
``KernelizedCache``, its decoding state as a transformers ``Cache``.

The cache is ours (:class:`lm.model.cache.ModelCache`): for kernelized attention a ring of the last ``L - 1``
keys plus prefix sums (constant memory with clipped RPE, whatever the context), for softmax attention a KV cache.
transformers' own generation loop (greedy, sampling, beam search) drives it: the first call of ``generate`` finds
no cache, the forward builds one and returns it, and every later call continues it, one token at a time.

Padding: ``attention_mask`` (1 for real tokens, 0 for padding; a left-padded batch) makes pad positions take no
part in any real token's attention, and ``position_ids`` (generate derives them from the mask) give the absolute
positions of ``kernelized`` models; RPE offsets are distances between positions of the batch, which left padding
leaves unchanged. So each row of a left-padded batch gets what it gets alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lm.hf.configuration import KernelizedLMConfig
from lm.model import Transformer
from lm.model.cache import ModelCache

__all__ = ["KernelizedLMForCausalLM", "KernelizedCache"]


class KernelizedCache(Cache):
    """A transformers ``Cache`` holding our :class:`~lm.model.cache.ModelCache` (``state``).

    Supports what the generation loop asks of a cache: its length, beam reordering, batch selection and
    repetition. Cropping (assisted decoding's rollback) is not supported: a recurrent state cannot be cut back.
    """

    def __init__(self, state: ModelCache):
        super().__init__(layers=[])
        self.state = state

    def __len__(self) -> int:
        return len(self.state.layers)

    def __repr__(self) -> str:
        return f"KernelizedCache(position={self.state.position}, batch_size={self.state.batch_size})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.position

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum

    def nbytes(self) -> int:
        """Bytes the decoding state holds (allocated capacity included)."""
        return self.state.nbytes()

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return not self.state.empty

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.select(beam_idx.to(torch.long))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state.select(indices.to(torch.long))

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(self.state.batch_size).repeat_interleave(repeats)
        self.state.select(rows)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("KernelizedCache cannot be cropped (a recurrent state cannot be cut back): "
                                      "assisted decoding is not supported")

    def reset(self) -> None:
        self.state = ModelCache([type(layer)() for layer in self.state.layers], 0, self.state.batch_size)


class KernelizedLMPreTrainedModel(PreTrainedModel):
    config_class = KernelizedLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module) -> None:
        """Only for weights a checkpoint does not hold (or a model built from a config): our GPT-2 init."""
        if isinstance(module, Transformer):
            module.init_weights()


class KernelizedLMForCausalLM(KernelizedLMPreTrainedModel, GenerationMixin):
    """A model trained with ``lm`` as a transformers ``*ForCausalLM``; ``self.model`` is the
    :class:`lm.model.Transformer` (weights under ``model.``)."""

    def __init__(self, config: KernelizedLMConfig):
        super().__init__(config)
        self.model = Transformer(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward builds its own cache (KernelizedCache) on the first call

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return None  # the output layer is the input embedding itself (no separate weight to tie)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """``input_ids`` ``(B, N)`` -> logits ``(B, N, V)`` float32 (the last ``logits_to_keep`` positions when > 0).

        ``attention_mask`` ``(B, past + N)`` or ``(B, N)``: 0 at padding. ``position_ids`` ``(B, N)``: absolute
        positions (used by ``kernelized`` models only). ``cache``: a :class:`KernelizedCache` from an earlier
        call; with ``use_cache`` (the config's default) and none given, a new one is built and returned.
        ``labels`` ``(B, N)``: next-token cross-entropy (mean over labels != -100), as transformers models do.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("KernelizedLMForCausalLM takes input_ids (inputs_embeds are not supported)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        n = input_ids.shape[1]
        state = None
        if use_cache and not self.training:
            if cache is not None and not isinstance(cache, KernelizedCache):
                if cache.get_seq_length() > 0:
                    raise ValueError(f"KernelizedLMForCausalLM keeps its own cache (KernelizedCache), got a "
                                     f"non-empty {type(cache).__name__}")
                cache = None  # an empty cache of another kind (e.g. made by a caller): use ours instead
            if cache is None:
                cache = KernelizedCache(self.model.new_cache(input_ids.shape[0]))
            state = cache.state
        else:
            cache = None
        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be (batch, length) with 1 for tokens and 0 for padding, got "
                                 f"shape {tuple(attention_mask.shape)}")
            key_mask = attention_mask[:, -n:].to(torch.bool)
            if state is None or state.empty:
                # once per prompt (not per generated token): an unpadded batch runs the very kernels of our own
                # decoding (tools/generate.py), so both give the same numbers; later calls continue what it chose
                if bool(key_mask.all()):
                    key_mask = None
                if state is not None:
                    state.padded = key_mask is not None
            elif not state.padded:
                key_mask = None  # generation appends real tokens only
        logits = self.model(input_ids, cache=state, key_mask=key_mask, positions=position_ids,
                            logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, -shifted.shape[1] - 1:-1].flatten(0, 1), shifted.flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
