"""Causal self-attention layers, one per ``model.attention.kind``; all map ``(B, N, d_model)`` -> same.

- :class:`KernelizedAttention` (``kernelized_rpe`` and ``kernelized``): feature maps (NPRF by default) and
  ``lm.ops.kernelized_attention``, with the RPE table the model passes in (or none: prefix sums).
- :class:`SoftmaxAttention` (``softmax``): ``scaled_dot_product_attention`` with the same RPE as an additive
  bias, or plain causal.

The RPE modules live in the model (they may be shared by all layers); layers receive their table,
``(H, L)`` / ``(L,)`` or ``None``, as the second argument of ``forward``.

Decoding (``forward(x, table, cache=...)``, the table then whole): the layer keeps its state in the cache object
it is given (:mod:`lm.model.cache`). A kernelized layer's first call runs the parallel op, which hands over the
recurrent state after the prompt; every later call advances it with the op's recurrent step
(:mod:`lm.ops.recurrent`). A softmax layer appends to its KV cache.

Padding (``key_mask`` ``(B, N)``, False at pad tokens, e.g. a left-padded batch): pad keys take no part in any
real token's attention. Kernelized layers zero their features and values (a key with zero features adds nothing
to numerator or normaliser); softmax layers mask them, letting a pad query attend to itself so that no row is
empty. RPE offsets are distances in the batch's positions, which left padding leaves unchanged between real
tokens.

Documents (``document_starts`` ``(B, N)``, each token's document start; packed training windows): a token
attends only to the tokens of its own document, ``document_starts[b, i] <= j <= i``. Kernelized layers hand them
to the op (whose ``auto`` method then never picks the FFT), softmax layers add the same mask; RPE offsets stay
``i - j``, distances inside the document.

Sequence parallelism (``forward(x, table, shard)``): the layer sees this rank's block of tokens; an all-to-all
gives it every token of its block of heads, :meth:`attend_heads` runs on whole sequences exactly as without
sharding (so the op's method choice and the FFT precision policy see the full length), and a second
all-to-all brings the outputs back. Per-head RPE rows are sliced to the rank's heads.

Precision policy of the FFT method: a kernelized layer holds ``fft_fp32_max_len``, a plain int (the longest
sequence whose far field may use a float32 FFT for the layer's current RPE table). ``Transformer.
refresh_precision_policy`` sets it from the tables outside the hot path; ``forward`` only compares it with the
sequence length, so it reads no tensor values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.config.model import ModelConfig
from lm.model.cache import KernelizedLayerCache, SoftmaxLayerCache
from lm.model.rpe import relative_bias
from lm.ops import kernelized_attention, kernelized_attention_step, state_after
from lm.ops.documents import document_mask
from lm.ops.feature_maps import (elu_features, no_autocast, nprf_features, positive_random_features,
                                 random_projection, relu_features)
from lm.ops.precision import MAX_LENGTH

__all__ = ["KernelizedAttention", "SoftmaxAttention", "build_attention"]


class _Attention(nn.Module):
    """Shared part: fused q/k/v projection, output projection, head split/merge."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(B, N, d_model)`` -> q, k, v, each ``(B, H, N, head_dim)``."""
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``(B, H, N, head_dim)`` -> ``(B, N, d_model)`` after the output projection."""
        b, h, n, dh = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, n, h * dh))

    def attend_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpe_table: torch.Tensor | None,
                     key_mask: torch.Tensor | None = None, document_starts: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Attention of whole sequences, per head: q, k, v ``(B, h, N, head_dim)`` for any ``h`` heads (all of
        them, or a sequence-parallel rank's block) with their RPE table ``(h, L)`` / ``(L,)`` / None,
        ``key_mask`` ``(B, N)`` / None and ``document_starts`` ``(B, N)`` / None -> outputs ``(B, h, N,
        head_dim)``."""
        raise NotImplementedError

    def attend_cached(self, x: torch.Tensor, rpe_table: torch.Tensor | None, cache,
                      key_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``x`` ``(B, n, d_model)``, the next ``n`` tokens after those ``cache`` holds, against all
        of them; updates ``cache``. Returns per-head outputs ``(B, H, n, head_dim)``."""
        raise NotImplementedError

    def new_cache(self):
        """An empty cache of this layer's kind."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, rpe_table: torch.Tensor | None = None, *, cache=None, shard=None,
                key_mask: torch.Tensor | None = None, document_starts: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, N, d_model)``, ``rpe_table`` ``(H, L)`` / ``(L,)`` / None -> ``(B, N, d_model)``.

        One of three ways to run, by what is given:

        - nothing: causal attention of the whole sequence (training, scoring);
        - ``cache`` (decoding; :meth:`new_cache`): ``x`` continues the tokens the cache holds, ``rpe_table`` is
          the whole table; the cache is updated in place;
        - ``shard`` (sequence-parallel training, :class:`lm.training.distributed.SequenceShard`): ``x`` holds
          this rank's block of ``N / P`` consecutive tokens (``P = shard.size``) and ``rpe_table`` is the table
          of the whole sequence: q, k, v of the block go through the shard's all-to-all, which hands this rank
          every token of heads ``[r H/P, (r+1) H/P)`` (``r = shard.rank``); :meth:`attend_heads` runs on those
          with the table's rows of the same heads (a shared ``(L,)`` table stays whole), and the outputs return
          to the block's tokens for the output projection. The result equals the unsharded layer's.

        ``key_mask`` ``(B, N)`` bool (not with ``shard``): False at padding (see the module docstring).
        ``document_starts`` ``(B, N)`` int (not with ``cache``; under ``shard`` those of the whole sequence):
        each token's document start (see the module docstring).
        """
        if cache is not None:
            if shard is not None or document_starts is not None:
                raise ValueError("attention takes a decoding cache or a sequence-parallel shard, not both, and no "
                                 "document_starts with a cache")
            return self.merge(self.attend_cached(x, rpe_table, cache, key_mask).to(x.dtype))
        if shard is None:
            return self.merge(self.attend_heads(*self.qkv(x), rpe_table, key_mask, document_starts).to(x.dtype))
        if key_mask is not None:
            raise ValueError("sequence-parallel attention takes no key_mask (training windows have no padding)")
        b, n, _ = x.shape
        heads = self.n_heads // shard.size
        if rpe_table is not None and rpe_table.dim() == 2:
            rpe_table = rpe_table.narrow(0, shard.rank * heads, heads)
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.n_heads, self.head_dim).unbind(2)  # (B, n, H, head_dim)

        def local(q, k, v):  # (B, N, H / P, head_dim): every token of this rank's heads
            o = self.attend_heads(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rpe_table,
                                  document_starts=document_starts)
            return o.transpose(1, 2).to(q.dtype)

        o = shard.attention(q, k, v, local)  # (B, n, H, head_dim)
        return self.out_proj(o.reshape(b, n, self.n_heads * self.head_dim))

    def reset_parameters(self, std: float, out_std: float) -> None:
        """GPT-2 init: normal(std) weights, zero biases; the residual output projection gets ``out_std``."""
        nn.init.normal_(self.qkv_proj.weight, std=std)
        nn.init.zeros_(self.qkv_proj.bias)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        nn.init.zeros_(self.out_proj.bias)


class KernelizedAttention(_Attention):
    """Causal kernelized attention: ``phi(q_i).phi(k_j)`` weights (times ``exp(b(i-j))`` with an RPE table).

    Feature maps (``model.attention.feature_map``): ``nprf`` (the paper; L2-normalised q, k), ``prf``
    (Performer; q, k scaled by ``head_dim ** -1/4`` so the kernel is ``exp(q.k / sqrt(head_dim))``) with
    ``num_features`` random features from the buffer ``projection`` ``(M, head_dim)`` (one per layer, shared
    by its heads), saved in the state_dict so that a checkpoint reproduces its features; or ``elu`` / ``relu``
    (``head_dim`` features, no randomness). Features are computed in float32 or better whatever the parameter
    dtype and the autocast state (the q/k/v projection itself follows autocast); with half activations (bf16
    training) they are handed to the op in that half dtype, whose fused method then multiplies on tensor cores
    and whose other methods compute in float32.

    ``fft_fp32_max_len`` (int): precision policy of the FFT method, see the module docstring. The default
    suits a zero RPE table (float32 at any length); ``cpu_threads``: the op's CPU worker threads
    (``lm.ops.CPUThreads``; 0 = ``torch.get_num_threads()``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        a = cfg.attention
        self.feature_map = a.feature_map
        self.orthogonal = a.orthogonal
        self.method = a.method
        self.fft_fp32_max_len = MAX_LENGTH
        self.cpu_threads = 0
        if self.feature_map in ("nprf", "prf"):
            self.register_buffer("projection", random_projection(a.num_features, self.head_dim,
                                                                 orthogonal=a.orthogonal))
        else:
            self.register_buffer("projection", None)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection from ``generator`` (the global RNG when None), in place."""
        if self.projection is not None:
            m, d = self.projection.shape
            self.projection.copy_(random_projection(m, d, orthogonal=self.orthogonal, generator=generator))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(B, N, d_model)`` -> ``phi_q``, ``phi_k`` ``(B, H, N, M)`` and ``v`` ``(B, H, N, head_dim)``,
        all float32 (float64 when the parameters are float64)."""
        return self.feature_map_qkv(*self.qkv(x))

    def feature_map_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``(B, h, N, head_dim)`` -> ``phi_q``, ``phi_k`` ``(B, h, N, M)`` and ``v``, in float32 (float64
        for float64 inputs). The projection is the layer's, shared by its heads."""
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        with no_autocast(q.device):
            q, k, v = q.to(ct), k.to(ct), v.to(ct)
            if self.feature_map == "nprf":
                w = self.projection.to(ct)
                return nprf_features(q, w, stabilise=True), nprf_features(k, w, stabilise=False), v
            if self.feature_map == "prf":
                w, s = self.projection.to(ct), self.head_dim ** -0.25
                return (positive_random_features(q * s, w, stabilise=True),
                        positive_random_features(k * s, w, stabilise=False), v)
            fmap = elu_features if self.feature_map == "elu" else relu_features
            return fmap(q), fmap(k), v

    def attend(self, phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, rpe_table: torch.Tensor | None,
               output_final_state: bool = False, initial_state=None,
               document_starts: torch.Tensor | None = None):
        """The op on one sequence: features ``(B, H, N, M)``, ``v`` ``(B, H, N, head_dim)`` -> same as ``v`` (and
        the recurrent state after the sequence, with ``output_final_state``); ``initial_state``: the tokens
        continue that recurrent state; ``document_starts`` ``(B, N)``: each token's document start."""
        n = phi_q.shape[-2]
        if n == 0:
            return (v, state_after(phi_k, v, _table_len(rpe_table))) if output_final_state else v
        total = n + (0 if initial_state is None else initial_state.position)
        fft_dtype = torch.float32 if total <= self.fft_fp32_max_len else torch.float64
        # a forced fft cannot continue a state holding far keys: continuing takes the exact auto choice
        method = "auto" if initial_state is not None and self.method == "fft" else self.method
        return kernelized_attention(phi_q, phi_k, v, rpe_table, method=method, fft_dtype=fft_dtype,
                                    cpu_threads=self.cpu_threads, output_final_state=output_final_state,
                                    initial_state=initial_state, document_starts=document_starts)

    def attend_heads(self, q, k, v, rpe_table, key_mask=None, document_starts=None):
        half = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else None
        phi_q, phi_k, v = self.feature_map_qkv(q, k, v)
        if half is not None:  # half activations (bf16 training): the op gets half inputs, its fused matmuls
            phi_q, phi_k, v = phi_q.to(half), phi_k.to(half), v.to(half)  # then run on tensor cores
        phi_k, v = _mask_keys(phi_k, v, key_mask)
        return self.attend(phi_q, phi_k, v, rpe_table, document_starts=document_starts)

    def new_cache(self) -> KernelizedLayerCache:
        return KernelizedLayerCache()

    def attend_cached(self, x, rpe_table, cache: KernelizedLayerCache, key_mask=None):
        phi_q, phi_k, v = self.features(x)
        phi_k, v = _mask_keys(phi_k, v, key_mask)
        if cache.state is None or x.shape[1] > 1:  # a prompt (or more tokens): the parallel op, from the state
            o, cache.state = self.attend(phi_q, phi_k, v, rpe_table, output_final_state=True,
                                         initial_state=cache.state)
            return o
        o, cache.state = kernelized_attention_step(phi_q[:, :, 0], phi_k[:, :, 0], v[:, :, 0], cache.state,
                                                   rpe_table, in_place=True)  # the cache owns its state
        return o[:, :, None]


def _table_len(rpe_table: torch.Tensor | None) -> int:
    return 1 if rpe_table is None else rpe_table.shape[-1]


def _mask_keys(phi_k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """Zero the features and values of pad keys (``key_mask`` ``(B, N)`` False): they then add nothing. A
    ``where``, not a product, so that nothing a pad token computed (even a non-finite value) leaks through."""
    if key_mask is None:
        return phi_k, v
    keep = key_mask[:, None, :, None]
    zero = torch.zeros((), dtype=phi_k.dtype, device=phi_k.device)
    return torch.where(keep, phi_k, zero), torch.where(keep, v, zero.to(v.dtype))


class SoftmaxAttention(_Attention):
    """Exact causal softmax attention (SDPA), ``softmax(q.k / sqrt(head_dim) + b(i - j))`` with an RPE table,
    or plain causal when the table is None."""

    max_bias_elements: int = 2 ** 26
    """With an RPE bias, queries are processed in chunks so that the materialised bias ``(H, chunk, N)`` has at
    most this many elements (256 MiB in float32) instead of ``H N^2`` (128 GiB for 8 heads at 64k tokens)."""

    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Nothing to redraw (present so every attention layer has the same interface)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpe_table: torch.Tensor | None,
               key_mask: torch.Tensor | None = None, start: int = 0,
               document_starts: torch.Tensor | None = None) -> torch.Tensor:
        """Causal SDPA: queries ``q`` ``(B, H, n, head_dim)`` at positions ``start .. start + n - 1`` over keys
        ``k``, ``v`` ``(B, H, start + n, head_dim)`` at positions ``0 ..`` -> ``(B, H, n, head_dim)``.
        ``key_mask`` ``(B, start + n)``: False at padding. ``document_starts`` ``(B, start + n)``: each token's
        document start (keys before a query's are masked)."""
        n, total = q.shape[-2], k.shape[-2]
        if n == 0:
            return q
        if rpe_table is None and key_mask is None and document_starts is None and start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        rows = q.shape[1] * (1 if document_starts is None and key_mask is None else q.shape[0])
        chunk = max(1, self.max_bias_elements // (rows * total))
        pos = torch.arange(total, device=q.device)
        outs = []
        for s in range(0, n, chunk):
            e = min(s + chunk, n)  # queries [start + s, start + e) see keys [0, start + e)
            mask = _attention_mask(rpe_table, pos[start + s:start + e], pos[:start + e],
                                   None if key_mask is None else key_mask[:, :start + e], q.dtype, document_starts)
            outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :start + e], v[:, :, :start + e],
                                                       attn_mask=mask))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def attend_heads(self, q, k, v, rpe_table, key_mask=None, document_starts=None):
        return self.attend(q, k, v, rpe_table, key_mask, document_starts=document_starts)

    def new_cache(self) -> SoftmaxLayerCache:
        return SoftmaxLayerCache()

    def attend_cached(self, x, rpe_table, cache: SoftmaxLayerCache, key_mask=None):
        q, k, v = self.qkv(x)
        start = cache.length
        valid = key_mask if key_mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        k_all, v_all, valid_all = cache.append(k, v, valid)
        cache.padded = cache.padded or key_mask is not None  # known on the host: no need to read the mask
        return self.attend(q, k_all, v_all, rpe_table, valid_all if cache.padded else None, start)


def _attention_mask(rpe_table: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    key_mask: torch.Tensor | None, dtype: torch.dtype,
                    document_starts: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA's ``attn_mask`` for queries ``q_pos`` over keys ``k_pos``: the RPE bias with the causal mask
    (``(H, nq, nk)`` / ``(nq, nk)`` float), or the causal mask alone (bool); with ``key_mask`` ``(B, nk)`` pad keys
    are masked too, except a query's own key (a pad query attends to itself: no row is empty) -> ``(B, H or 1,
    nq, nk)``; with ``document_starts`` ``(B, N)`` keys before the query's document start are masked (the op's
    semantics, :func:`lm.ops.documents.document_mask`; a query always keeps its own key) -> ``(B, H or 1, nq,
    nk)``."""
    if rpe_table is not None:
        bias = relative_bias(rpe_table, q_pos, k_pos).to(dtype)
    else:
        bias = torch.zeros((), dtype=dtype, device=q_pos.device).expand(len(q_pos), len(k_pos)).masked_fill(
            q_pos[:, None] < k_pos[None, :], float("-inf"))
    if document_starts is not None:
        bias = bias if bias.dim() == 3 else bias[None]  # (H or 1, nq, nk)
        same = document_mask(document_starts, q_pos, k_pos)  # (B, nq, nk)
        bias = bias[None].masked_fill(~same[:, None], float("-inf"))
        if key_mask is None:
            return bias
        return bias.masked_fill(~(key_mask[:, None, None, :] | (q_pos[:, None] == k_pos[None, :])[None, None]),
                                float("-inf"))
    if key_mask is None:
        return bias
    bias = bias if bias.dim() == 3 else bias[None]  # (H or 1, nq, nk)
    keep = key_mask[:, None, None, :] | (q_pos[:, None] == k_pos[None, :])[None, None]
    return bias[None].masked_fill(~keep, float("-inf"))


def build_attention(cfg: ModelConfig) -> KernelizedAttention | SoftmaxAttention:
    """The attention layer for ``cfg.attention.kind``."""
    if cfg.attention.kind == "softmax":
        return SoftmaxAttention(cfg)
    return KernelizedAttention(cfg)
