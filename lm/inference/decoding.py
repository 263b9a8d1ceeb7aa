"""Incremental decoding: :func:`prefill` runs the parallel forward over a prompt and keeps each layer's state,
:func:`decode_step` then advances one token at a time; together they reproduce the full forward's logits.

The state lives in the model's cache (:meth:`lm.model.Transformer.new_cache`, :mod:`lm.model.cache`); the layers
do the maths with the op's two forms (:mod:`lm.ops`): the parallel op over the prompt hands over its final
state, the recurrent step continues it. Per layer (``B`` batch, ``H`` heads, ``M`` features, ``D`` head dim,
``L`` RPE table length):

- kernelized attention: a ring of the last ``L - 1`` keys' features and values plus prefix sums of the farther
  ones: ``O(L (M + D))`` time per token and ``O(M D + L (M + D))`` memory, independent of the context length
  (clipped RPE). A table as long as the context (general RPE) makes the ring a growing cache until the context
  exceeds ``L``. Without RPE ``L = 1``: the ring is empty and the state is plain linear attention's.
- softmax attention: a KV cache (``O(n D)`` per token) with the RPE bias of each cached offset.

Absolute positions (``kernelized``) continue from the prefill length. Buffers grow by doubling, so a long prompt
or generation never copies the cache more than ``O(log n)`` times.
"""
from __future__ import annotations

import torch

from lm.model import Transformer
from lm.model.cache import KernelizedLayerCache, ModelCache, SoftmaxLayerCache

__all__ = ["DecodeCache", "KernelizedLayerCache", "SoftmaxLayerCache", "prefill", "decode_step"]

DecodeCache = ModelCache
"""The cache :func:`prefill` returns and :func:`decode_step` advances (:class:`lm.model.cache.ModelCache`)."""


def _check_model(model: Transformer) -> None:
    # eval mode and a cache that fits the call are checked by Transformer.forward itself
    if not isinstance(model, Transformer):
        raise TypeError(f"decoding needs an lm.model.Transformer, got {type(model).__name__}")


@torch.no_grad()
def prefill(model: Transformer, ids: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, ModelCache]:
    """Full parallel forward over ``ids`` ``(B, N)`` (``N`` may be 0) -> ``(logits (B, N, V) float32, cache)``.

    The logits equal ``model(ids)``; the cache continues from position ``N``. ``last_only`` returns only the
    last position's logits ``(B, min(N, 1), V)`` (a 64k-token prompt's full logits would take GBs).
    """
    _check_model(model)
    if ids.ndim != 2:
        raise ValueError(f"prefill expects ids of shape (B, N), got {tuple(ids.shape)}")
    cache = model.new_cache(ids.shape[0])
    return model(ids, cache=cache, logits_to_keep=1 if last_only else 0), cache


@torch.no_grad()
def decode_step(model: Transformer, cache: ModelCache, ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence, ``ids`` ``(B,)``, at position ``cache.position`` -> logits ``(B, V)`` float32.

    Advances ``cache`` in place. The logits equal ``model(all_ids)[:, -1]`` over every token fed so far.
    """
    _check_model(model)
    if ids.ndim != 1:
        raise ValueError(f"decode_step expects one token per sequence, ids of shape (B,), got {tuple(ids.shape)}")
    return model(ids[:, None], cache=cache)[:, 0]
