"""Loss by position in the context window: does the model predict later tokens better, and where does it stop?

The stream ``s = [BOS] + tokens`` is cut into ``W`` consecutive full windows of ``context`` tokens (the tail
that does not fill one is left out, so every position is averaged over the same windows). In a window, position
``p`` (0-based) is the token predicted from the window's first ``p + 1`` tokens: position 0 sees one token, the
last position ``context - 1`` sees the whole window. The mean loss at each position, and over position buckets
(powers of two by default: ``[0, 1), [1, 2), [2, 4), ...``), shows how the model uses its context: a curve that
keeps falling uses the whole window; one that rises past the training context shows where extrapolation fails.

The model is any causal LM callable (:func:`logits_function`): our :class:`lm.model.Transformer`, a
transformers model such as an export of ``tools/export_hf.py``, or a function ``ids (B, n) -> logits (B, n, V)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lm.data.batches import document_starts
from lm.eval.perplexity import Window, _select, _window_inputs

__all__ = ["PositionLoss", "bucket_edges", "logits_function", "loss_by_position"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def logits_function(model) -> LogitsFn:
    """``ids (B, n) long -> logits (B, n, V)`` of a causal LM: our Transformer (which returns the logits), a
    transformers ``*ForCausalLM`` (called with ``use_cache=False``; its output's ``.logits``), or a callable that
    already returns logits (returned as is)."""
    if callable(getattr(model, "prepare_inputs_for_generation", None)):  # a transformers generation model
        return lambda ids: model(input_ids=ids, use_cache=False).logits
    if not callable(model):
        raise TypeError(f"expected a causal LM (a module or a function ids -> logits), got {type(model).__name__}")
    return model


def bucket_edges(context: int, width: int | None = None) -> list[int]:
    """Edges ``[e_0 = 0, e_1, ..., e_K = context]`` of the position buckets ``[e_k, e_k+1)``: powers of two
    (``0, 1, 2, 4, ...``, the last bucket ending at ``context``) or, with ``width``, buckets of ``width``
    positions (the last one shorter when ``width`` does not divide ``context``)."""
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    if width is not None:
        if width < 1:
            raise ValueError(f"bucket width={width} must be >= 1")
        return [*range(0, context, width), context]
    edges = [0]
    while edges[-1] < context:
        edges.append(min(context, max(1, 2 * edges[-1])))
    return edges


@dataclass(frozen=True)
class PositionLoss:
    """Mean loss by position over ``num_windows`` windows of ``context`` tokens (see the module docstring)."""

    context: int
    num_windows: int
    edges: list[int]
    """Bucket ``k`` holds positions ``edges[k] <= p < edges[k + 1]``."""
    bucket_loss: list[float]
    """Mean NLL (nats) of the tokens of each bucket."""
    bucket_tokens: list[int]
    """Tokens scored in each bucket (positions in it times ``num_windows``)."""
    position_loss: list[float]
    """Mean NLL (nats) at each position ``0 .. context - 1``."""

    @property
    def mean_loss(self) -> float:
        """Mean NLL over every scored token (all positions weigh the same)."""
        return float(np.mean(self.position_loss))


def _full_windows(num_tokens: int, context: int) -> list[Window]:
    """The consecutive windows of exactly ``context`` inputs over ``[BOS] + tokens`` whose targets all exist."""
    return [Window(k * context, k * context, (k + 1) * context) for k in range(num_tokens // context)]


@torch.no_grad()
def loss_by_position(model, tokens: np.ndarray | torch.Tensor, context: int, bos_id: int, batch_size: int = 8,
                     bucket_width: int | None = None, max_windows: int | None = None,
                     device: str | torch.device = "cpu", progress: bool = False,
                     document_eos: int | None = None) -> PositionLoss:
    """Mean loss by position in the window (and by bucket, :func:`bucket_edges`) over a token stream.

    Args:
        model: a causal LM (:func:`logits_function`), on ``device``. A ``torch.nn.Module`` runs in eval mode here
            (its previous mode is restored).
        tokens: (T,) token ids (e.g. a split's ``np.memmap``); read window by window. Needs ``T >= context``.
        context: tokens per window, BOS included for the first window.
        bos_id: the beginning-of-sequence id the first window starts with.
        batch_size: windows per forward pass.
        bucket_width: positions per bucket; None for powers of two.
        max_windows: use only this many windows, spread evenly over the stream; None uses all.
        document_eos: a model trained with ``data.document_mask``: documents in a window do not see each other
            (as :func:`lm.eval.perplexity.score_tokens`); positions stay those of the window.

    Returns:
        :class:`PositionLoss` (float64 sums; the per-token NLL is computed in float32 from the logits).
    """
    if np.ndim(tokens) != 1:
        raise ValueError(f"tokens must be a 1-D stream of ids, got shape {tuple(np.shape(tokens))}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    edges = bucket_edges(context, bucket_width)
    windows = _select(_full_windows(len(tokens), context), max_windows)
    if not windows:
        raise ValueError(f"a stream of {len(tokens)} tokens holds no full window of {context} tokens: use a "
                         f"shorter context or a longer split")
    logits_of = logits_function(model)
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    sums = torch.zeros(context, dtype=torch.float64, device=device)
    bar = tqdm(total=len(windows), unit="window", desc=f"positions @{context}", disable=not progress,
               dynamic_ncols=True)
    try:
        for a in range(0, len(windows), batch_size):
            group = windows[a:a + batch_size]
            ids = torch.stack([_window_inputs(tokens, w, bos_id) for w in group]).to(device)
            targets = torch.stack([torch.as_tensor(np.asarray(tokens[w.start:w.end], dtype=np.int64))
                                   for w in group]).to(device)
            logits = logits_of(ids) if document_eos is None else model(ids, document_starts=document_starts(
                ids, document_eos))
            if logits.shape[:2] != ids.shape:
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for ids {tuple(ids.shape)}")
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (b, context)
            sums += nll.double().sum(0)
            bar.update(len(group))
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
    per_position = (sums / len(windows)).cpu()
    bucket_loss = [per_position[lo:hi].mean().item() for lo, hi in zip(edges[:-1], edges[1:])]
    bucket_tokens = [(hi - lo) * len(windows) for lo, hi in zip(edges[:-1], edges[1:])]
    return PositionLoss(context, len(windows), edges, bucket_loss, bucket_tokens, per_position.tolist())
