#!/usr/bin/env python
"""Training throughput (tokens/s) of softmax vs kernelized attention with RPE, same small model, one run.

    python tools/bench_train.py [--contexts 512,4096] [--tokens-per-step 4096] [--steps 3] [--repeats 3]
    python tools/bench_train.py --device cuda --precision bf16

Every variant trains through the same code path as tools/train.py (the plain-torch engine: forward, backward,
AdamW step) on random token ids, with the same number of tokens per step at every context (batch =
tokens_per_step / context). Variants are measured round-robin, ``--repeats`` times each, and the median is kept,
so a machine whose load changes during the run biases them all alike; the ``vs softmax`` column is the ratio to
softmax at the same context in this run. Variants: ``softmax`` (SDPA + the same per-offset RPE as a bias),
``kernelized_rpe`` (per-offset RPE over the whole context: the FFT path at long context) and
``kernelized_rpe_clip128`` (RPE clipped at offset 128: the band path). Prints a table and writes JSON (--json).

Also reported: the peak memory of a step above what the engines hold between steps (CUDA; ``-`` on CPU), and
the model FLOP rate (:func:`model_flops_per_token` x tokens/s), as a fraction of ``--peak-tflops`` when given
(the model FLOP utilisation, MFU). A variant that runs out of GPU memory is reported as such and the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from lm.config import load_config
from lm.fileio import atomic_write_text
from lm.training.engine import DistInfo, TorchEngine
from lm.model import Transformer

VARIANTS = {
    "softmax": ["model.attention.kind=softmax"],
    "kernelized_rpe": ["model.attention.kind=kernelized_rpe"],
    "kernelized_rpe_clip128": ["model.attention.kind=kernelized_rpe", "model.attention.rpe_max_distance=128"],
}


def build(variant: str, context: int, args, device: torch.device) -> TorchEngine:
    batch = max(1, args.tokens_per_step // context)
    overrides = [f"model.vocab_size={args.vocab}", f"model.n_layers={args.layers}", f"model.d_model={args.d_model}",
                 f"model.n_heads={args.heads}", f"model.d_ff={4 * args.d_model}", "model.dropout=0.0",
                 f"model.attention.num_features={args.features}", f"model.attention.rpe_max_distance={context}",
                 f"data.seq_len={context}", "data.source=synthetic", f"batch_size={batch}",
                 f"micro_batch_size={batch}", f"compute.precision={args.precision}", *VARIANTS[variant]]
    cfg = load_config([], overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    return TorchEngine(cfg, model, DistInfo("torch", 0, 1, 0, device))


def time_steps(engine: TorchEngine, context: int, steps: int, vocab: int) -> tuple[float, int | None]:
    """(seconds per optimizer step over ``steps`` steps (after the warm-up step the caller ran), peak bytes
    allocated during them above what was allocated before (CUDA; None on CPU))."""
    batch = engine.cfg.batch_size
    data = torch.randint(0, vocab, (steps, batch, context + 1))
    cuda = engine.info.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(steps):
        engine.train_step([data[s]], batch * context, lr=1e-4)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return seconds, (torch.cuda.max_memory_allocated() - before) if cuda else None


def model_flops_per_token(model: Transformer, context: int) -> float:
    """Model FLOPs of one training token at ``context`` (forward + backward = 3 x forward; a multiply-add counts
    2): 6 per weight of every layer's matmuls and of the output layer (tied to the embedding), plus attention's
    own per layer: softmax ``6 T d`` (the causal halves of ``QK^T`` and ``PV``), kernelized attention its random
    features of q and k (``12 d M``) and its linear-attention mixing (``12 M (d / H + 1) H``). What the RPE adds
    on top (the exact band, the FFT) is not counted: tools/bench_attention.py measures it against its own
    roofline."""
    cfg = model.cfg
    d, heads, M = cfg.d_model, cfg.n_heads, cfg.attention.num_features
    weights = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2) + model.tok_emb.weight.numel()
    if cfg.attention.kind == "softmax":
        attention = 6 * context * d
    else:
        attention = 12 * d * M + 12 * M * (d // heads + 1) * heads
    return 6.0 * weights + cfg.n_layers * attention


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def release(device: torch.device) -> None:
    """Free what a dropped engine held (after running out of memory)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="512,4096")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per variant (median kept)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s in --precision (e.g. a measured bf16 matmul): prints the MFU")
    p.add_argument("--json", default="bench_results/train.json", help="where to write the results")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")

    results = []
    for context in contexts:
        engines, failed = {}, {}
        for v in variants:  # build, then one warm-up step: allocations, FFT plans, autotuning
            try:
                engines[v] = build(v, context, args, device)
                time_steps(engines[v], context, 1, args.vocab)
            except RuntimeError as e:
                if not out_of_memory(e):
                    raise
                engines.pop(v, None)
                failed[v] = "out of memory"
                release(device)
        times, peaks = {v: [] for v in engines}, {v: [] for v in engines}
        for _ in range(args.repeats):
            for v in list(engines):
                try:
                    sec, peak = time_steps(engines[v], context, args.steps, args.vocab)
                except RuntimeError as e:
                    if not out_of_memory(e):
                        raise
                    del engines[v]
                    failed[v] = "out of memory"
                    release(device)
                    continue
                times[v].append(sec)
                peaks[v].append(peak)
        for v in variants:
            batch = max(1, args.tokens_per_step // context)
            if v in failed:
                results.append({"context": context, "variant": v, "batch": batch, "skipped": failed[v]})
                continue
            sec = statistics.median(times[v])
            flops = model_flops_per_token(engines[v].module, context)
            results.append({"context": context, "variant": v, "batch": engines[v].cfg.batch_size,
                            "sec_per_step": sec, "tokens_per_s": engines[v].cfg.batch_size * context / sec,
                            "peak_mem_bytes": None if peaks[v][0] is None else max(peaks[v]),
                            "flops_per_token": flops,
                            "tflops": flops * engines[v].cfg.batch_size * context / sec / 1e12})
        del engines
        release(device)

    threads = torch.get_num_threads()
    print(f"training throughput on {device} ({threads} threads), {args.layers} layers, d_model {args.d_model}, "
          f"{args.heads} heads, {args.features} features, {args.tokens_per_step} tokens/step, {args.precision}")
    print(f"{'context':>8} {'variant':<24} {'batch':>5} {'s/step':>8} {'tokens/s':>10} {'vs softmax':>10} "
          f"{'peak MiB':>9} {'TFLOP/s':>8}" + (f" {'MFU':>6}" if args.peak_tflops else ""))
    for r in results:
        if "skipped" in r:
            print(f"{r['context']:>8} {r['variant']:<24} {r['batch']:>5} skipped: {r['skipped']}")
            continue
        base = next((b for b in results if b["context"] == r["context"] and b["variant"] == "softmax"
                     and "tokens_per_s" in b), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        peak = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:,.0f}"
        if args.peak_tflops:
            r["mfu"] = r["tflops"] / args.peak_tflops
        print(f"{r['context']:>8} {r['variant']:<24} {r['batch']:>5} {r['sec_per_step']:>8.3f} "
              f"{r['tokens_per_s']:>10,.0f} {ratio:>10} {peak:>9} {r['tflops']:>8.3f}"
              + (f" {r['mfu']:>6.1%}" if args.peak_tflops else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps({"device": str(device), "threads": threads, "args": vars(args),
                                                 "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
