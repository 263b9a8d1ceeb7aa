"""The recurrent form of causal kernelized attention with RPE, beside the parallel one (:mod:`lm.ops.kernelized`):
the state after a prefix of tokens, and one step of it. Decoding runs on these; prefill gets its state from the
parallel op (``kernelized_attention(..., output_final_state=True)``).

With ``c(t) = exp(b[min(t, L-1)])`` constant for ``t >= L - 1``, query ``t`` sees two kinds of keys:

- **near**: the ``R = L - 1`` most recent keys, positions ``t-R+1 .. t``, each with its own weight ``c(t - p)``;
- **far**: every key at offset ``>= L - 1`` (positions ``<= t - R``), all with the weight ``c(L-1)``: only their
  sums ``sum_p phi_k_p (x) v_p`` and ``sum_p phi_k_p`` matter.

So the state after ``n`` tokens is a ring of the last ``R`` keys' features and values (position ``p`` in slot
``p % R``), the two far sums over positions ``<= n - 1 - R``, and ``n``: ``O(B H (R (M + D) + M D))`` numbers,
whatever ``n``. Without RPE ``L = 1``: no ring, and the far sums are plain linear attention's state. A table as
long as the context (general RPE) makes the ring as long as the context, so its slots are allocated as they fill
(capacity doubling, capped at ``R``). Slots not written yet hold zero features: they add nothing to numerator or
normaliser, so no mask is needed.

Keys with zero features contribute nothing at all, which is how a caller masks padding: zero ``phi_k`` (and
``v``) of pad positions before calling. Every function here is pure (returns a new state, never mutates one),
reads no tensor values on the host, and keeps shapes that depend only on ``n`` and the shapes of its inputs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from lm.ops.feature_maps import no_autocast

__all__ = ["RecurrentState", "initial_state", "state_after", "graphable", "kernelized_attention_step",
           "MIN_RING_CAPACITY"]

MIN_RING_CAPACITY = 16
"""Ring slots allocated at least (while fewer than ``R`` are needed), so short prompts do not regrow every step."""


class RecurrentState(NamedTuple):
    """Causal kernelized attention's state after ``position`` tokens (see the module docstring).

    ``ring_k`` ``(B, H, C, M)`` and ``ring_v`` ``(B, H, C, D)``: features and values of the last ``window`` keys,
    position ``p`` in slot ``p % window``, ``C <= window`` slots allocated (``C = 0`` when ``window = 0``);
    ``far_kv`` ``(B, H, M, D)`` and ``far_k`` ``(B, H, M)``: sums over the keys at offset ``>= window`` from the
    next query, i.e. positions ``<= position - 1 - window``. All in the compute dtype (float32, or float64).
    """

    position: int
    window: int
    ring_k: torch.Tensor
    ring_v: torch.Tensor
    far_kv: torch.Tensor
    far_k: torch.Tensor
    step: Optional[torch.Tensor] = None
    """For a state made by :func:`graphable`: ``position`` as a 0-dim long tensor on the state's device. A step then
    reads it there and advances the state in place, so every position runs the same kernels with the same
    arguments (one step can be captured in a CUDA graph and replayed); ``position`` stays the host's count."""

    def nbytes(self) -> int:
        """Bytes held (allocated ring capacity included)."""
        return sum(t.numel() * t.element_size() for t in (self.ring_k, self.ring_v, self.far_kv, self.far_k))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _capacity(needed: int, window: int) -> int:
    """Ring slots to allocate for ``needed`` filled slots: at least ``MIN_RING_CAPACITY``, at most ``window``."""
    return min(window, max(needed, MIN_RING_CAPACITY))


def initial_state(batch: int, heads: int, num_features: int, head_dim: int, table_len: int = 1,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> RecurrentState:
    """The state before any token, for an RPE table of ``table_len`` entries (1 without RPE)."""
    window = max(table_len - 1, 0)
    cap = _capacity(0, window)
    z = torch.zeros
    return RecurrentState(0, window, z(batch, heads, cap, num_features, dtype=dtype, device=device),
                          z(batch, heads, cap, head_dim, dtype=dtype, device=device),
                          z(batch, heads, num_features, head_dim, dtype=dtype, device=device),
                          z(batch, heads, num_features, dtype=dtype, device=device))


def state_after(phi_k: torch.Tensor, v: torch.Tensor, table_len: int = 1) -> RecurrentState:
    """The state after the ``N`` tokens of ``phi_k`` ``(B, H, N, M)`` and ``v`` ``(B, H, N, D)`` (``N >= 0``), for
    an RPE table of ``table_len`` entries (1 without RPE): what :func:`kernelized_attention_step` continues from."""
    if phi_k.dim() != 4 or v.dim() != 4 or phi_k.shape[:3] != v.shape[:3]:
        raise ValueError(f"state_after: phi_k (B, H, N, M) and v (B, H, N, D) must agree, got {tuple(phi_k.shape)} "
                         f"and {tuple(v.shape)}")
    if table_len < 1:
        raise ValueError(f"state_after: table_len={table_len} must be >= 1 (1 without RPE)")
    B, H, n, M = phi_k.shape
    D = v.shape[-1]
    dtype = _compute_dtype(phi_k, v)
    with no_autocast(v.device):
        k, val = phi_k.to(dtype), v.to(dtype)
        window = table_len - 1
        n_far = max(0, n - window)  # positions 0 .. n - 1 - window are at offset >= window from query n
        far_kv = torch.einsum("bhnm,bhnd->bhmd", k[:, :, :n_far], val[:, :, :n_far])
        far_k = k[:, :, :n_far].sum(2)
        cap = _capacity(min(n, window), window)
        ring_k = k.new_zeros(B, H, cap, M)
        ring_v = val.new_zeros(B, H, cap, D)
        if window and n > n_far:
            slots = torch.arange(n_far, n, device=v.device) % window  # distinct: at most `window` positions
            ring_k = ring_k.index_copy(2, slots, k[:, :, n_far:])
            ring_v = ring_v.index_copy(2, slots, val[:, :, n_far:])
    return RecurrentState(n, window, ring_k, ring_v, far_kv, far_k)


def graphable(state: RecurrentState) -> RecurrentState:
    """``state`` with its ring allocated whole and its position also on the device (:attr:`RecurrentState.step`):
    steps from it advance it in place and launch the same kernels at every position, so a decoding step can be
    captured in a CUDA graph once and replayed (the ring's ``window`` slots are then held from the start)."""
    R = state.window
    pad = R - state.ring_k.shape[2]
    ring_k, ring_v = state.ring_k, state.ring_v
    if pad:
        ring_k = torch.nn.functional.pad(ring_k, (0, 0, 0, pad))
        ring_v = torch.nn.functional.pad(ring_v, (0, 0, 0, pad))
    step = torch.full((), state.position, dtype=torch.long, device=state.far_kv.device)
    return state._replace(ring_k=ring_k.clone(), ring_v=ring_v.clone(), far_kv=state.far_kv.clone(),
                          far_k=state.far_k.clone(), step=step)


def _step_on_device(q, k, val, state: RecurrentState, weights, w_far):
    """:func:`kernelized_attention_step` for a :func:`graphable` state: the slot, the evicted key and the offsets
    from the device position; the ring, far sums and position updated in place. No host value depends on the
    position (an unfilled slot holds zero features, so evicting it adds nothing)."""
    R = state.window
    far_kv, far_k, ring_k, ring_v, t = state.far_kv, state.far_k, state.ring_k, state.ring_v, state.step
    if R == 0:
        far_kv.add_(k[..., :, None] * val[..., None, :])
        far_k.add_(k)
        num = w_far * torch.einsum("bhm,bhmd->bhd", q, far_kv)
        den = w_far[:, 0] * (q * far_k).sum(-1)
    else:
        slot = torch.remainder(t, R).view(1)
        old_k, old_v = ring_k.index_select(2, slot)[:, :, 0], ring_v.index_select(2, slot)[:, :, 0]
        far_kv.add_(old_k[..., :, None] * old_v[..., None, :])  # the key at offset R joins the far sums
        far_k.add_(old_k)
        ring_k.index_copy_(2, slot, k[:, :, None])
        ring_v.index_copy_(2, slot, val[:, :, None])
        offsets = torch.remainder(t - torch.arange(R, device=t.device), R)  # of each slot's key from query t
        a = torch.einsum("bhm,bhsm->bhs", q, ring_k) * weights[:, offsets]
        num = torch.einsum("bhs,bhsd->bhd", a, ring_v) + w_far * torch.einsum("bhm,bhmd->bhd", q, far_kv)
        den = a.sum(-1) + w_far[:, 0] * (q * far_k).sum(-1)
    t.add_(1)
    out = num / den.clamp_min(torch.finfo(num.dtype).tiny)[..., None]
    return out, state._replace(position=state.position + 1)


def kernelized_attention_step(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: RecurrentState,
                              rpe_bias: torch.Tensor | None = None, *, in_place: bool = False
                              ) -> tuple[torch.Tensor, RecurrentState]:
    """One token of causal kernelized attention: the output at position ``state.position`` and the state after it.

    phi_q, phi_k: ``(B, H, M)`` non-negative features of the new token; v: ``(B, H, D)``; rpe_bias: ``None``,
    ``(H, L)`` or ``(L,)``, the whole table (``L`` must be the table length the state was built for). Returns
    ``(out (B, H, D) in v's dtype, new state)``; ``out`` equals row ``state.position`` of
    ``kernelized_attention`` over every token so far.

    ``in_place``: write the new key into the ring of ``state`` itself (the returned state shares it) instead of
    a copy, so that a decoding loop that owns its state does not copy ``R (M + D)`` numbers per token; the given
    ``state`` must not be used again. Without it the function is pure. A :func:`graphable` state is always
    advanced in place (that is what lets a CUDA graph replay the step).
    """
    L = 1 if rpe_bias is None else rpe_bias.shape[-1]
    if L - 1 != state.window:
        raise ValueError(f"kernelized_attention_step: the state was built for an RPE table of {state.window + 1} "
                         f"entries, rpe_bias has {L}")
    if phi_q.dim() != 3 or phi_k.shape != phi_q.shape or v.dim() != 3 or v.shape[:2] != phi_q.shape[:2]:
        raise ValueError(f"kernelized_attention_step: one token per sequence, phi_q and phi_k (B, H, M), v (B, H, D); "
                         f"got {tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}")
    dtype = state.far_kv.dtype
    t, R = state.position, state.window
    with no_autocast(v.device):
        q, k, val = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
        if rpe_bias is None:
            weights = torch.ones(1, 1, dtype=dtype, device=v.device)
        else:
            b = rpe_bias.to(dtype).reshape(-1, L)  # (H or 1, L)
            weights = torch.exp(b - b.amax(-1, keepdim=True))  # the max cancels between numerator and normaliser
        w_far = weights[:, -1:]  # c(L - 1): (H or 1, 1), broadcasts against (B, H, D)
        if state.step is not None:
            out, new = _step_on_device(q, k, val, state, weights, w_far)
            return out.to(v.dtype), new
        far_kv, far_k, ring_k, ring_v = state.far_kv, state.far_k, state.ring_k, state.ring_v
        if R == 0:
            far_kv = far_kv + k[..., :, None] * val[..., None, :]
            far_k = far_k + k
            num = w_far * torch.einsum("bhm,bhmd->bhd", q, far_kv)
            den = w_far[:, 0] * (q * far_k).sum(-1)
        else:
            slot = t % R
            if t >= R:  # the key in this slot (position t - R) reaches offset R = L - 1: it joins the far sums
                old_k, old_v = ring_k[:, :, slot], ring_v[:, :, slot]
                far_kv = far_kv + old_k[..., :, None] * old_v[..., None, :]
                far_k = far_k + old_k
            cap = ring_k.shape[2]
            if slot >= cap:  # still filling a long ring: double its allocation
                grow = min(R, max(2 * cap, slot + 1, MIN_RING_CAPACITY)) - cap
                ring_k = torch.nn.functional.pad(ring_k, (0, 0, 0, grow))
                ring_v = torch.nn.functional.pad(ring_v, (0, 0, 0, grow))
            if in_place or slot >= cap:  # a grown ring is already a new tensor
                ring_k[:, :, slot], ring_v[:, :, slot] = k, val
            else:
                index = torch.tensor([slot], device=v.device)
                ring_k = ring_k.index_copy(2, index, k[:, :, None])
                ring_v = ring_v.index_copy(2, index, val[:, :, None])
            offsets = (t - torch.arange(ring_k.shape[2], device=v.device)) % R  # of each slot's key from query t
            a = torch.einsum("bhm,bhsm->bhs", q, ring_k) * weights[:, offsets]
            num = torch.einsum("bhs,bhsd->bhd", a, ring_v) + w_far * torch.einsum("bhm,bhmd->bhd", q, far_kv)
            den = a.sum(-1) + w_far[:, 0] * (q * far_k).sum(-1)
        # only an all-underflowed normaliser needs the floor, and then the numerator is 0 too
        out = num / den.clamp_min(torch.finfo(dtype).tiny)[..., None]
    return out.to(v.dtype), RecurrentState(t + 1, R, ring_k, ring_v, far_kv, far_k)
