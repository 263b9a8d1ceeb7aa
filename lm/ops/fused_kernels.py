"""Triton kernels of the fused chunk form (:mod:`lm.ops.fused` launches them; import this module lazily).

Per (batch, head) the sequence is cut into blocks of ``BT`` rows. Query block ``g`` meets key blocks ``g - j``,
``j < NW``, as dense ``BT x BT`` tiles weighted by ``c(min(offset, L-1))`` (the exact band; ``NW`` covers every
offset ``< L - 1``), and every older key through the far state ``S_{g - NW}`` (sums of ``k^T v`` and ``k`` over key
blocks ``<= g - NW``), which carries the one weight ``c[L-1]``. General RPE (``L >= N``) makes ``NW`` the number of
blocks (no far field); no RPE makes ``NW = 1`` (plain chunked linear attention).

Far states are stored with an offset of one: entry 0 is the initial state (zeros, or a recurrent state's far sums),
entry ``p + 1`` the state after key block ``p``; query block ``g`` reads entry ``max(g - NW + 1, 0)``. With document
boundaries (``starts``: each token's document start) a key block whose last key's document starts inside it resets
the running sum, which then holds only its keys from that start on; a query row takes the far state only when its
own document starts at or before the end of block ``g - NW`` (then the state's segment starts exactly there).

Kernels (grid in brackets; every one batched over batch and heads, none loops in Python):

- ``far_states`` ``(B H,)``: the running far state, sequential over key blocks.
- ``forward`` ``(blocks, B H)``: output and normaliser of one query block.
- ``backward_delta`` ``(blocks, B H)``: the normaliser's gradient ``-(d out . out) / den`` per row (the numerator's,
  ``d out / den``, is formed where it is used, from ``d out`` and ``den``).
- ``far_states_backward`` ``(B H,)``: the gradient of the far states, sequential over key blocks in reverse.
- ``backward_dq`` ``(blocks, B H)``: ``dq`` of one query block (and the far field's part of the RPE weight
  gradient).
- ``backward_dkv`` ``(blocks, B H)``: ``dk``, ``dv`` of one key block and the RPE weight gradient of its tiles
  (diagonal sums, atomically added per (batch, head)).

Matmuls take the inputs' dtype (bfloat16/float16 on tensor cores, float32 as IEEE or, when asked, TF32) and
accumulate in ``ACC`` (float32; float64 for float64 inputs); weights, normalisers, states and gradients of states
are ``ACC``. Triton runs these on CPU
tensors under ``TRITON_INTERPRET=1`` (how the tests check them against the float64 reference).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the fused method is only chosen where triton imports (lm.ops.fused.fused_available)
    raise ImportError("the fused attention method needs triton (it ships with CUDA builds of torch); use another "
                      "method") from e

ACC_FLOAT32, ACC_FLOAT64 = tl.float32, tl.float64
"""The accumulator types a launch passes as ``ACC``."""


@triton.jit
def _load_rows(ptr, rows, n_rows, cols, n_cols):
    """Rows ``rows`` of a row-major ``(n_rows, n_cols)`` matrix at ``ptr``, zero outside."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_state(s_ptr, rm, M, rd, D):
    """A far state ``(M, D + 1)`` (row-major; column ``D`` is the sum of ``k``) -> ``(BM, BD)`` and ``(BM,)``."""
    mask = (rm[:, None] < M) & (rd[None, :] < D)
    kv = tl.load(s_ptr + rm[:, None] * (D + 1) + rd[None, :], mask=mask, other=0.0)
    ks = tl.load(s_ptr + rm * (D + 1) + D, mask=rm < M, other=0.0)
    return kv, ks


@triton.jit
def _store_state(s_ptr, kv, ks, rm, M, rd, D):
    mask = (rm[:, None] < M) & (rd[None, :] < D)
    tl.store(s_ptr + rm[:, None] * (D + 1) + rd[None, :], kv, mask=mask)
    tl.store(s_ptr + rm * (D + 1) + D, ks, mask=rm < M)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32 (or the inputs' float64). ``UPCAST``: run half inputs as float32 (their
    products are exact in float32, so the result is the tensor-core one up to summation order): how the Triton
    interpreter, whose half-precision ``tl.dot`` is wrong, runs them."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _round(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` (float32) rounded to ``dtype`` to nearest even, as a GPU does. The interpreter (``UPCAST``) truncates,
    so bfloat16 is rounded here by its bits first (float16 keeps the interpreter's truncation)."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def far_states(k_ptr, v_ptr, starts_ptr, s_ptr, N, M, D, H, NB_FAR,
               BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr,
               ACC: tl.constexpr, UPCAST: tl.constexpr):
    """``s`` ``(B H, NB_FAR + 1, M, D + 1)`` float32, entry 0 given: entry ``p + 1`` = state after key block ``p``."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    rt, rm, rd = tl.arange(0, BT), tl.arange(0, BM), tl.arange(0, BD)
    base = s_ptr + bh * (NB_FAR + 1) * M * (D + 1)
    kv, ks = _load_state(base, rm, M, rd, D)
    for p in range(0, NB_FAR):
        rows = p * BT + rt
        k = _load_rows(k_ptr + bh * N * M, rows, N, rm, M)
        v = _load_rows(v_ptr + bh * N * D, rows, N, rd, D)
        if HAS_DOCS:
            last = tl.load(starts_ptr + b * N + tl.minimum(p * BT + BT - 1, N - 1))
            keep = last < p * BT  # no document starts inside this block
            k = tl.where((rows >= last)[:, None], k, 0.0)
            kv = tl.where(keep, kv, 0.0)
            ks = tl.where(keep, ks, 0.0)
        kv += _dot(tl.trans(k), v, PREC, UPCAST)
        ks += tl.sum(k.to(ACC), 0)
        _store_state(base + (p + 1) * M * (D + 1), kv, ks, rm, M, rd, D)


@triton.jit
def _weights(c_ptr, h, L, off):
    """RPE weights ``c[h, min(off, L-1)]`` of a tile of offsets, 0 where ``off < 0`` (the future)."""
    w = tl.load(c_ptr + h * L + tl.minimum(tl.maximum(off, 0), L - 1))
    return tl.where(off >= 0, w, 0.0)


@triton.jit
def forward(q_ptr, k_ptr, v_ptr, c_ptr, starts_ptr, s_ptr, o_ptr, den_ptr, N, M, D, L, H, NW, NB_FAR,
            BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_FAR: tl.constexpr,
            PREC: tl.constexpr, FAR_PREC: tl.constexpr, ACC: tl.constexpr, TINY: tl.constexpr,
            UPCAST: tl.constexpr):
    """``o`` ``(B H, N, D)`` in ``v``'s dtype and the normaliser ``den`` ``(B H, N)`` float32."""
    g = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rt, rm, rd = tl.arange(0, BT), tl.arange(0, BM), tl.arange(0, BD)
    rows = g * BT + rt
    q = _load_rows(q_ptr + bh * N * M, rows, N, rm, M)
    acc = tl.zeros((BT, BD), ACC)
    den = tl.zeros((BT,), ACC)
    if HAS_DOCS:
        rs = tl.load(starts_ptr + b * N + rows, mask=rows < N, other=0)
    if HAS_FAR:
        kv, ks = _load_state(s_ptr + (bh * (NB_FAR + 1) + tl.maximum(g - NW + 1, 0)) * M * (D + 1), rm, M, rd, D)
        qf = q.to(ACC) * tl.load(c_ptr + h * L + L - 1)
        if HAS_DOCS:
            qf = tl.where((rs < (g - NW + 1) * BT)[:, None], qf, 0.0)
        acc += _dot(qf, kv, FAR_PREC, UPCAST)
        den += tl.sum(qf * ks[None, :], 1)
    for j in range(0, tl.minimum(NW, g + 1)):
        krows = (g - j) * BT + rt
        k = _load_rows(k_ptr + bh * N * M, krows, N, rm, M)
        v = _load_rows(v_ptr + bh * N * D, krows, N, rd, D)
        w = _dot(q, tl.trans(k), PREC, UPCAST) * _weights(c_ptr, h, L, j * BT + rt[:, None] - rt[None, :])
        if HAS_DOCS:
            w = tl.where(krows[None, :] >= rs[:, None], w, 0.0)
        acc += _dot(_round(w, v.dtype, UPCAST), v, PREC, UPCAST)
        den += tl.sum(w, 1)
    out = acc / tl.maximum(den, TINY)[:, None]  # an all-underflowed row has a zero numerator
    ok = (rows[:, None] < N) & (rd[None, :] < D)
    tl.store(o_ptr + bh * N * D + rows[:, None] * D + rd[None, :], _round(out, o_ptr.dtype.element_ty, UPCAST),
             mask=ok)
    tl.store(den_ptr + bh * N + rows, den, mask=rows < N)


@triton.jit
def _load_gn(do_ptr, den_ptr, rows, N, rd, D, ACC: tl.constexpr, TINY: tl.constexpr):
    """Gradient of the numerator of rows ``rows``: ``d out / den`` ``(BT, BD)`` in ``ACC``."""
    do = _load_rows(do_ptr, rows, N, rd, D).to(ACC)
    den = tl.load(den_ptr + rows, mask=rows < N, other=1.0)
    return do / tl.maximum(den, TINY)[:, None]


@triton.jit
def backward_delta(o_ptr, do_ptr, den_ptr, gd_ptr, N, D, BT: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
                   TINY: tl.constexpr):
    """``gd`` ``(B H, N)``: gradient of the normaliser, ``-(d out . out) / den`` (0 where the floor acted)."""
    g = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rt, rd = tl.arange(0, BT), tl.arange(0, BD)
    rows = g * BT + rt
    o = _load_rows(o_ptr + bh * N * D, rows, N, rd, D).to(ACC)
    gn = _load_gn(do_ptr + bh * N * D, den_ptr + bh * N, rows, N, rd, D, ACC, TINY)
    den = tl.load(den_ptr + bh * N + rows, mask=rows < N, other=0.0)
    gd = tl.where(den > TINY, -tl.sum(gn * o, 1), 0.0)
    tl.store(gd_ptr + bh * N + rows, gd, mask=rows < N)


@triton.jit
def far_states_backward(q_ptr, do_ptr, den_ptr, gd_ptr, c_ptr, starts_ptr, ds_ptr, N, M, D, L, H, NW, NB_FAR,
                        BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_DOCS: tl.constexpr,
                        FAR_PREC: tl.constexpr, ACC: tl.constexpr, TINY: tl.constexpr, UPCAST: tl.constexpr):
    """``ds`` ``(B H, NB_FAR, M, D + 1)``: gradient of the state after key block ``p`` (``c[L-1]`` folded in), from
    the output's gradient ``do`` ``(B H, N, D)``, the normaliser ``den`` and the normaliser's gradient ``gd``."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rt, rm, rd = tl.arange(0, BT), tl.arange(0, BM), tl.arange(0, BD)
    c_far = tl.load(c_ptr + h * L + L - 1)
    kv = tl.zeros((BM, BD), ACC)
    ks = tl.zeros((BM,), ACC)
    for i in range(0, NB_FAR):
        p = NB_FAR - 1 - i
        g = p + NW  # the query block that reads the state after key block p
        rows = g * BT + rt
        q = _load_rows(q_ptr + bh * N * M, rows, N, rm, M).to(ACC) * c_far
        gn = _load_gn(do_ptr + bh * N * D, den_ptr + bh * N, rows, N, rd, D, ACC, TINY)
        gd = tl.load(gd_ptr + bh * N + rows, mask=rows < N, other=0.0)
        if HAS_DOCS:
            rs = tl.load(starts_ptr + b * N + rows, mask=rows < N, other=0)
            q = tl.where((rs < (p + 1) * BT)[:, None], q, 0.0)
            nxt = (p + 1) * BT  # the state after block p flows into block p + 1's only if that one does not reset
            last = tl.load(starts_ptr + b * N + tl.minimum(nxt + BT - 1, N - 1))
            keep = last < nxt
            kv = tl.where(keep, kv, 0.0)
            ks = tl.where(keep, ks, 0.0)
        kv += _dot(tl.trans(q), gn, FAR_PREC, UPCAST)
        ks += tl.sum(q * gd[:, None], 0)
        _store_state(ds_ptr + (bh * NB_FAR + p) * M * (D + 1), kv, ks, rm, M, rd, D)


@triton.jit
def backward_dq(q_ptr, k_ptr, v_ptr, c_ptr, starts_ptr, s_ptr, do_ptr, den_ptr, gd_ptr, dq_ptr, dc_ptr, N, M, D, L, H,
                NW, NB_FAR, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_FAR: tl.constexpr, NEED_DC: tl.constexpr, PREC: tl.constexpr, FAR_PREC: tl.constexpr,
                ACC: tl.constexpr, TINY: tl.constexpr, UPCAST: tl.constexpr):
    """``dq`` ``(B H, N, M)`` in ``q``'s dtype; adds the far field's part of the RPE weight gradient to ``dc``
    ``(B H, L)``."""
    g = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rt, rm, rd = tl.arange(0, BT), tl.arange(0, BM), tl.arange(0, BD)
    rows = g * BT + rt
    q = _load_rows(q_ptr + bh * N * M, rows, N, rm, M)
    gn = _load_gn(do_ptr + bh * N * D, den_ptr + bh * N, rows, N, rd, D, ACC, TINY)
    gd = tl.load(gd_ptr + bh * N + rows, mask=rows < N, other=0.0)
    gn_mm = _round(gn, q.dtype, UPCAST)
    dq = tl.zeros((BT, BM), ACC)
    if HAS_DOCS:
        rs = tl.load(starts_ptr + b * N + rows, mask=rows < N, other=0)
    if HAS_FAR:
        kv, ks = _load_state(s_ptr + (bh * (NB_FAR + 1) + tl.maximum(g - NW + 1, 0)) * M * (D + 1), rm, M, rd, D)
        t = _dot(gn, tl.trans(kv), FAR_PREC, UPCAST) + gd[:, None] * ks[None, :]  # (BT, BM)
        if HAS_DOCS:
            t = tl.where((rs < (g - NW + 1) * BT)[:, None], t, 0.0)
        dq += t * tl.load(c_ptr + h * L + L - 1)
        if NEED_DC:
            tl.atomic_add(dc_ptr + bh * L + L - 1, tl.sum(tl.sum(q.to(ACC) * t, 1), 0))
    for j in range(0, tl.minimum(NW, g + 1)):
        krows = (g - j) * BT + rt
        k = _load_rows(k_ptr + bh * N * M, krows, N, rm, M)
        v = _load_rows(v_ptr + bh * N * D, krows, N, rd, D)
        w = _weights(c_ptr, h, L, j * BT + rt[:, None] - rt[None, :])
        if HAS_DOCS:
            w = tl.where(krows[None, :] >= rs[:, None], w, 0.0)
        dw = _dot(gn_mm, tl.trans(v), PREC, UPCAST) + gd[:, None]  # d(weighted score)
        dq += _dot(_round(dw * w, k.dtype, UPCAST), k, PREC, UPCAST)
    ok = (rows[:, None] < N) & (rm[None, :] < M)
    tl.store(dq_ptr + bh * N * M + rows[:, None] * M + rm[None, :], _round(dq, dq_ptr.dtype.element_ty, UPCAST),
             mask=ok)


@triton.jit
def backward_dkv(q_ptr, k_ptr, v_ptr, c_ptr, starts_ptr, ds_ptr, do_ptr, den_ptr, gd_ptr, dk_ptr, dv_ptr, dc_ptr, N,
                 M, D, L, H, NW, NB_FAR, NB, BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                 HAS_DOCS: tl.constexpr, HAS_FAR: tl.constexpr, NEED_DC: tl.constexpr, PREC: tl.constexpr,
                 FAR_PREC: tl.constexpr, ACC: tl.constexpr, TINY: tl.constexpr, UPCAST: tl.constexpr):
    """``dk`` ``(B H, N, M)`` and ``dv`` ``(B H, N, D)`` of one key block, in the inputs' dtypes; adds the near
    tiles' part of the RPE weight gradient to ``dc`` ``(B H, L)`` (diagonal sums, atomically)."""
    p = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rt, rm, rd = tl.arange(0, BT), tl.arange(0, BM), tl.arange(0, BD)
    krows = p * BT + rt
    k = _load_rows(k_ptr + bh * N * M, krows, N, rm, M)
    v = _load_rows(v_ptr + bh * N * D, krows, N, rd, D)
    dk = tl.zeros((BT, BM), ACC)
    dv = tl.zeros((BT, BD), ACC)
    if HAS_FAR:
        if p < NB_FAR:
            gkv, gks = _load_state(ds_ptr + (bh * NB_FAR + p) * M * (D + 1), rm, M, rd, D)
            tk = _dot(v.to(ACC), tl.trans(gkv), FAR_PREC, UPCAST) + gks[None, :]
            tv = _dot(k.to(ACC), gkv, FAR_PREC, UPCAST)
            if HAS_DOCS:
                last = tl.load(starts_ptr + b * N + tl.minimum(p * BT + BT - 1, N - 1))
                tail = (krows >= last)[:, None]
                tk = tl.where(tail, tk, 0.0)
                tv = tl.where(tail, tv, 0.0)
            dk += tk
            dv += tv
    # Diagonal sums of a (key b, query a) tile, offset j BT + a - b: row b gathered at column (b + r) mod BT holds
    # offset j BT + r where b + r < BT and j BT + r - BT where b + r >= BT.
    skew = (rt[:, None] + rt[None, :]) % BT
    wraps = (rt[:, None] + rt[None, :]) >= BT
    for j in range(0, tl.minimum(NW, NB - p)):
        rows = (p + j) * BT + rt
        q = _load_rows(q_ptr + bh * N * M, rows, N, rm, M)
        gn = _load_gn(do_ptr + bh * N * D, den_ptr + bh * N, rows, N, rd, D, ACC, TINY)
        gd = tl.load(gd_ptr + bh * N + rows, mask=rows < N, other=0.0)
        off = j * BT + rt[None, :] - rt[:, None]  # (key, query)
        pair = off >= 0  # the pairs that take part (a weight that underflowed to 0 still has a gradient)
        if HAS_DOCS:
            rs = tl.load(starts_ptr + b * N + rows, mask=rows < N, other=0)
            pair = pair & (krows[:, None] >= rs[None, :])
        w = tl.where(pair, _weights(c_ptr, h, L, off), 0.0)
        s = _dot(k, tl.trans(q), PREC, UPCAST)
        gn_mm = _round(gn, v.dtype, UPCAST)
        dw = _dot(v, tl.trans(gn_mm), PREC, UPCAST) + gd[None, :]
        dk += _dot(_round(dw * w, q.dtype, UPCAST), q, PREC, UPCAST)
        dv += _dot(_round(s * w, v.dtype, UPCAST), gn_mm, PREC, UPCAST)
        if NEED_DC:
            pc = tl.gather(tl.where(pair, dw * s, 0.0), skew, 1)  # d(weight) of each pair, skewed
            near = tl.sum(tl.where(wraps, 0.0, pc), 0)
            back = tl.sum(tl.where(wraps, pc, 0.0), 0)
            tl.atomic_add(dc_ptr + bh * L + tl.minimum(j * BT + rt, L - 1), near)
            off_back = j * BT + rt - BT
            tl.atomic_add(dc_ptr + bh * L + tl.minimum(tl.maximum(off_back, 0), L - 1), back, mask=off_back >= 0)
    ok = krows[:, None] < N
    tl.store(dk_ptr + bh * N * M + krows[:, None] * M + rm[None, :], _round(dk, dk_ptr.dtype.element_ty, UPCAST),
             mask=ok & (rm[None, :] < M))
    tl.store(dv_ptr + bh * N * D + krows[:, None] * D + rd[None, :], _round(dv, dv_ptr.dtype.element_ty, UPCAST),
             mask=ok & (rd[None, :] < D))
