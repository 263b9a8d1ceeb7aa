#!/usr/bin/env python
"""Per-GPU memory and all-to-all traffic of sequence-parallel training, from shapes alone (no GPU needed).

    python tools/bench_sp_memory.py configs/wikitext103_32k.yaml [--sp 1,2,4,8] [key=value ...]

For each sequence-parallel size P (one sequence-parallel group, no data parallelism, micro-batch B from the
config) it prints, per GPU:

- ``params``: model states under DeepSpeed: weights and gradients in the training precision, plus the fp32 master
  copy (bf16/fp16 only) and AdamW's two moments, partitioned over all ranks from ZeRO stage 1 on (counted);
- ``kept``: activations kept from forward to backward for all layers: counted by running the training forward on
  the ``meta`` device with ``saved_tensors_hooks`` (every tensor autograd saves, once per storage), the attention's
  all-to-all replaced by a reshape of the same shapes; with activation checkpointing this is the block inputs plus
  the output layer's;
- ``1 block``: what autograd saves while one block is recomputed in backward (the same count, one block, no
  checkpointing): the peak of recomputation on top of ``kept``;
- ``op ws``: the attention op's largest workspace in backward, from its budget constants: the FFT far field's tile
  (``lm.ops.fft.FFT_WORKSPACE_BYTES``) times about 6 for the buffers of a backward step (the estimate in
  ``lm/ops/fft.py``), plus four score pieces of the exact near band (``lm.ops.band``);
- ``a2a/layer``: bytes each rank sends per layer and micro-step: 4 all-to-alls forward (q, k, v, output), 4 in
  backward, and 4 again when activation checkpointing recomputes the forward; each sends ``(P-1)/P`` of a
  ``(B, N/P, d_model)`` tensor in the training precision.

Counted numbers are exact for the shapes; ``op ws`` is an estimate, and temporaries that autograd does not save
(e.g. the fp32 copy of the logits inside the loss), allocator slack, the CUDA context and DeepSpeed's
communication buckets are not included.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from lm.config import load_config
from lm.model import Transformer
from lm.ops import band, fft
from lm.ops.precision import NEAR_BAND


class ShapeShard:
    """Stands in for :class:`lm.training.distributed.SequenceShard` on one process: the all-to-all becomes a reshape with the
    same input and output shapes (values are meaningless, which the ``meta`` device never looks at)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def tokens(self, x):
        n = x.shape[1] // self.size
        return x[:, self.rank * n:(self.rank + 1) * n]

    def attention(self, q, k, v, local):
        B, n, H, d = q.shape
        P = self.size

        def gather(x):  # (B, n, H, d) -> (B, n P, H / P, d)
            return x.reshape(B, n, P, H // P, d).transpose(1, 2).reshape(B, n * P, H // P, d)
        o = local(gather(q), gather(k), gather(v))  # (B, N, H / P, d)
        return o.reshape(B, P, n, H // P, d).transpose(1, 2).reshape(B, n, H, d)


@contextlib.contextmanager
def saved_bytes(out: list):
    """Count the bytes of every distinct storage autograd saves for backward inside the block into ``out[0]``."""
    seen = set()

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            out[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def model_state_bytes(cfg, params: int, world: int) -> float:
    low = cfg.compute.precision in ("bf16", "fp16")
    weights = (2 if low else 4) * params
    grads = (2 if low else 4) * params
    master_and_moments = ((4 if low else 0) + 8) * params
    if cfg.deepspeed.zero_stage >= 1 or low:  # ZeRO 1/2 and DeepSpeed's bf16 optimizer partition over all ranks
        master_and_moments /= world
    return weights + grads + master_and_moments


def op_workspace_bytes(B: int, heads: int, N: int, M: int, D: int) -> float:
    """FFT far field (largest tile x 6 in backward) + 4 near-band score pieces, on the batched (GPU) schedule."""
    items, E = B * heads, D + 1
    nfft = fft.fft_size(2 * N - 1)
    pc, mc, ec = fft.tile_shape(items, M, E, nfft, fft.FFT_WORKSPACE_BYTES // 4)
    fft_ws = 6 * pc * mc * ec * nfft * 4
    lay = band.BandLayout(N, NEAR_BAND + 1, "meta")
    piece = lay.group(items, band.BAND_WORKSPACE_BATCHED) * items * lay.T * lay.T * 4
    return fft_ws + 4 * piece


def measure(cfg, P: int) -> dict:
    m, B, N = cfg.model, cfg.micro_batch_size, cfg.data.seq_len
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.compute.precision]
    with torch.device("meta"):
        model = Transformer(m).to(dtype).train()
    params = sum(p.numel() for p in model.parameters())
    shard = ShapeShard(0, P) if P > 1 else None
    ids = torch.zeros(B, N // P, dtype=torch.long, device="meta")
    tables = model.rpe_tables(N)

    def forward_kept(checkpointing: bool) -> int:
        model.activation_checkpointing = checkpointing
        count = [0]
        with saved_bytes(count):
            logits = model(ids, shard=shard)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")
        return count[0]

    kept = forward_kept(cfg.compute.activation_checkpointing)
    block = [0]
    x = torch.zeros(B, N // P, m.d_model, dtype=dtype, device="meta", requires_grad=True)
    with saved_bytes(block):
        model.blocks[0](x, tables[0], shard=shard)
    itemsize = torch.empty((), dtype=dtype).element_size()
    a2a_one = B * (N // P) * m.d_model * itemsize * (P - 1) / P
    exchanges = 4 * (3 if cfg.compute.activation_checkpointing else 2)
    return {"P": P, "params": model_state_bytes(cfg, params, P), "kept": kept, "block": block[0],
            "op": op_workspace_bytes(B, m.n_heads // P, N, m.attention.num_features, m.d_model // m.n_heads),
            "a2a": exchanges * a2a_one, "param_count": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--sp", default="1,2,4,8", help="sequence-parallel sizes (comma-separated)")
    parser.add_argument("--vocab", type=int, default=16000, help="vocabulary size when the config takes it from "
                                                                 "the tokenizer (model.vocab_size=0)")
    args = parser.parse_args()
    cfg = load_config([args.config], [f"model.vocab_size={args.vocab}", *args.overrides])
    sizes = [int(s) for s in args.sp.split(",")]
    rows = [measure(cfg, P) for P in sizes]
    gib = 2 ** 30
    print(f"{args.config}: {rows[0]['param_count']:,} parameters, context {cfg.data.seq_len:,}, micro-batch "
          f"{cfg.micro_batch_size}, {cfg.compute.precision}, ZeRO {cfg.deepspeed.zero_stage}, activation "
          f"checkpointing {cfg.compute.activation_checkpointing}")
    print(f"{'SP':>3} {'tokens/GPU':>10} {'heads/GPU':>9} {'params GiB':>10} {'kept GiB':>9} {'1 block GiB':>11} "
          f"{'op ws GiB':>9} {'sum GiB':>8} {'a2a/layer MiB':>13}")
    for r in rows:
        total = r["params"] + r["kept"] + r["block"] + r["op"]
        print(f"{r['P']:>3} {cfg.data.seq_len // r['P']:>10,} {cfg.model.n_heads // r['P']:>9} "
              f"{r['params'] / gib:>10.3f} {r['kept'] / gib:>9.3f} {r['block'] / gib:>11.3f} {r['op'] / gib:>9.3f} "
              f"{total / gib:>8.2f} {r['a2a'] / 2 ** 20:>13.1f}")


if __name__ == "__main__":
    main()
