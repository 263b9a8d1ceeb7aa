#!/usr/bin/env python
"""Predicted GPU cost of one attention layer (the op, forward + backward) against FlashAttention-2, from shapes alone.

    python tools/bench_roofline.py [--json OUT] [--gpu-bandwidth 3.35e12 --gpu-bf16 989e12 ...]

Rows: every ``configs/*.yaml`` at its own context (per GPU: its micro-batch, and under sequence parallelism the
``n_heads / sp`` heads one GPU attends over for the whole sequence; bf16 configs hand the op bfloat16 features),
then N = 2k, 8k, 32k, 128k for general RPE (a table as long as the context), RPE clipped at L = 128 and no RPE
(B = 1, H = 8, M = D = 64, bfloat16). For each: what ``auto`` took on a GPU before the fused method (fixed
crossovers, float32 features) and its predicted time; the method ``auto`` picks now on a CUDA GPU with Triton,
its kernels, bytes, flops and predicted milliseconds (:mod:`lm.ops.cost`: a roofline of every kernel at the GPU's
bandwidth and 40% of its matmul peak), the best method without Triton (the torch-kernel methods, counted on
``meta``), and
FlashAttention-2's predicted time for the same shapes: ``7 B H N^2 D`` flops at 40% of the bfloat16 peak.
Prints a table and checks the goals: every shipped config that trains in bf16 at most 1.5x FlashAttention-2 at its
context (a float32 config is shown with its ratio: FlashAttention-2 has no float32, and its matmuls run on float32
units, 15x below the bfloat16 peak), clipped RPE at N >= 8k at most 0.3x, kernels per layer independent of N.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm.config import load_config  # noqa: E402
from lm.fileio import atomic_write_text  # noqa: E402
from lm.model import Transformer  # noqa: E402
from lm.ops.cost import GPU, Shape, candidates, cheapest, fa2_cost, method_cost  # noqa: E402

GRID_N = (2048, 8192, 32768, 131072)
CLIPPED_L = 128


def config_shape(path: Path) -> Shape | None:
    """The op's shape for one GPU training ``path``'s config (None for softmax attention)."""
    cfg = load_config([str(path)])
    m, a = cfg.model, cfg.model.attention
    if a.kind == "softmax":
        return None
    n = cfg.data.seq_len
    heads = m.n_heads // max(1, cfg.deepspeed.sequence_parallel_size)
    head_dim = m.d_model // m.n_heads
    features = a.num_features if a.feature_map in ("nprf", "prf") else head_dim
    with torch.device("meta"):
        table = Transformer(dataclasses.replace(m, vocab_size=max(m.vocab_size, 8))).rpe_tables(n)[0]
    L = None if table is None else min(table.shape[-1], n)
    dtype = torch.bfloat16 if cfg.compute.precision in ("bf16", "fp16") else torch.float32
    return Shape(cfg.micro_batch_size, heads, n, features, head_dim, L, dtype)


def previous_auto(n: int, num_offsets: int | None) -> str:
    """What ``auto`` took on a GPU before the fused method and the cost model: fixed crossovers carried over from
    the CPU (dense up to 512 tokens without RPE / 1,024 with, then the band while ``L + 64 <= 160 log2 N``, else
    the FFT). The model then handed the op float32 features, whatever the training precision."""
    if num_offsets is None:
        return "dense" if n <= 512 else "prefix"
    if n <= 1024 and 4 * num_offsets > n:
        return "dense"
    return "band" if num_offsets + 64 <= 160 * math.log2(max(n, 2)) else "fft"


def kind_of(s: Shape) -> str:
    return "none" if s.L is None else ("general" if s.L >= s.N else "clipped")


def row(config: str | None, s: Shape, gpu: GPU) -> dict:
    method = cheapest(s.N, s.L, s.B * s.H, s.M, s.D, s.dtype, fused=True, gpu=gpu)
    cost = method_cost(method, s, gpu)
    torch_only = {m: method_cost(m, s, gpu) for m in candidates(s.L, False, False, fused=False)}
    best = min(torch_only, key=lambda m: torch_only[m].seconds)
    fa2 = fa2_cost(s.B, s.H, s.N, s.D, gpu)
    before_method = previous_auto(s.N, s.L)
    before = method_cost(before_method, s._replace(dtype=torch.float32), gpu)
    return {"before_method": before_method, "before_kernels": before.kernels, "before_predicted_ms": before.ms,
            "config": config, "kind": kind_of(s), "context": s.N, "method": method, "kernels": cost.kernels,
            "bytes": int(cost.bytes), "flops": int(cost.flops), "predicted_ms": cost.ms,
            "fa2_predicted_ms": fa2.ms, "batch": s.B, "heads": s.H, "features": s.M, "head_dim": s.D,
            "table": s.L, "dtype": str(s.dtype).replace("torch.", ""), "torch_only_method": best,
            "torch_only_kernels": torch_only[best].kernels, "torch_only_predicted_ms": torch_only[best].ms}


def build_rows(gpu: GPU, configs: list[Path], lengths=GRID_N) -> list[dict]:
    rows = []
    for path in configs:
        s = config_shape(path)
        if s is not None:
            rows.append(row(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path), s, gpu))
    for L in ("general", CLIPPED_L, None):
        for n in lengths:
            rows.append(row(None, Shape(1, 8, n, 64, 64, n if L == "general" else L, torch.bfloat16), gpu))
    return rows


def goals(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """(goal, met, detail) for the three targets of the fused method: shipped configs, clipped RPE, kernels."""
    ratio = {id(r): r["predicted_ms"] / r["fa2_predicted_ms"] for r in rows}
    cfg = [r for r in rows if r["config"] and r["dtype"] != "float32"] or rows
    worst = max(cfg, key=lambda r: ratio[id(r)])
    fp32 = [r for r in rows if r["config"] and r["dtype"] == "float32"]
    clipped = [r for r in rows if r["config"] is None and r["kind"] == "clipped" and r["context"] >= 8192]
    worst_clipped = max(clipped, key=lambda r: ratio[id(r)]) if clipped else None
    grid = [r for r in rows if r["config"] is None]
    kernels = {(r["kind"], r["method"]): set() for r in grid}
    for r in grid:
        kernels[(r["kind"], r["method"])].add(r["kernels"])
    varying = {k: v for k, v in kernels.items() if len(v) > 1}
    return [
        ("every shipped bf16 config <= 1.5x FlashAttention-2", ratio[id(worst)] <= 1.5,
         f"worst {ratio[id(worst)]:.2f}x ({worst['config']})" + "".join(
             f"; float32 config {r['config']}: {ratio[id(r)]:.1f}x (FlashAttention-2 has no float32)" for r in fp32)),
        ("clipped RPE at N >= 8k <= 0.3x FlashAttention-2",
         worst_clipped is not None and ratio[id(worst_clipped)] <= 0.3,
         "no such row" if worst_clipped is None else
         f"worst {ratio[id(worst_clipped)]:.2f}x (N = {worst_clipped['context']:,})"),
        ("kernels per layer independent of N", not varying,
         "kernels per (kind, method): " + ", ".join(f"{k[0]}/{k[1]} {sorted(v)}" for k, v in kernels.items())),
    ]


def table(rows: list[dict]) -> str:
    head = ("| config | kind | N | B x H | M, D | dtype | before: auto (kernels) | ms | x FA2 | now: auto | kernels "
            "| GB | GFLOP | ms | x FA2 | FA2 ms | without Triton | ms | x FA2 |")
    lines = [head, "|" + "---|" * 19]
    for r in rows:
        fa2 = r["fa2_predicted_ms"]
        lines.append(f"| {r['config'] or ''} | {r['kind']}{'' if r['kind'] != 'clipped' else ' ' + str(r['table'])} "
                     f"| {r['context']:,} | {r['batch']} x {r['heads']} | {r['features']}, {r['head_dim']} "
                     f"| {r['dtype']} | {r['before_method']} ({r['before_kernels']}) | {r['before_predicted_ms']:.4g} "
                     f"| {r['before_predicted_ms'] / fa2:.1f} | {r['method']} | {r['kernels']} "
                     f"| {r['bytes'] / 1e9:.3g} | {r['flops'] / 1e9:,.4g} | {r['predicted_ms']:.4g} "
                     f"| {r['predicted_ms'] / fa2:.2f} | {fa2:.4g} "
                     f"| {r['torch_only_method']} ({r['torch_only_kernels']}) | {r['torch_only_predicted_ms']:.4g} "
                     f"| {r['torch_only_predicted_ms'] / fa2:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write {gpu, rows, goals} here")
    p.add_argument("--configs", type=Path, nargs="*", default=sorted((REPO / "configs").glob("*.yaml")))
    p.add_argument("--n", type=int, nargs="+", default=list(GRID_N), help="lengths of the grid rows")
    for field in dataclasses.fields(GPU):
        if field.name != "name":
            p.add_argument(f"--gpu-{field.name}", type=float, default=field.default,
                           help=f"(default {field.default:g})")
    p.add_argument("--gpu-name", default=GPU.name)
    args = p.parse_args(argv)
    gpu = GPU(**{f.name: getattr(args, f"gpu_{f.name}") for f in dataclasses.fields(GPU)})
    rows = build_rows(gpu, args.configs, args.n)
    print(f"GPU: {gpu.name}, {gpu.bandwidth / 1e12:g} TB/s, bf16 {gpu.bf16 / 1e12:g} / tf32 {gpu.tf32 / 1e12:g} / "
          f"fp32 {gpu.fp32 / 1e12:g} TFLOP/s, {gpu.efficiency:.0%} of peak in matmul kernels; one attention layer, "
          "forward + backward")
    print(table(rows))
    met = goals(rows)
    for name, ok, detail in met:
        print(f"goal: {name}: {'met' if ok else 'NOT met'} ({detail})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps({"gpu": dataclasses.asdict(gpu), "rows": rows,
                                                 "goals": [{"goal": n, "met": ok, "detail": d} for n, ok, d in met]},
                                                indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
