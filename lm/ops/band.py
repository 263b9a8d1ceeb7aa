"""Exact band + prefix-sum form of causal Toeplitz mixing, and its exact gradients.

``Y_i = sum_{j<=i} c(min(i-j, L-1)) (q_i . k_j) u_j`` with ``u = [v, 1]`` (``E = D + 1`` columns, so the
normaliser comes out of the same pass as the numerator). Offsets ``< L - 1`` are summed exactly over a band of
key blocks; all keys at offset ``>= L - 1`` share the weight ``c[L-1]`` and enter through a running prefix sum of
``k^T u`` over whole blocks. ``L = 1`` (``c`` of shape ``(H, 1)``) is plain causal linear attention.

Layout: sequences are cut into blocks of ``T`` rows and stored block-major, ``(blocks, B, H, T, C)``, so that a
run of blocks is one contiguous ``(G * B * H, T, C)`` batch of matrices. Query block ``g`` meets key blocks
``g, g-1, ..., g-(nw-1)`` ("pieces" ``j = 0..nw-1``) with the block-independent weights ``C_j (H, T, T)``; keys
in blocks ``<= g - nw`` are all at offset ``>= L - 1``. Every kernel is batched over batch, heads and a group of
``G`` blocks (the group is sized by a memory budget), so the op count does not depend on ``B * H`` until the
budget is reached.

Plain tensor code without autograd (``kernelized.py`` wraps it); no host reads, no value-dependent branches.
"""
from __future__ import annotations

import torch

__all__ = ["BLOCK", "BandLayout", "band_forward", "band_backward", "band_budget", "window_blocks"]

BLOCK = 64
"""Rows per block ``T``. Per position the band costs ``(nw * T) (M + E)`` with ``nw * T ~ L + T``, so small
blocks waste less of their window; very small ones make the batched matmuls inefficient."""

BAND_WORKSPACE_CPU = 2**21
"""Elements of one score piece ``(G, B, H, T, T)`` on CPU: 8 MiB in float32, so the few pieces of a step stay
in the last-level cache."""
BAND_WORKSPACE_BATCHED = 2**26
"""The same on GPUs (and ``meta``): 256 MiB in float32, about 1 GiB for the four pieces live in backward, so
a step is a few large kernels."""


def window_blocks(num_weights: int, block: int) -> int:
    """Key blocks ``nw`` a query block meets as dense pieces for an RPE table of ``num_weights`` entries: every key
    before them is at offset ``>= num_weights - 1`` (``(nw - 1) T + 1 >= L - 1``). The fused kernels use it too."""
    return 1 + max(0, -(-(num_weights - 2) // block))


def band_budget(device: torch.device) -> int:
    """Elements of one score piece for ``device`` (see the two constants above)."""
    return BAND_WORKSPACE_CPU if device.type == "cpu" else BAND_WORKSPACE_BATCHED


class BandLayout:
    """Block structure for ``n`` positions and ``L`` weights: ``T`` rows per block, ``nb`` query blocks, ``nw``
    key pieces per query block, and for every piece the offset of each (row, column) pair."""

    def __init__(self, n: int, num_weights: int, device, block: int = BLOCK):
        self.n, self.L, self.T = n, num_weights, block
        self.nb = -(-n // block)
        self.nw = window_blocks(num_weights, block)
        a = torch.arange(block, device=device)
        j = torch.arange(self.nw, device=device)
        offset = j[:, None, None] * block + a[None, :, None] - a[None, None, :]  # (nw, T, T)
        self.causal = offset >= 0
        self.offset_index = offset.clamp(0, num_weights - 1)

    def weights(self, c: torch.Tensor) -> torch.Tensor:
        """``c`` ``(H, L)`` -> ``(nw, H, T, T)`` weights of each piece (0 above the diagonal of piece 0)."""
        w = c[:, self.offset_index]  # (H, nw, T, T)
        return torch.where(self.causal, w, torch.zeros((), dtype=c.dtype, device=c.device)).transpose(0, 1)

    def fold_weight_grad(self, dw: torch.Tensor) -> torch.Tensor:
        """Gradient ``(nw, H, T, T)`` of :meth:`weights` -> gradient ``(H, L)`` of ``c``: sums along the diagonals
        (a fixed-order reduction, so deterministic on every device; no scatter)."""
        nw, H, T, _ = dw.shape
        # Skew: with columns flipped and each row padded by T, row a of the flat array read with stride 2T - 1
        # lines diagonal d = a - w up in column d + T - 1.
        x = torch.nn.functional.pad(dw.flip(-1), (0, T)).flatten(-2)[..., : T * (2 * T - 1)]
        diag = x.view(nw, H, T, 2 * T - 1).sum(-2)  # (nw, H, 2T - 1): offsets j T + d, d = -(T-1)..T-1
        # Piece j covers offsets jT - (T-1) .. jT + T - 1: its lower half tiles [jT - (T-1), jT], the upper half
        # overlaps the next piece's lower half.
        lower = diag[..., :T]  # offsets jT - (T-1) .. jT
        upper = torch.nn.functional.pad(diag[..., T:], (0, 1))  # offsets jT + 1 .. jT + T (last is padding)
        lin = (lower.transpose(0, 1).flatten(1)
               + torch.nn.functional.pad(upper.transpose(0, 1).flatten(1), (T, 0))[:, : nw * T])
        lin = lin[:, T - 1:]  # offsets 0 .. nw T - T: the acausal part of piece 0 is dropped
        tail = upper[-1, :, : T - 1]  # offsets (nw - 1) T + 1 .. nw T - 1
        lin = torch.cat([lin, tail], dim=-1)  # (H, nw T): offsets 0 .. nw T - 1
        L = self.L
        return torch.cat([lin[:, : L - 1], lin[:, L - 1:].sum(-1, keepdim=True)], dim=-1)

    def blocks(self, x: torch.Tensor, front: int = 0, ones_column: bool = False) -> torch.Tensor:
        """``(B, H, N, C)`` -> block-major ``(front + nb, B, H, T, C (+1))``: ``front`` zero blocks, zero rows
        after ``N``; with ``ones_column`` a column of ones on the ``N`` real rows (``u = [v, 1]``)."""
        B, H, N, C = x.shape
        T, nb = self.T, self.nb
        out = torch.empty(front + nb, B, H, T, C + int(ones_column), dtype=x.dtype, device=x.device)
        out[:front].zero_()
        tail = nb * T - N
        body = torch.nn.functional.pad(x, (0, 0, 0, tail)) if tail else x
        out[front:, ..., :C].copy_(body.unflatten(2, (nb, T)).permute(2, 0, 1, 3, 4))
        if ones_column:
            out[front:, ..., C].fill_(1)
            out[front + nb - 1, :, :, T - tail:, C].zero_()
        return out

    def unblock(self, xb: torch.Tensor, front: int = 0) -> torch.Tensor:
        """Inverse of :meth:`blocks` for the ``N`` real rows: ``(front + nb, B, H, T, C)`` -> ``(B, H, N, C)``."""
        rows = xb.permute(1, 2, 0, 3, 4).flatten(2, 3)
        return rows[:, :, front * self.T: front * self.T + self.n]

    def group(self, batch_heads: int, budget: int) -> int:
        """Query blocks per group so that one score piece ``(G, B, H, T, T)`` holds at most ``budget`` numbers."""
        return max(1, min(self.nb, budget // max(1, batch_heads * self.T * self.T)))


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(G, B, H, R, C)`` -> ``(G * B * H, R, C)`` (a view: block-major runs are contiguous)."""
    return x.flatten(0, 2)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[i] = sum_{j<i} x[j]`` along ``dim``, summing only earlier entries (``cumsum - x`` would cancel
    catastrophically when later entries are large, leaking the future into round-off)."""
    out = torch.zeros_like(x)
    n = x.shape[dim]
    if n > 1:
        out.narrow(dim, 1, n - 1).copy_(x.narrow(dim, 0, n - 1).cumsum(dim))
    return out


def _far_states(kb: torch.Tensor, ub: torch.Tensor, lay: BandLayout) -> torch.Tensor:
    """Prefix state of each query block: ``sum`` of ``k_p^T u_p`` over key blocks ``p <= g - nw``:
    ``(nb, B, H, M, E)`` from padded key blocks (``nw - 1`` zero blocks in front)."""
    z = kb[: lay.nb].transpose(-1, -2) @ ub[: lay.nb]  # padded block i holds real block i - (nw - 1)
    return _exclusive_cumsum(z, dim=0)


def band_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, budget: int,
                 block: int = BLOCK, starts: torch.Tensor | None = None, init: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``Y (B, H, N, E)`` for weights ``c (H, L)``, computed in ``q``'s dtype; cost ``O(B H N (L + T) (M + E))``.

    ``budget``: elements of one score piece (:func:`band_budget`). ``starts`` ``(B, N)``: each token's document
    start (:mod:`lm.ops.documents`), or None. ``init`` ``(B, H, M, E)``: sums ``k^T [v, 1]`` of keys before the
    sequence, all at offset ``>= L - 1`` (weight ``c[L-1]`` for every row), or None."""
    B, H, N, M = q.shape
    lay = BandLayout(N, c.shape[-1], q.device, block)
    nw, nb = lay.nw, lay.nb
    cw = lay.weights(c)[:, None, None]  # (nw, 1, 1, H, T, T)
    qb = lay.blocks(q)
    kb, ub = lay.blocks(k, front=nw - 1), lay.blocks(v, front=nw - 1, ones_column=True)
    docs = None if starts is None else _Documents(starts, lay)
    if docs is None:
        states = _far_states(kb, ub, lay)
    else:
        states = docs.far_states(kb, ub)
        qb_far = qb * docs.far_rows.to(q.dtype)
    if init is not None:
        states = states + init
    states.mul_(c[:, -1, None, None])  # c[L-1] folded in: (nb, B, H, M, E)
    y = torch.empty(nb, B, H, lay.T, ub.shape[-1], dtype=q.dtype, device=q.device)
    step = lay.group(B * H, budget)
    for s0 in range(0, nb, step):
        s1 = min(nb, s0 + step)
        qg, yg = _flat(qb[s0:s1]), _flat(y[s0:s1])
        torch.bmm(qg if docs is None else _flat(qb_far[s0:s1]), _flat(states[s0:s1]), out=yg)
        for j in range(nw):
            key = slice(s0 + nw - 1 - j, s1 + nw - 1 - j)
            w = torch.bmm(qg, _flat(kb[key]).transpose(1, 2))
            w5 = w.view(s1 - s0, B, H, lay.T, lay.T).mul_(cw[j])
            if docs is not None:
                w5.mul_(docs.near_mask(s0, s1, j).to(w5.dtype))
            yg.baddbmm_(w, _flat(ub[key]))
    return lay.unblock(y)


def band_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, g: torch.Tensor,
                  budget: int, need_dc: bool = True, block: int = BLOCK, starts: torch.Tensor | None = None,
                  init: torch.Tensor | None = None):
    """Gradients ``(dq, dk, dv, dc, dinit)`` of ``sum(g * Y)`` with ``Y = band_forward(q, k, v, c, starts=starts,
    init=init)``, ``g (B, H, N, E)``.

    Recomputes the scores group by group. dq, dk ``(B, H, N, M)``, dv ``(B, H, N, D)``, dc ``(H, L)`` (None
    unless ``need_dc``), dinit ``(B, H, M, E)`` (None without ``init``), in ``q``'s dtype."""
    B, H, N, M = q.shape
    lay = BandLayout(N, c.shape[-1], q.device, block)
    nw, nb, T = lay.nw, lay.nb, lay.T
    cw = lay.weights(c)[:, None, None]
    c_far = c[:, -1, None, None]  # (H, 1, 1)
    qb, gb = lay.blocks(q), lay.blocks(g)
    kb, ub = lay.blocks(k, front=nw - 1), lay.blocks(v, front=nw - 1, ones_column=True)
    docs = None if starts is None else _Documents(starts, lay)
    states = _far_states(kb, ub, lay) if docs is None else docs.far_states(kb, ub)  # without c[L-1]
    if init is not None:
        states = states + init
    gb_far = gb if docs is None else gb * docs.far_rows.to(g.dtype)  # the far field reaches only these rows
    dqb = torch.empty_like(qb)
    dkb, dub = torch.zeros_like(kb), torch.zeros_like(ub)
    dcw = torch.zeros(nw, H, T, T, dtype=q.dtype, device=q.device) if need_dc else None
    step = lay.group(B * H, budget)
    for s0 in range(0, nb, step):
        s1, G = min(nb, s0 + step), min(nb, s0 + step) - s0
        qg, gg, dqg = _flat(qb[s0:s1]), _flat(gb[s0:s1]), _flat(dqb[s0:s1])
        torch.bmm(_flat(gb_far[s0:s1]), _flat(states[s0:s1] * c_far).transpose(1, 2), out=dqg)
        for j in range(nw):
            key = slice(s0 + nw - 1 - j, s1 + nw - 1 - j)
            kj, uj = _flat(kb[key]), _flat(ub[key])
            a = torch.bmm(qg, kj.transpose(1, 2))  # scores (G B H, T, T)
            dw = torch.bmm(gg, uj.transpose(1, 2))  # d(weighted scores)
            a5, dw5 = a.view(G, B, H, T, T), dw.view(G, B, H, T, T)
            if docs is not None:
                mask = docs.near_mask(s0, s1, j).to(a5.dtype)
                a5.mul_(mask)
                dw5.mul_(mask)
            if need_dc:
                dcw[j] += (dw5 * a5).sum((0, 1))
            a5.mul_(cw[j])
            dw5.mul_(cw[j])
            dqg.baddbmm_(dw, kj)
            _flat(dkb[key]).baddbmm_(dw.transpose(1, 2), qg)
            _flat(dub[key]).baddbmm_(a.transpose(1, 2), gg)
    # Far field: d(state_g) = c[L-1] q_g^T g_g; padded key block i feeds the states of query blocks g > i.
    dstate = qb.transpose(-1, -2) @ gb_far  # (nb, B, H, M, E), without c[L-1]
    dc_far = (dstate * states).sum((0, 1, 3, 4)) if need_dc else None
    dinit = None if init is None else dstate.sum(0) * c_far  # every query block reads the initial sums
    if docs is None:
        dz = _exclusive_cumsum(dstate.flip(0), dim=0).flip(0).mul_(c_far)  # dz[i] = c sum_{g > i} dstate[g]
        dkb[:nb] += ub[:nb] @ dz.transpose(-1, -2)
        dub[:nb] += kb[:nb] @ dz
    else:
        docs.far_states_backward(kb, ub, dstate.mul_(c_far), dkb, dub)
    dc = None
    if need_dc:
        dc = lay.fold_weight_grad(dcw)
        dc[:, -1] += dc_far
    front = nw - 1
    return lay.unblock(dqb), lay.unblock(dkb, front), lay.unblock(dub, front)[..., :-1], dc, dinit


def _segmented_cumsum(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inclusive ``S_p = z_p + keep_p S_{p-1}`` along dim 0: ``z`` ``(P, B, ...)``, ``keep`` ``(P, B)`` bool (False:
    a new segment starts at ``p``). Hillis-Steele in ``log2 P`` steps; only additions of the terms themselves, so
    no cancellation (``cumsum`` minus the sum before the segment would cancel)."""
    a = keep.to(z.dtype).reshape(keep.shape + (1,) * (z.dim() - keep.dim()))
    s, d, n = z, 1, z.shape[0]
    while d < n:
        s = torch.cat([s[:d], s[d:] + a[d:] * s[:-d]])
        a = torch.cat([a[:d], a[d:] * a[:-d]])
        d *= 2
    return s


class _Documents:
    """Document boundaries in the block layout (``starts`` ``(B, N)``: each token's document start).

    Near band: key ``j`` counts for query ``i`` only if ``j >= starts[i]``. Far field: a key block ``p`` *resets*
    when a document starts inside it (then its last key's start is ``>= p T``); its *tail* are its keys from that
    start on (all of them when it does not reset). The state before query block ``g``'s window is the segmented
    sum ``S_{g - nw}`` (``S_p = tail_p + [p does not reset] S_{p-1}``), which holds exactly the keys from the start
    of the document of every row whose own start is ``<= `` the end of block ``g - nw``: those rows take it, the
    others (documents starting later, inside the window) take none."""

    def __init__(self, starts: torch.Tensor, lay: BandLayout):
        T, nb, n = lay.T, lay.nb, lay.n
        self.lay = lay
        B = starts.shape[0]
        pos = torch.arange(nb * T, device=starts.device).view(nb, T)  # block-major positions
        padded = torch.nn.functional.pad(starts, (0, nb * T - n)) if nb * T > n else starts
        self.row_starts = padded.view(B, nb, T).transpose(0, 1)  # (nb, B, T); rows past N: 0 (discarded)
        self.key_pos = pos  # (nb, T) positions of real key block p
        last = starts[:, (pos[:, -1]).clamp(max=n - 1)].T  # (nb, B): start of each block's last key
        self.keep = last < pos[:, :1]  # no document starts inside block p
        self.tail = (pos[:, None, :] >= last[:, :, None])  # (nb, B, T)
        first = torch.arange(nb, device=starts.device)
        reach = ((first - lay.nw + 1) * T)[:, None, None]  # end of block g - nw, plus one
        self.far_rows = (self.row_starts < reach)[:, :, None, :, None]  # (nb, B, 1, T, 1) bool

    def near_mask(self, g0: int, g1: int, j: int) -> torch.Tensor:
        """``(G, B, 1, T, T)`` 0/1 mask of piece ``j`` for query blocks ``g0 .. g1 - 1`` (keys of block ``g - j``)."""
        T = self.lay.T
        kpos = (torch.arange(g0, g1, device=self.key_pos.device) - j)[:, None] * T + self.key_pos[0]  # (G, T)
        return (kpos[:, None, None, :] >= self.row_starts[g0:g1, :, :, None])[:, :, None]

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        """Key blocks of a padded block-major tensor, ``(nb, B, H, T, C)`` (a view)."""
        return x[self.lay.nw - 1: self.lay.nw - 1 + self.lay.nb]

    def far_states(self, kb: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
        """``(nb, B, H, M, E)``: the far state of each query block (without ``c[L-1]``)."""
        tail = self.tail[:, :, None, :, None].to(kb.dtype)
        z = (self._real(kb) * tail).transpose(-1, -2) @ self._real(ub)
        s = _segmented_cumsum(z, self.keep)
        nw = self.lay.nw
        return torch.cat([torch.zeros_like(s[:nw]), s[: max(0, s.shape[0] - nw)]])[: s.shape[0]]

    def far_states_backward(self, kb, ub, dstate, dkb, dub) -> None:
        """Add to ``dkb``, ``dub`` the gradient through :meth:`far_states` of ``dstate`` (its gradient)."""
        nw, nb = self.lay.nw, self.lay.nb
        ds = torch.cat([dstate[nw:], torch.zeros_like(dstate[: min(nw, nb)])])[:nb]  # d S_p = d state_{p + nw}
        keep_next = torch.cat([self.keep[1:], torch.zeros_like(self.keep[:1])])  # G_p = dS_p + keep_{p+1} G_{p+1}
        dz = _segmented_cumsum(ds.flip(0), keep_next.flip(0)).flip(0)
        tail = self.tail[:, :, None, :, None].to(kb.dtype)
        self._real(dkb).add_(tail * (self._real(ub) @ dz.transpose(-1, -2)))
        self._real(dub).add_(tail * (self._real(kb) @ dz))
