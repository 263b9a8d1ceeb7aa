"""Causal Toeplitz mixing ``Y_i = sum_{j<=i} c(i-j) (q_i . k_j) u_j`` and its exact gradients, three ways.

All functions here are plain tensor code without autograd (the ``autograd.Function`` s in ``kernelized.py``
call them). Shapes, with ``E = D + 1`` (the values with a column of ones appended, so the normaliser comes out
of the same pass as the numerator):

- ``q``, ``k``: ``(B, H, N, M)`` features; ``v``: ``(B, H, N, D)`` values, mixed as ``u = [v, 1]`` (built inside,
  straight into the layout each method needs); ``g``: ``(B, H, N, E)`` gradient of ``Y``;
- FFT form: ``c``: ``(H, N)`` weights for every offset ``0..N-1``;
- band form: ``c``: ``(H, L)`` weights, offsets ``>= L-1`` use ``c[:, L-1]`` (clipped RPE; ``L = 1`` with
  ``c = 1`` is plain causal linear attention, the "prefix" method).

Memory: nothing of size ``N * M * E`` is ever held; the FFT loops over (batch, head, feature chunk) so its
workspace is ``chunk * E * nfft`` numbers, and the band form loops over groups of blocks.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

# Elements (channels x FFT length) per FFT call: 2^19 is 2 MB of fp32 per buffer, so the few buffers of one
# step stay in the 32 MB L3 cache here (16 channels at N = 16k; whole features at N <= 4k). Smaller groups
# lose to per-call overhead (badly with 2 threads on a loaded machine), larger ones to cache misses.
FFT_GROUP_ELEMENTS = 2**19
# Upper bound on the elements of one band-form score tensor (B * H * blocks * T * window), ~64 MB of fp32.
BAND_WORKSPACE = 16 * 2**20


def fft_size(n: int) -> int:
    """Smallest length ``>= n`` of the form ``2^a`` or ``3 * 2^a`` (both measured fast for torch.fft here;
    sizes with larger odd factors, e.g. 3^8 * 5, measured 3x slower than the next power of two)."""
    p = 1 << max(0, (n - 1).bit_length())
    three = 3 << max(0, (-(-n // 3) - 1).bit_length())
    return min(p, three)


def _transposed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, C) -> contiguous (B, H, C, N) in ``dtype``, so the FFT runs along the last, contiguous axis."""
    return x.transpose(-1, -2).to(dtype).contiguous()


def _transposed_with_ones(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, D) -> contiguous (B, H, D + 1, N) in ``dtype``: ``u = [v, 1]`` transposed, in one allocation."""
    B, H, N, D = v.shape
    ut = torch.empty(B, H, D + 1, N, dtype=dtype, device=v.device)
    ut[:, :, :D].copy_(v.transpose(-1, -2))
    ut[:, :, D].fill_(1)
    return ut


def _channel_groups(M: int, E: int, nfft: int):
    """Blocks ``(m0, m1, e0, e1)`` of the M x E channel grid holding about FFT_GROUP_ELEMENTS numbers:
    several whole features at a time for short sequences, a chunk of one feature's columns for long ones."""
    per_group = max(1, FFT_GROUP_ELEMENTS // nfft)
    if per_group >= E:
        mc = min(M, per_group // E)
        return [(m0, min(M, m0 + mc), 0, E) for m0 in range(0, M, mc)]
    return [(m, m + 1, e0, min(E, e0 + per_group)) for m in range(M) for e0 in range(0, E, per_group)]


class _FFTWorkspace:
    """Preallocated zero-padded input buffers for one channel group, viewed as (features, columns, nfft).

    Only ``[..., :N]`` of a pad buffer is ever written, so its tail stays zero and the transform needs no
    padding copy (``rfft(x, n=nfft)`` measured 3x slower than ``rfft`` of a pre-padded buffer here; ``out=``
    for the transforms costs an extra copy, so their results are fresh tensors).
    """

    def __init__(self, n: int, M: int, E: int, dtype: torch.dtype, device, count: int):
        self.n, self.nfft = n, fft_size(2 * n - 1)
        self.groups = _channel_groups(M, E, self.nfft)
        m0, m1, e0, e1 = self.groups[0]
        self.pads = [torch.zeros(m1 - m0, e1 - e0, self.nfft, dtype=dtype, device=device) for _ in range(count)]

    def spectrum(self, i: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """rfft of the zero-padded outer product ``a (mc, N) x b (ec, N)`` -> (mc, ec, F), in pad buffer ``i``."""
        pad = self.pads[i][: a.shape[0], : b.shape[0]]
        torch.mul(a[:, None, :], b[None, :, :], out=pad[..., : self.n])
        return torch.fft.rfft(pad)

    def inverse(self, spec: torch.Tensor) -> torch.Tensor:
        """First ``N`` samples of irfft(spec): (mc, ec, F) -> (mc, ec, N)."""
        return torch.fft.irfft(spec, n=self.nfft)[..., : self.n]


def _for_each_head(fn, B: int, H: int, device: torch.device) -> None:
    """Run ``fn(b, h)`` for every (batch, head); on CPU, heads spread over ``torch.get_num_threads()`` Python
    threads whose torch ops run single-threaded (on CUDA in order: kernels are asynchronous anyway).

    The FFT loop issues thousands of small ops; with torch's intra-op threads each is a parallel region with
    its own barrier, and with 2 threads on a loaded machine these measured 2-40x slower than one thread
    (16k tokens: 98 s vs 4.7 s). Parallelism across heads has one join in all. The transforms and
    elementwise ops release the GIL.
    """
    items = [(b, h) for b in range(B) for h in range(H)]
    threads = torch.get_num_threads()
    workers = min(threads, len(items)) if device.type == "cpu" else 1
    if workers <= 1:
        for b, h in items:
            fn(b, h)
        return

    def work(part):
        torch.set_num_threads(1)  # this worker's ops; the caller's setting is restored below
        with torch.no_grad():  # grad mode is per thread: a fresh thread would record these plain kernels
            for b, h in part:
                fn(b, h)

    try:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work, items[i::workers]) for i in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(threads)


def fft_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                fft_dtype: torch.dtype) -> torch.Tensor:
    """``Y (B, H, N, E)`` by zero-padded FFT convolution (length ``>= 2N-1``, so no wrap-around).

    One rfft + irfft pass over the ``M * E`` channels ``k_m * u_e`` of each head; the transforms and products
    run in ``fft_dtype``, and ``Y`` is accumulated in it too.
    """
    B, H, N, M = q.shape
    E = v.shape[-1] + 1
    cf = torch.fft.rfft(c.to(fft_dtype), n=fft_size(2 * N - 1))  # (H, F)
    qt, kt = (_transposed(x, fft_dtype) for x in (q, k))  # (B, H, M, N)
    ut = _transposed_with_ones(v, fft_dtype)  # (B, H, E, N)
    y = torch.zeros(B, H, E, N, dtype=fft_dtype, device=q.device)

    def head(b, h):
        ws = _FFTWorkspace(N, M, E, fft_dtype, q.device, 1)
        for m0, m1, e0, e1 in ws.groups:
            s = ws.inverse(ws.spectrum(0, kt[b, h, m0:m1], ut[b, h, e0:e1]).mul_(cf[h]))  # (mc, ec, N)
            if m1 - m0 == 1:
                y[b, h, e0:e1].addcmul_(s[0], qt[b, h, m0])
            else:
                y[b, h, e0:e1] += s.mul_(qt[b, h, m0:m1, None, :]).sum(0)

    _for_each_head(head, B, H, q.device)
    return y.transpose(-1, -2)


def fft_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, g: torch.Tensor,
                 fft_dtype: torch.dtype, need_dc: bool = True):
    """Gradients ``(dq, dk, dv, dc)`` of ``sum(g * Y)`` with ``Y = fft_forward(q, k, v, c)``.

    Per channel ``x = k_m u_e``, ``s = c * x`` (causal convolution), ``Y_e += q_m s``. Backward recomputes
    ``s`` (for ``dq``), forms ``ds = q_m g_e``, and gets ``dx`` by the anti-causal correlation
    ``dx_j = sum_{i>=j} c(i-j) ds_i`` (``conj(C)`` in frequency); ``dc(t) = sum_i ds_i x_{i-t}`` summed over
    channels is accumulated as ``conj(X) dS`` in frequency and transformed once at the end.
    Returns dq, dk ``(B, H, N, M)``, dv ``(B, H, N, D)``, dc ``(H, N)`` (None unless ``need_dc``), in
    ``fft_dtype``.
    """
    B, H, N, M = q.shape
    E = v.shape[-1] + 1
    nfft = fft_size(2 * N - 1)
    cf = torch.fft.rfft(c.to(fft_dtype), n=nfft)  # (H, F)
    cf_conj = cf.conj().resolve_conj()
    qt, kt, gt = (_transposed(x, fft_dtype) for x in (q, k, g))
    ut = _transposed_with_ones(v, fft_dtype)
    dq = torch.zeros(B, H, M, N, dtype=fft_dtype, device=q.device)
    dk = torch.zeros_like(dq)
    du = torch.zeros(B, H, E, N, dtype=fft_dtype, device=q.device)
    dcf = torch.zeros(B, H, cf.shape[-1], dtype=cf.dtype, device=q.device)

    def head(b, h):
        ws = _FFTWorkspace(N, M, E, fft_dtype, q.device, 2)
        acc = torch.zeros(*ws.pads[0].shape[:2], cf.shape[-1], dtype=cf.dtype, device=q.device) if need_dc else None
        for m0, m1, e0, e1 in ws.groups:
            mc, ec = m1 - m0, e1 - e0
            xf = ws.spectrum(0, kt[b, h, m0:m1], ut[b, h, e0:e1])  # (mc, ec, F)
            s = ws.inverse(xf * cf[h])
            dq[b, h, m0:m1] += s.mul_(gt[b, h, None, e0:e1]).sum(1)
            dsf = ws.spectrum(1, qt[b, h, m0:m1], gt[b, h, e0:e1])
            if need_dc:
                acc[:mc, :ec].addcmul_(xf.conj_physical_(), dsf)
            dx = ws.inverse(dsf.mul_(cf_conj[h]))
            dk[b, h, m0:m1] += (dx * ut[b, h, None, e0:e1]).sum(1)
            if mc == 1:
                du[b, h, e0:e1].addcmul_(dx[0], kt[b, h, m0])
            else:
                du[b, h, e0:e1] += dx.mul_(kt[b, h, m0:m1, None, :]).sum(0)
        if need_dc:
            dcf[b, h] = acc.sum((0, 1))

    _for_each_head(head, B, H, q.device)
    dc = torch.fft.irfft(dcf.sum(0), n=nfft)[..., :N] if need_dc else None
    return dq.transpose(-1, -2), dk.transpose(-1, -2), du[:, :, :-1].transpose(-1, -2), dc


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[i] = sum_{j<i} x[j]`` along ``dim``, summing only earlier entries (``cumsum - x`` would cancel
    catastrophically when later entries are large, leaking the future into round-off)."""
    out = torch.zeros_like(x)
    n = x.shape[dim]
    if n > 1:
        out.narrow(dim, 1, n - 1).copy_(x.narrow(dim, 0, n - 1).cumsum(dim))
    return out


class BandLayout:
    """Blocked layout of the band form: query blocks of ``T`` rows, each with a key window of ``T + P`` columns
    (``P = L - 2`` keys before the block), and the block-independent weight matrix over it.

    Keys more than the window before a query all have offset ``>= L - 1`` and weight ``c_far = c[:, L-1]``;
    they enter through a running prefix sum of ``k^T u`` over whole blocks (zero-padding the keys by ``P`` in
    front makes "keys before the window of block b" exactly "padded blocks 0..b-1").
    """

    def __init__(self, n: int, num_offsets: int, device, block: int | None = None):
        self.n = n
        self.pad = max(num_offsets - 2, 0)
        self.block = block or max(64, min(256, self.pad))
        self.num_blocks = -(-n // self.block)
        self.window = self.block + self.pad
        a = torch.arange(self.block, device=device)[:, None]
        w = torch.arange(self.window, device=device)[None, :]
        offset = a - w + self.pad  # (T, W)
        self.causal = offset >= 0
        self.offset_index = offset.clamp(0, num_offsets - 1)  # (T, W) index into c

    def weights(self, c: torch.Tensor) -> torch.Tensor:
        """(H, L) -> (H, T, W) weights over a block's key window (0 above the diagonal)."""
        return torch.where(self.causal, c[:, self.offset_index], torch.zeros((), dtype=c.dtype, device=c.device))

    def padded_keys(self, x: torch.Tensor, ones_column: bool = False) -> torch.Tensor:
        """(B, H, N, C) -> (B, H, (num_blocks + 1) * T + P, C (+1)): ``P`` zero rows in front, zero rows at the
        back; with ``ones_column`` a column of ones is appended on the ``N`` real rows (``u = [v, 1]``)."""
        B, H, N, C = x.shape
        rows = (self.num_blocks + 1) * self.block + self.pad
        xp = torch.zeros(B, H, rows, C + int(ones_column), dtype=x.dtype, device=x.device)
        xp[:, :, self.pad:self.pad + N, :C] = x
        if ones_column:
            xp[:, :, self.pad:self.pad + N, C] = 1
        return xp

    def padded_queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, C) -> (B, H, num_blocks, T, C) (a view when N is a multiple of T)."""
        extra = self.num_blocks * self.block - self.n
        if extra:
            x = torch.nn.functional.pad(x, (0, 0, 0, extra))
        return x.unflatten(2, (self.num_blocks, self.block))

    def windows(self, xp: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Key windows of blocks ``start..stop-1`` from padded keys: (B, H, stop-start, W, C) (a view)."""
        T = self.block
        return xp[:, :, start * T: stop * T + self.pad].unfold(2, self.window, T).transpose(-1, -2)

    def far_states(self, kp: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Exclusive prefix sums over padded blocks of ``k^T u``: (B, H, num_blocks, M, E)."""
        T, nb = self.block, self.num_blocks
        kb = kp[:, :, : nb * T].unflatten(2, (nb, T))
        ub = up[:, :, : nb * T].unflatten(2, (nb, T))
        z = kb.transpose(-1, -2) @ ub
        return _exclusive_cumsum(z, dim=2)

    def group_size(self, batch_heads: int) -> int:
        return max(1, min(self.num_blocks, BAND_WORKSPACE // max(1, batch_heads * self.block * self.window)))


def band_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                 block: int | None = None) -> torch.Tensor:
    """``Y (B, H, N, E)``: offsets ``< L-1`` exactly by blocked dense matmuls, the rest via prefix sums.
    Cost O(B H N (T + L) (M + E)); computed in ``q``'s dtype."""
    B, H, N, M = q.shape
    lay = BandLayout(N, c.shape[-1], q.device, block)
    cw = lay.weights(c)[None, :, None]  # (1, H, 1, T, W)
    c_far = c[None, :, -1, None, None, None]  # (1, H, 1, 1, 1)
    kp, up = lay.padded_keys(k), lay.padded_keys(v, ones_column=True)
    qb = lay.padded_queries(q)
    states = lay.far_states(kp, up)
    y = torch.empty(B, H, lay.num_blocks, lay.block, up.shape[-1], dtype=q.dtype, device=q.device)
    step = lay.group_size(B * H)
    for s0 in range(0, lay.num_blocks, step):
        s1 = min(lay.num_blocks, s0 + step)
        qg = qb[:, :, s0:s1]
        w = (qg @ lay.windows(kp, s0, s1).transpose(-1, -2)).mul_(cw)  # (B, H, G, T, W)
        y[:, :, s0:s1] = (w @ lay.windows(up, s0, s1)).add_(c_far * (qg @ states[:, :, s0:s1]))
    return y.flatten(2, 3)[:, :, :N]


def _fold_windows(dw: torch.Tensor, dxp: torch.Tensor, lay: BandLayout, s0: int) -> None:
    """Scatter-add window gradients (B, H, G, W, C) of blocks s0.. into padded-key gradients (in place)."""
    T, G = lay.block, dw.shape[2]
    blocks = dxp.unflatten(2, (-1, T))  # (B, H, num_blocks + 1 + ..., T, C) view of the padded rows
    for piece in range(-(-lay.window // T)):
        width = min(T, lay.window - piece * T)
        blocks[:, :, s0 + piece: s0 + piece + G, :width] += dw[:, :, :, piece * T: piece * T + width]


def band_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, g: torch.Tensor,
                  block: int | None = None):
    """Gradients ``(dq, dk, dv, dc)`` of ``sum(g * Y)`` with ``Y = band_forward(q, k, v, c)``; recomputes the
    block scores group by group. dc is ``(H, L)``."""
    B, H, N, M = q.shape
    E = v.shape[-1] + 1
    L = c.shape[-1]
    lay = BandLayout(N, L, q.device, block)
    T, nb = lay.block, lay.num_blocks
    cw = lay.weights(c)[None, :, None]
    c_far = c[None, :, -1, None, None, None]
    kp, up = lay.padded_keys(k), lay.padded_keys(v, ones_column=True)
    qb, gb = lay.padded_queries(q), lay.padded_queries(g)
    states = lay.far_states(kp, up)  # (B, H, nb, M, E)
    rows = (nb + -(-lay.window // T)) * T  # the last window's pieces reach block nb - 1 + pieces - 1
    dkp = torch.zeros(B, H, rows, M, dtype=q.dtype, device=q.device)
    dup = torch.zeros(B, H, rows, E, dtype=q.dtype, device=q.device)
    dqb = torch.empty_like(qb)
    dcw = torch.zeros(H, T, lay.window, dtype=q.dtype, device=q.device)
    dc_far = torch.zeros(H, dtype=q.dtype, device=q.device)
    step = lay.group_size(B * H)
    for s0 in range(0, nb, step):
        s1 = min(nb, s0 + step)
        qg, gg = qb[:, :, s0:s1], gb[:, :, s0:s1]
        kw, uw = lay.windows(kp, s0, s1), lay.windows(up, s0, s1)  # (B, H, G, W, M|E)
        a = qg @ kw.transpose(-1, -2)  # (B, H, G, T, W)
        dw = gg @ uw.transpose(-1, -2)
        dcw += (dw * a).sum((0, 2))
        w = a.mul_(cw)
        da = dw.mul_(cw)
        st = states[:, :, s0:s1]
        dqb[:, :, s0:s1] = da @ kw + c_far * (gg @ st.transpose(-1, -2))
        dc_far += (gg * (qg @ st)).sum((0, 2, 3, 4))
        _fold_windows(da.transpose(-1, -2) @ qg, dkp, lay, s0)
        _fold_windows(w.transpose(-1, -2) @ gg, dup, lay, s0)
    # Far field: d(state_b) = c_far q_b^T g_b, and block p's k^T u feeds every later block's state.
    dstate = c_far * (qb.transpose(-1, -2) @ gb)  # (B, H, nb, M, E)
    dz = _exclusive_cumsum(dstate.flip(2), dim=2).flip(2)
    kb = kp[:, :, : nb * T].unflatten(2, (nb, T))
    ub = up[:, :, : nb * T].unflatten(2, (nb, T))
    dkp[:, :, : nb * T] += (ub @ dz.transpose(-1, -2)).flatten(2, 3)
    dup[:, :, : nb * T] += (kb @ dz).flatten(2, 3)
    dc = torch.zeros(H, L, dtype=q.dtype, device=q.device)
    dc.index_add_(1, lay.offset_index[lay.causal], dcw[:, lay.causal])
    dc[:, -1] += dc_far
    p = lay.pad
    return dqb.flatten(2, 3)[:, :, :N], dkp[:, :, p:p + N], dup[:, :, p:p + N, :-1], dc
