"""Decoder-only Transformer: token embedding (tied to the output), pre-norm blocks of attention + GELU MLP,
final LayerNorm. Built only from :class:`lm.config.model.ModelConfig`; knows nothing of devices, launchers or files.

Positions: ``kernelized_rpe`` and ``softmax`` (with RPE) use the relative bias of :mod:`lm.model.rpe` only;
``kernelized`` (no RPE) adds sinusoidal absolute positions, which extend past the training length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm.config.model import ModelConfig
from lm.model.attention import KernelizedAttention, build_attention
from lm.model.cache import ModelCache
from lm.model.rpe import BucketedRPE, PerOffsetRPE
from lm.ops.precision import far_field_risk, updated_policy

__all__ = ["Transformer", "Block", "sinusoidal_positions", "INIT_STD"]

INIT_STD = 0.02
"""GPT-2 initialisation: weights ~ normal(0, INIT_STD); residual output projections / sqrt(2 n_layers)."""


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s sinusoids for ``positions`` of any shape ``(...)`` -> ``(..., dim)`` float32, each
    component with RMS ``INIT_STD`` (the token embeddings' scale at initialisation, so neither swamps the other)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float64) * (-math.log(10000.0) / half))
    angle = positions.to(torch.float64)[..., None] * freq
    pe = torch.zeros(*positions.shape, dim, dtype=torch.float64, device=positions.device)
    pe[..., 0:2 * half:2], pe[..., 1:2 * half:2] = torch.sin(angle), torch.cos(angle)
    return (pe * (INIT_STD * math.sqrt(2.0))).float()


def build_rpe(cfg: ModelConfig) -> nn.Module | None:
    """The RPE module of one layer (``(H, L)`` table), or of all layers when shared (``(L,)`` table)."""
    a = cfg.attention
    if a.kind == "kernelized" or a.rpe == "none":
        return None
    heads = None if a.rpe_shared else cfg.n_heads
    if a.rpe == "per_offset":
        return PerOffsetRPE(heads, a.rpe_max_distance)
    return BucketedRPE(heads, a.rpe_num_buckets, a.rpe_max_distance)


class MLP(nn.Module):
    """``(B, N, d_model)`` -> same: Linear(d_model, d_ff), GELU, Linear(d_ff, d_model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + drop(attn(ln(x)))`` then ``x + drop(mlp(ln(x)))``; ``(B, N, d)`` -> same.
    ``cache``, ``shard``, ``key_mask`` and ``document_starts`` go to the attention layer (see its ``forward``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = build_attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rpe_table: torch.Tensor | None = None, *, cache=None, shard=None,
                key_mask: torch.Tensor | None = None, document_starts: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rpe_table, cache=cache, shard=shard, key_mask=key_mask,
                                    document_starts=document_starts))
        return x + self.drop(self.mlp(self.norm2(x)))


def _refresh_after_load(module: "Transformer", incompatible_keys) -> None:
    """``load_state_dict`` post-hook: new RPE tables, new FFT precision policy (a function, so models pickle)."""
    module.refresh_precision_policy()


def _check_document_starts(starts: torch.Tensor, ids: torch.Tensor, shard, cache, key_mask, positions) -> None:
    """Shapes and combinations only (values would need a host read)."""
    if cache is not None or key_mask is not None or positions is not None:
        raise ValueError("document_starts is for packed training and scoring windows: not with a decoding cache, "
                         "key_mask or positions (decode or pad one document at a time)")
    n = ids.shape[1] * (1 if shard is None else shard.size)
    if starts.dtype not in (torch.int32, torch.int64) or tuple(starts.shape) != (ids.shape[0], n):
        raise ValueError(f"document_starts must be an integer tensor of shape (B, N) = ({ids.shape[0]}, {n}) (the "
                         f"whole sequence, also under sequence parallelism), got {starts.dtype} "
                         f"{tuple(starts.shape)}")


class Transformer(nn.Module):
    """Decoder-only LM: ``forward(ids (B, N) long) -> logits (B, N, vocab_size) float32``.

    Construction allocates parameters (PyTorch default init) and draws feature projections from the global
    RNG; call :meth:`init_weights` for the GPT-2 initialisation. Set ``activation_checkpointing = True`` to
    recompute each block in backward (training only). Parameters may be cast to bf16/fp16: the attention op
    upcasts internally and logits are returned in float32.

    FFT precision policy: :meth:`refresh_precision_policy` derives each kernelized layer's
    ``fft_fp32_max_len`` from its RPE table (one host read for all layers). Training calls it once per optimizer
    step, ``load_state_dict`` calls it itself; in eager mode ``forward`` also calls it when the RPE parameters
    changed since the last refresh (their version counters say so, without reading values), so a hand-written
    loop with a torch optimizer stays accurate. Writes through ``param.data`` (as DeepSpeed's ZeRO does) do not
    move version counters, and under ``torch.compile`` the check is skipped: refresh explicitly after each step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it > 0 (training fills it in from the "
                             f"tokenizer before building the model)")
        self.cfg = cfg
        self.activation_checkpointing = False
        self.absolute_positions = cfg.attention.kind == "kernelized"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        # RPE modules: one per layer, or one shared by every layer (as in the paper); none without RPE.
        shared = cfg.attention.rpe_shared
        rpes = [build_rpe(cfg) for _ in range(1 if shared else cfg.n_layers)]
        self.rpe = nn.ModuleList(r for r in rpes if r is not None)
        self._policy_versions = self._rpe_versions()  # the default policy fits the zero tables of construction
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def rpe_tables(self, n: int | None = None) -> list[torch.Tensor | None]:
        """Each layer's RPE table for a sequence of ``n`` tokens (``None``: the full table); None without RPE."""
        if len(self.rpe) == 0:
            return [None] * len(self.blocks)
        tables = [r.full_table() if n is None else r.table(n) for r in self.rpe]
        return tables * len(self.blocks) if len(tables) == 1 else tables

    def _rpe_versions(self) -> tuple | None:
        """Version counters and devices of the RPE parameters: they change with every in-place update."""
        try:
            return tuple((p._version, p.device, p.data_ptr()) for p in self.rpe.parameters())
        except RuntimeError:  # inference tensors have no version counter: treat the policy as always stale
            return None

    @torch.no_grad()
    def refresh_precision_policy(self) -> None:
        """Set every kernelized layer's ``fft_fp32_max_len`` from its current RPE table (see
        ``lm.ops.precision``): one device-to-host copy for all layers. A no-op on the ``meta`` device."""
        layers = [b.attn for b in self.blocks if isinstance(b.attn, KernelizedAttention)]
        tables = [t for t in self.rpe_tables() if t is not None] if layers else []
        if tables and tables[0].device.type != "meta":
            unique = [r.full_table() for r in self.rpe]
            rows = torch.stack([far_field_risk(t) for t in unique]).tolist()  # the one host read
            rows = rows * len(layers) if len(rows) == 1 else rows
            for attn, risks in zip(layers, rows):
                attn.fft_fp32_max_len = updated_policy(attn.fft_fp32_max_len, risks)
        self._policy_versions = self._rpe_versions()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation from the global RNG: normal(INIT_STD) linear and embedding weights, residual
        output projections normal(INIT_STD / sqrt(2 n_layers)), zero biases, unit LayerNorms, zero RPE (no
        positional preference at the start); random features redrawn from ``generator`` (global RNG if None)."""
        out_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=INIT_STD)
        for block in self.blocks:
            block.attn.reset_parameters(INIT_STD, out_std)
            nn.init.normal_(block.mlp.fc.weight, std=INIT_STD)
            nn.init.zeros_(block.mlp.fc.bias)
            nn.init.normal_(block.mlp.proj.weight, std=out_std)
            nn.init.zeros_(block.mlp.proj.bias)
            for norm in (block.norm1, block.norm2):
                norm.reset_parameters()
        self.norm.reset_parameters()
        for r in self.rpe:
            r.reset_parameters()
        self.redraw_features(generator)
        self.refresh_precision_policy()

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Redraw every layer's random feature projection (layer by layer from one ``generator``, so the same
        seed gives the same features on every rank). No-op for deterministic feature maps and softmax."""
        for block in self.blocks:
            block.attn.redraw_features(generator)

    def new_cache(self, batch_size: int) -> ModelCache:
        """An empty decoding cache for ``batch_size`` sequences (pass it to :meth:`forward` as ``cache``)."""
        return ModelCache([block.attn.new_cache() for block in self.blocks], 0, batch_size)

    def embed(self, ids: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``ids`` ``(B, N)`` -> ``(B, N, d_model)``: token embedding, plus absolute positions (``kernelized``
        only) ``positions`` ``(B, N)`` / ``(N,)``, by default ``start_pos .. start_pos + N - 1``."""
        x = self.tok_emb(ids)
        if self.absolute_positions:
            if positions is None:
                positions = torch.arange(start_pos, start_pos + ids.shape[1], device=ids.device)
            x = x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)
        return self.drop(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, d_model)`` -> float32 logits ``(B, N, vocab_size)`` (output weights tied to the embedding)."""
        return F.linear(self.norm(x), self.tok_emb.weight).float()

    def forward(self, ids: torch.Tensor, shard=None, *, cache: ModelCache | None = None,
                key_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                document_starts: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """``ids`` ``(B, N)`` long token ids -> logits ``(B, N, vocab_size)`` float32; position ``i`` sees ``<= i``.

        Sequence parallel (``shard``, a :class:`lm.training.distributed.SequenceShard` of ``P`` ranks): ``ids``
        ``(B, n)`` is this rank's block of a sequence of ``N = n P`` tokens, starting at token ``shard.rank * n``;
        the logits are those of the block's tokens. Embeddings, norms, MLPs and the output layer work on the
        block; absolute positions are the block's global ones; attention sees the whole sequence (see
        :class:`lm.model.attention._Attention`), so the logits equal the unsharded model's on the same tokens.

        Decoding (``cache``, from :meth:`new_cache`; the model in eval mode): ``ids`` are the next tokens after
        the ``cache.position`` the cache holds (all of a prompt first, then one at a time); the logits equal
        those of a full forward over every token so far, and the cache is advanced.

        ``key_mask`` ``(B, N)`` bool: False at padding tokens, which then take no part in the attention of the
        others (a left-padded batch gives each row what it gets alone). ``positions``: the absolute positions of
        ``kernelized`` models, ``(B, N)`` (e.g. counting only real tokens) or ``(N,)``; RPE offsets are the
        distances in the batch. ``logits_to_keep`` > 0 returns only the last that many positions' logits.

        ``document_starts`` ``(B, N)`` int (``N`` the whole sequence, also under ``shard``): for each token, the
        position where its document starts (:func:`lm.data.batches.document_starts`); every attention layer then
        lets a token see only the tokens of its own document (the op's ``document_starts``, or the same mask for
        softmax), and absolute positions count from the document's start. Not with ``cache``, ``key_mask`` or
        ``positions``. The logits of a packed row then equal those of each document run alone.
        """
        if ids.ndim != 2 or ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"Transformer.forward expects token ids of shape (B, N) and dtype long, got "
                             f"{tuple(ids.shape)} {ids.dtype}")
        if cache is not None:
            if shard is not None:
                raise ValueError("Transformer.forward takes a decoding cache or a sequence-parallel shard, not both")
            if self.training:
                raise ValueError("decoding with a cache needs the model in eval mode (dropout would make steps "
                                 "disagree): call model.eval() first")
            if len(cache.layers) != len(self.blocks) or cache.batch_size != ids.shape[0]:
                raise ValueError(f"the cache holds {len(cache.layers)} layers x {cache.batch_size} sequences, the "
                                 f"call {len(self.blocks)} layers x {ids.shape[0]}: build it with "
                                 f"model.new_cache({ids.shape[0]})")
        if document_starts is not None:
            _check_document_starts(document_starts, ids, shard, cache, key_mask, positions)
        if key_mask is not None and tuple(key_mask.shape) != tuple(ids.shape):
            raise ValueError(f"key_mask must have the shape of ids {tuple(ids.shape)}, got {tuple(key_mask.shape)}")
        if not torch.compiler.is_compiling() and self._rpe_versions() != self._policy_versions:
            self.refresh_precision_policy()  # eager only: the RPE changed since the last refresh
        parts, part = (1, 0) if shard is None else (shard.size, shard.rank)
        start = cache.position if cache is not None else part * ids.shape[1]
        if document_starts is not None and self.absolute_positions:  # positions restart with each document
            block = torch.arange(start, start + ids.shape[1], device=ids.device)
            positions = block - document_starts[:, start:start + ids.shape[1]]
        x = self.embed(ids, start_pos=start, positions=positions)
        if ids.shape[1] > 0:
            # decoding needs each whole table (the state outlives this call); a pass over N tokens reads N entries
            tables = self.rpe_tables(None if cache is not None else ids.shape[1] * parts)
            mask = None if key_mask is None else key_mask.to(torch.bool)
            for block, table, layer_cache in zip(self.blocks, tables, [None] * len(tables) if cache is None else cache.layers):
                if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, table, shard=shard, key_mask=mask, document_starts=document_starts,
                                   use_reentrant=False)
                else:
                    x = block(x, table, cache=layer_cache, shard=shard, key_mask=mask,
                              document_starts=document_starts)
        if cache is not None:
            cache.position += ids.shape[1]
        return self.head(x[:, -logits_to_keep:] if logits_to_keep > 0 else x)
