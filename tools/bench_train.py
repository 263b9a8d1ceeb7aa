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
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lm.config import load_config
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


def time_steps(engine: TorchEngine, context: int, steps: int, vocab: int) -> float:
    """Seconds per optimizer step over ``steps`` steps (after the warm-up step the caller ran)."""
    batch = engine.cfg.batch_size
    data = torch.randint(0, vocab, (steps, batch, context + 1))
    sync = torch.cuda.synchronize if engine.info.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(steps):
        engine.train_step([data[s]], batch * context, lr=1e-4)
    sync()
    return (time.perf_counter() - t0) / steps


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
        engines = {v: build(v, context, args, device) for v in variants}
        for v, e in engines.items():  # warm-up: allocations, FFT plans, autotuning
            time_steps(e, context, 1, args.vocab)
        times = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v, e in engines.items():
                times[v].append(time_steps(e, context, args.steps, args.vocab))
        for v in variants:
            sec = statistics.median(times[v])
            results.append({"context": context, "variant": v, "batch": engines[v].cfg.batch_size,
                            "sec_per_step": sec, "tokens_per_s": engines[v].cfg.batch_size * context / sec})
        del engines

    threads = torch.get_num_threads()
    print(f"training throughput on {device} ({threads} threads), {args.layers} layers, d_model {args.d_model}, "
          f"{args.heads} heads, {args.features} features, {args.tokens_per_step} tokens/step, {args.precision}")
    print(f"{'context':>8} {'variant':<24} {'batch':>5} {'s/step':>8} {'tokens/s':>10} {'vs softmax':>10}")
    for r in results:
        base = next((b for b in results if b["context"] == r["context"] and b["variant"] == "softmax"), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"{r['context']:>8} {r['variant']:<24} {r['batch']:>5} {r['sec_per_step']:>8.3f} "
              f"{r['tokens_per_s']:>10,.0f} {ratio:>10}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "threads": threads, "args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
