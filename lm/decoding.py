"""Incremental decoding: ``prefill`` runs the parallel forward over a prompt and builds per-layer state,
``decode_step`` then advances one token at a time; together they reproduce the full forward's logits.

Per-layer state (``B`` batch, ``H`` heads, ``M`` features, ``D`` head dim, ``L`` RPE table length):

- Kernelized attention, RPE table ``b`` (``c(t) = exp(b[min(t, L-1)])``, constant for ``t >= L - 1``):
  a prefix state ``S = sum_j phi_k_j (x) [v_j, 1]`` over the keys at offset ``>= L - 1`` (they all share the
  weight ``c(L-1)``) plus a ring buffer of the last ``L - 1`` keys' ``phi_k`` and ``v``. Per token
  ``O(L (M + D))`` time and ``O(M D + L (M + D))`` memory, independent of the context length. A table as long
  as the context (general RPE) makes the ring a growing cache of ``phi_k`` and ``v`` until the context
  exceeds ``L``. Without RPE ``L = 1``: the ring is empty and ``S`` is plain linear attention's state.
- Softmax attention: a KV cache (``O(n D)`` per token) with the RPE bias for each cached offset.

Absolute positions (``kernelized``) continue from the prefill length. Buffers grow by doubling, so a
long prompt or generation never copies the cache more than ``O(log n)`` times.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lm.attention import KernelizedAttention, SoftmaxAttention
from lm.model import Transformer
from lm.rpe import relative_bias

__all__ = ["DecodeCache", "KernelizedLayerCache", "SoftmaxLayerCache", "prefill", "decode_step"]


def _grow(buf: torch.Tensor, needed: int, limit: int | None = None) -> torch.Tensor:
    """``buf`` ``(B, H, cap, X)`` with room for ``needed`` entries along dim 2 (capacity doubles, capped at
    ``limit``); contents preserved."""
    cap = buf.shape[2]
    if limit is not None and needed > limit:
        raise ValueError(f"cache buffer asked for {needed} entries beyond its limit {limit}")
    if needed <= cap:
        return buf
    new_cap = max(needed, 2 * cap, 16)
    if limit is not None:
        new_cap = min(new_cap, limit)
    out = buf.new_zeros(buf.shape[0], buf.shape[1], new_cap, buf.shape[3])
    out[:, :, :cap] = buf
    return out


class KernelizedLayerCache:
    """Recurrent state of one :class:`KernelizedAttention` layer (see the module docstring).

    ``weights`` ``(H or 1, L)``: ``exp(b - max b)`` (the max cancels between numerator and denominator);
    ``kv`` ``(B, H, M, D)`` and ``k_sum`` ``(B, H, M)``: the prefix state of keys at offset ``>= L - 1``;
    ``ring_k`` ``(B, H, cap, M)``, ``ring_v`` ``(B, H, cap, D)``: key ``j`` of the last ``L - 1`` sits in slot
    ``j % (L - 1)``; ``length``: tokens seen so far.
    """

    def __init__(self, rpe_table: torch.Tensor | None):
        self.table = rpe_table
        self.length = 0
        self.weights = self.kv = self.k_sum = self.ring_k = self.ring_v = None

    @property
    def ring_size(self) -> int:
        """L - 1: how many recent keys keep their own offset's weight."""
        return self.weights.shape[-1] - 1

    def _init_state(self, phi_k: torch.Tensor, v: torch.Tensor) -> None:
        b, h, _, m = phi_k.shape
        table = torch.zeros(1, device=v.device) if self.table is None else self.table
        table = table.to(v.dtype).reshape(-1, table.shape[-1])
        self.weights = torch.exp(table - table.amax(-1, keepdim=True))
        self.kv = v.new_zeros(b, h, m, v.shape[-1])
        self.k_sum = v.new_zeros(b, h, m)
        self.ring_k, self.ring_v = v.new_zeros(b, h, 0, m), v.new_zeros(b, h, 0, v.shape[-1])

    def prefill(self, attn: KernelizedAttention, x: torch.Tensor) -> torch.Tensor:
        """Parallel attention over ``x`` ``(B, N, d_model)`` (the prompt) and the state after it."""
        phi_q, phi_k, v = attn.features(x)
        self._init_state(phi_k, v)
        n, ring = x.shape[1], self.ring_size
        table = None if self.table is None else self.table[..., : max(1, min(n, self.table.shape[-1]))]
        o = attn.attend(phi_q, phi_k, v, table)
        n_prefix = max(0, n - ring)  # keys 0 .. n - L: at offset >= L - 1 from the last query n - 1
        self.kv += torch.einsum("bhnm,bhnd->bhmd", phi_k[:, :, :n_prefix], v[:, :, :n_prefix])
        self.k_sum += phi_k[:, :, :n_prefix].sum(2)
        if ring > 0:
            self.ring_k = _grow(self.ring_k, min(n, ring), ring)
            self.ring_v = _grow(self.ring_v, min(n, ring), ring)
            slots = torch.arange(n_prefix, n, device=x.device) % ring
            self.ring_k[:, :, slots], self.ring_v[:, :, slots] = phi_k[:, :, n_prefix:], v[:, :, n_prefix:]
        self.length = n
        return attn.merge(o.to(x.dtype))

    def step(self, attn: KernelizedAttention, x: torch.Tensor) -> torch.Tensor:
        """One new token ``x`` ``(B, 1, d_model)`` at position ``length`` -> ``(B, 1, d_model)``."""
        phi_q, phi_k, v = attn.features(x)
        phi_q, phi_k, v = phi_q[:, :, 0], phi_k[:, :, 0], v[:, :, 0]  # (B, H, M), (B, H, M), (B, H, D)
        p, ring = self.length, self.ring_size
        if ring == 0:
            self.kv += phi_k[..., :, None] * v[..., None, :]
            self.k_sum += phi_k
        else:
            slot = p % ring
            if p >= ring:  # the key leaving the ring (position p - ring, same slot) reaches offset L - 1
                old_k, old_v = self.ring_k[:, :, slot], self.ring_v[:, :, slot]
                self.kv += old_k[..., :, None] * old_v[..., None, :]
                self.k_sum += old_k
            self.ring_k = _grow(self.ring_k, min(p + 1, ring), ring)
            self.ring_v = _grow(self.ring_v, min(p + 1, ring), ring)
            self.ring_k[:, :, slot], self.ring_v[:, :, slot] = phi_k, v
        valid = min(p + 1, ring)
        offsets = (p - torch.arange(valid, device=x.device)) % max(ring, 1)  # offset of each ring slot
        w_ring = self.weights[:, offsets]  # (H or 1, valid)
        w_far = self.weights[:, -1:]  # (H or 1, 1): c(L - 1)
        a = torch.einsum("bhm,bhsm->bhs", phi_q, self.ring_k[:, :, :valid]) * w_ring
        num = torch.einsum("bhs,bhsd->bhd", a, self.ring_v[:, :, :valid])
        num = num + w_far * torch.einsum("bhm,bhmd->bhd", phi_q, self.kv)
        den = a.sum(-1, keepdim=True) + w_far * (phi_q * self.k_sum).sum(-1, keepdim=True)
        self.length = p + 1
        o = num / den.clamp_min(torch.finfo(den.dtype).tiny)
        return attn.merge(o[:, :, None].to(x.dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weights, self.kv, self.k_sum, self.ring_k, self.ring_v) if t is not None]


class SoftmaxLayerCache:
    """KV cache of one :class:`SoftmaxAttention` layer: ``k``, ``v`` ``(B, H, cap, head_dim)``, first
    ``length`` entries valid; the RPE bias of each cached key is looked up from ``table`` per step."""

    def __init__(self, rpe_table: torch.Tensor | None):
        self.table = rpe_table
        self.length = 0
        self.k = self.v = None

    def prefill(self, attn: SoftmaxAttention, x: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.qkv(x)
        n = x.shape[1]
        table = None if self.table is None else self.table[..., : max(1, min(n, self.table.shape[-1]))]
        o = attn.attend(q, k, v, table)
        self.k = _grow(k.new_zeros(*k.shape[:2], 0, k.shape[3]), n)
        self.v = _grow(v.new_zeros(*v.shape[:2], 0, v.shape[3]), n)
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        self.length = n
        return attn.merge(o)

    def step(self, attn: SoftmaxAttention, x: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.qkv(x)  # (B, H, 1, head_dim)
        p = self.length
        self.k, self.v = _grow(self.k, p + 1), _grow(self.v, p + 1)
        self.k[:, :, p:p + 1], self.v[:, :, p:p + 1] = k, v
        self.length = p + 1
        mask = None
        if self.table is not None:
            pos = torch.arange(p + 1, device=x.device)
            mask = relative_bias(self.table, pos[p:], pos).to(q.dtype)  # (H, 1, p + 1) or (1, p + 1)
        o = torch.nn.functional.scaled_dot_product_attention(q, self.k[:, :, :p + 1], self.v[:, :, :p + 1],
                                                             attn_mask=mask)
        return attn.merge(o)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v) if t is not None]


@dataclass
class DecodeCache:
    """Everything ``decode_step`` needs: one cache per layer and the number of tokens consumed so far."""

    layers: list = field(default_factory=list)
    position: int = 0
    batch_size: int = 0

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (allocated capacity, including the grow-by-doubling slack)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


def _check_model(model: Transformer) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"decoding needs an lm.model.Transformer, got {type(model).__name__}")
    if model.training:
        raise ValueError("decoding needs the model in eval mode (dropout would make steps disagree): "
                         "call model.eval() first")


@torch.no_grad()
def prefill(model: Transformer, ids: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, DecodeCache]:
    """Full parallel forward over ``ids`` ``(B, N)`` (``N`` may be 0) -> ``(logits (B, N, V) float32, cache)``.

    The logits equal ``model(ids)``; the cache continues from position ``N``. ``last_only`` returns only the
    last position's logits ``(B, min(N, 1), V)`` (a 64k-token prompt's full logits would take GBs).
    """
    _check_model(model)
    if ids.ndim != 2:
        raise ValueError(f"prefill expects ids of shape (B, N), got {tuple(ids.shape)}")
    tables = [None if t is None else t.detach() for t in model.rpe_tables(None)]
    layers = [SoftmaxLayerCache(t) if isinstance(block.attn, SoftmaxAttention) else KernelizedLayerCache(t)
              for block, t in zip(model.blocks, tables)]
    x = model.embed(ids, 0)
    for block, layer in zip(model.blocks, layers):
        x = block(x, cached_attention=layer.prefill)
    return model.head(x[:, -1:] if last_only else x), DecodeCache(layers, ids.shape[1], ids.shape[0])


@torch.no_grad()
def decode_step(model: Transformer, cache: DecodeCache, ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence, ``ids`` ``(B,)``, at position ``cache.position`` -> logits ``(B, V)`` float32.

    Advances ``cache`` in place. The logits equal ``model(all_ids)[:, -1]`` over every token fed so far.
    """
    _check_model(model)
    if ids.ndim != 1:
        raise ValueError(f"decode_step expects one token per sequence, ids of shape (B,), got {tuple(ids.shape)}")
    if ids.shape[0] != cache.batch_size:
        raise ValueError(f"decode_step got {ids.shape[0]} tokens for a cache of {cache.batch_size} sequences")
    if len(cache.layers) != len(model.blocks):
        raise ValueError(f"cache has {len(cache.layers)} layers but the model has {len(model.blocks)}: "
                         f"build it with prefill(model, ids) for this model")
    x = model.embed(ids[:, None], cache.position)
    for block, layer in zip(model.blocks, cache.layers):
        x = block(x, cached_attention=layer.step)
    cache.position += 1
    return model.head(x)[:, 0]
