"""Document boundaries for the op: packed sequences whose documents do not attend across each other.

Two ways to say where documents start, both without reading tensor values on the host:

- ``cu_seqlens`` ``(S + 1,)`` int: flash-linear-attention's convention for a packed batch of ``B = 1``: sequence
  ``s`` holds positions ``cu_seqlens[s] .. cu_seqlens[s + 1] - 1``, ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = N``
  (empty sequences allowed, so a fixed-length tensor padded with repeats of ``N`` is valid);
- ``document_starts`` ``(B, N)`` int: for each token, the position (in its row) of its document's first token.
  Fixed shape whatever the number of documents, so a training step with document masks compiles once.

The op works on the second; :func:`starts_from_cu_seqlens` converts. Token ``i`` attends to keys ``j`` with
``document_starts[b, i] <= j <= i``; RPE offsets stay ``i - j`` (the distance inside the document).
"""
from __future__ import annotations

import torch

__all__ = ["starts_from_cu_seqlens", "document_mask", "check_document_starts"]


def starts_from_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """``cu_seqlens`` ``(S + 1,)`` offsets of a packed row of ``n`` tokens -> ``document_starts`` ``(1, n)`` long."""
    cu = cu_seqlens.to(torch.long)
    pos = torch.arange(n, device=cu.device)
    seq = torch.searchsorted(cu, pos, right=True) - 1  # the sequence of each position (empty ones skipped)
    return cu[seq.clamp(0, cu.shape[0] - 1)][None]


def document_mask(starts: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``(B, Nq, Nk)`` bool: key ``k_pos[j]`` is in the document of query ``q_pos[i]`` or a later one (with the
    causal mask this is "same document"). ``starts`` ``(B, N)`` indexed by ``q_pos``."""
    return k_pos[None, None, :] >= starts[:, q_pos, None]


def check_document_starts(cu_seqlens: torch.Tensor | None, document_starts: torch.Tensor | None, B: int, N: int,
                          device: torch.device) -> torch.Tensor | None:
    """Validate shapes and dtypes (never values: that would read the device) and return ``(B, N)`` long starts
    or None."""
    if cu_seqlens is not None and document_starts is not None:
        raise ValueError("give cu_seqlens or document_starts, not both (document_starts is the (B, N) form)")
    integer = (torch.int32, torch.int64)
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in integer \
                or cu_seqlens.shape[0] < 2:
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of sequence offsets [0, ..., N] "
                             f"(flash-linear-attention's convention), got {_describe(cu_seqlens)}")
        if B != 1:
            raise ValueError(f"cu_seqlens describes one packed row: pack the batch into B = 1 (got B = {B}), or "
                             "pass document_starts of shape (B, N)")
        if cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but v is on {device}; put it on v's device")
        return starts_from_cu_seqlens(cu_seqlens, N)
    if document_starts is None:
        return None
    if not isinstance(document_starts, torch.Tensor) or document_starts.dtype not in integer \
            or tuple(document_starts.shape) != (B, N):
        raise ValueError(f"document_starts must be an int32/int64 tensor of shape (B, N) = ({B}, {N}), got "
                         f"{_describe(document_starts)}")
    if document_starts.device != device:
        raise ValueError(f"document_starts is on {document_starts.device} but v is on {device}; put it on v's "
                         "device")
    return document_starts.to(torch.long)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} of shape {tuple(x.shape)}"
    return type(x).__name__
