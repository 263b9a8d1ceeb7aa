"""What a model keeps between calls when it decodes: one cache per layer, each only holding state. The layers do
the maths (:mod:`lm.model.attention`, through the parallel op and its recurrent step in :mod:`lm.ops`).

- :class:`KernelizedLayerCache`: the op's :class:`lm.ops.RecurrentState` (a ring of the last ``L - 1`` keys plus
  prefix sums): constant size for clipped RPE, whatever the context; a growing ring for general RPE until the
  context exceeds the table.
- :class:`SoftmaxLayerCache`: a KV cache (``O(n D)`` per token) and which cached keys are padding.
- :class:`ModelCache`: the layers' caches and the number of positions consumed (the next token's position).

A cache is empty until its first call (the prefill): then the layer runs the parallel op over the prompt and
keeps the state it hands over; every later call continues from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lm.ops.recurrent import RecurrentState

__all__ = ["KernelizedLayerCache", "SoftmaxLayerCache", "ModelCache"]


@dataclass
class KernelizedLayerCache:
    """State of one kernelized attention layer: None before the prefill, then the op's recurrent state."""

    state: Optional[RecurrentState] = None

    @property
    def empty(self) -> bool:
        return self.state is None

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (e.g. the beams a search continues), in that order."""
        if self.state is not None:
            s = self.state
            rows = rows.to(s.far_kv.device)  # index_select wants the index on the tensor's device
            self.state = s._replace(**{name: getattr(s, name).index_select(0, rows)
                                       for name in ("ring_k", "ring_v", "far_kv", "far_k")})


def _grow(buf: torch.Tensor, needed: int, dim: int) -> torch.Tensor:
    """``buf`` with room for ``needed`` entries along ``dim`` (capacity doubles, at least 16); contents kept."""
    cap = buf.shape[dim]
    if needed <= cap:
        return buf
    shape = list(buf.shape)
    shape[dim] = max(needed, 2 * cap, 16)
    out = buf.new_zeros(shape)
    out.narrow(dim, 0, cap).copy_(buf)
    return out


@dataclass
class SoftmaxLayerCache:
    """KV cache of one softmax attention layer: ``k``, ``v`` ``(B, H, cap, head_dim)`` and ``valid`` ``(B, cap)``
    (False where the key is padding), the first ``length`` entries in use."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    length: int = 0
    padded: bool = False
    """Whether any key so far came with a padding mask (then ``valid`` is applied)."""

    @property
    def empty(self) -> bool:
        return self.k is None

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add ``n`` keys ``k``, ``v`` ``(B, H, n, head_dim)`` with ``valid`` ``(B, n)``; returns every cached key,
        value and validity so far (views of the first ``length`` entries)."""
        n = k.shape[2]
        if self.k is None:
            self.k, self.v = k.new_zeros(*k.shape[:2], 0, k.shape[3]), v.new_zeros(*v.shape[:2], 0, v.shape[3])
            self.valid = valid.new_zeros(valid.shape[0], 0)
        end = self.length + n
        self.k, self.v, self.valid = _grow(self.k, end, 2), _grow(self.v, end, 2), _grow(self.valid, end, 1)
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.valid[:, self.length:end] = valid
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.valid[:, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid) if t is not None)

    def select(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            rows = rows.to(self.k.device)
            self.k, self.v, self.valid = (t.index_select(0, rows) for t in (self.k, self.v, self.valid))


@dataclass
class ModelCache:
    """One cache per layer and ``position``, the number of positions consumed so far (padding included): the
    position of the next token. Build it with :meth:`lm.model.Transformer.new_cache`."""

    layers: list = field(default_factory=list)
    position: int = 0
    batch_size: int = 0
    padded: bool = False
    """Set by a caller whose first call had padding (a left-padded prompt), so that later calls keep masking."""

    @property
    def empty(self) -> bool:
        return self.position == 0

    def nbytes(self) -> int:
        """Bytes held by the layers' tensors (allocated capacity, including the grow-by-doubling slack)."""
        return sum(layer.nbytes() for layer in self.layers)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` of every layer (``rows`` (B',) long), e.g. to reorder beams."""
        for layer in self.layers:
            layer.select(rows)
        self.batch_size = int(rows.shape[0])
