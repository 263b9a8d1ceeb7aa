#!/usr/bin/env python
"""Decoding speed and memory against context length: clipped RPE vs general RPE vs softmax with a KV cache.

    python tools/bench_generate.py [--contexts 1024,2048,...,65536] [--rounds 16] [--block 8] [--json PATH]

For each model and context n, in a fresh process: build the decoding state of an n-token context, read the
process's resident memory (RSS) and the cache's bytes (``DecodeCache.nbytes``), then time decode steps at n in
blocks that alternate with blocks on a second cache at the shortest context (the reference). Reported: tokens/s
at n (median step time; on CPU, CPU seconds of this process, so time spent waiting for a shared CPU is not
counted) and the speed relative to the reference measured alongside it, which does not drift with the machine's
load the way two separate runs would.

Models: one small random-init architecture (speed and memory do not depend on trained weights), fp32:
- ``clipped``: kernelized_rpe, per-offset RPE clipped at 512 offsets (constant-size state: prefix sums + ring);
- ``general``: kernelized_rpe, one RPE scalar per offset up to the longest context (the state grows like a cache);
- ``softmax``: softmax attention with the same clipped RPE as an additive bias and a KV cache.

Building the context: kernelized models prefill the n tokens with the parallel op (band / FFT path). A softmax
prefill needs an (H, n, n) bias (128 GB at 64k), so softmax prefills at most ``--softmax-max-prefill`` real
tokens and fills the rest of the KV cache by repeating those keys and values: a decode step then costs what it
costs at n tokens (attention over n cached entries; the cost does not depend on the cached values).

Roofline of a decode step (JSON ``param_bytes``, ``bytes_per_token``, ``flops_per_token``): it must read every
weight and the whole decoding state once per token (batch 1), and do :func:`decode_flops_per_token`; the table's
``GB/s`` is ``bytes_per_token x tok/s``. On CUDA the table adds the GPU memory held while decoding (``dev MiB``,
``torch.cuda.memory_allocated``) and its peak including the prefill. ``--no-isolate`` measures every (model,
context) in this process instead of a fresh one each (on CUDA: no CUDA start-up per row, peak statistics reset
per row; on CPU the RSS columns then carry what earlier rows left).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lm.config import AttentionConfig, ModelConfig
from lm.fileio import atomic_write_text
from lm.inference.decoding import DecodeCache, SoftmaxLayerCache, decode_step, prefill
from lm.model import Transformer

MODELS = ("clipped", "general", "softmax")
CLIP = 512
SIZE = dict(n_layers=2, d_model=128, n_heads=4, d_ff=512)
"""Small, so that building a 64k context on a shared 2-core CPU takes seconds, and so that the per-token cost that
does not depend on the context (projections, MLP, output layer) is small: it makes context effects more visible."""


def model_config(name: str, max_context: int, vocab_size: int) -> ModelConfig:
    if name == "clipped":
        attention = AttentionConfig(kind="kernelized_rpe", num_features=64, rpe="per_offset", rpe_max_distance=CLIP)
    elif name == "general":
        attention = AttentionConfig(kind="kernelized_rpe", num_features=64, rpe="per_offset",
                                    rpe_max_distance=max_context)
    else:
        attention = AttentionConfig(kind="softmax", rpe="per_offset", rpe_max_distance=CLIP)
    return ModelConfig(vocab_size=vocab_size, dropout=0.0, attention=attention, **SIZE)


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def release_free_memory(device: str = "cpu") -> None:
    """Return freed heap to the OS (and, on CUDA, cached blocks to the driver), so the memory figures show what
    decoding holds rather than what prefill left behind."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def extend_kv_cache(cache: DecodeCache, n: int) -> None:
    """Grow every softmax layer's KV cache to ``n`` entries by repeating its real entries (see module doc)."""
    for layer in cache.layers:
        assert isinstance(layer, SoftmaxLayerCache)
        m = layer.length
        reps = math.ceil(n / m)
        layer.k = layer.k[:, :, :m].repeat(1, 1, reps, 1)[:, :, :n].contiguous()
        layer.v = layer.v[:, :, :m].repeat(1, 1, reps, 1)[:, :, :n].contiguous()
        layer.valid = layer.valid[:, :m].repeat(1, reps)[:, :n].contiguous()
        layer.length = n
    cache.position = n


def build_context(model: Transformer, name: str, context: int, vocab_size: int, softmax_max_prefill: int,
                  device: str) -> tuple[torch.Tensor, DecodeCache, float]:
    """Decoding state after ``context`` random tokens: (next token (1,), cache, prefill seconds)."""
    ids = torch.randint(0, vocab_size, (1, context), device=device)
    built = min(context, softmax_max_prefill) if name == "softmax" else context
    start = time.perf_counter()
    logits, cache = prefill(model, ids[:, :built])
    seconds = time.perf_counter() - start
    if built < context:
        extend_kv_cache(cache, context)
    return logits[:, -1].argmax(-1), cache, seconds


def timed_steps(model: Transformer, cache: DecodeCache, token: torch.Tensor, steps: int, device: str
                ) -> tuple[torch.Tensor, list[float]]:
    """Run ``steps`` greedy decode steps; return the last token and each step's seconds.

    On CPU the seconds are the process's CPU time (``time.process_time``): on a shared machine wall time mostly
    measures how long the scheduler made us wait. On CUDA they are wall time after synchronising.
    """
    clock = time.perf_counter if device == "cuda" else time.process_time
    times = []
    for _ in range(steps):
        start = clock()
        token = decode_step(model, cache, token).argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return token, times


def decode_flops_per_token(model: Transformer, context: int) -> float:
    """FLOPs of one decode step at ``context`` (a multiply-add counts 2): 2 per weight of the layers' matmuls and
    of the output layer, plus each layer's attention over what it keeps: kernelized, the random features of q and
    k (``4 d M``), the prefix-sum state (``4 M (d / H + 1) H``) and the exact offsets of its table (the ring:
    ``2 min(L - 1, n) (M + d / H + 1) H``); softmax ``4 n d`` (``q.k`` and ``p v`` over ``n`` cached keys)."""
    cfg = model.cfg
    d, heads, M = cfg.d_model, cfg.n_heads, cfg.attention.num_features
    weights = sum(p.numel() for p in model.blocks.parameters() if p.dim() == 2) + model.tok_emb.weight.numel()
    if cfg.attention.kind == "softmax":
        attention = 4 * context * d
    else:
        E = d // heads + 1
        exact = min(cfg.attention.rpe_max_distance - 1, context)
        attention = 4 * d * M + 4 * M * E * heads + 2 * exact * (M + E) * heads
    return 2.0 * weights + cfg.n_layers * attention


def measure(name: str, context: int, reference: int, max_context: int, rounds: int, block: int, vocab_size: int,
            device: str, softmax_max_prefill: int) -> dict:
    """One (model, context) measurement in this process.

    Decode steps at ``context`` alternate, block by block, with steps on a second cache at the ``reference``
    context (the shortest), so that the ratio of their speeds is immune to load that changes during the run
    (the CPU is shared). Memory is read once the prefill's temporaries are freed, before the reference cache
    exists, so it is what decoding at ``context`` holds.
    """
    cuda = device == "cuda"
    if cuda:
        release_free_memory(device)
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = Transformer(model_config(name, max_context, vocab_size))
    model.init_weights()
    model.to(device).eval()
    token, cache, prefill_seconds = build_context(model, name, context, vocab_size, softmax_max_prefill, device)
    token, _ = timed_steps(model, cache, token, 4, device)  # warm-up
    release_free_memory(device)
    rss, peak = rss_bytes()
    cache_bytes = cache.nbytes()
    device_bytes = torch.cuda.memory_allocated() if cuda else None
    device_peak = torch.cuda.max_memory_allocated() if cuda else None
    ref_token, ref_cache, _ = build_context(model, name, reference, vocab_size, softmax_max_prefill, device)
    ref_token, _ = timed_steps(model, ref_cache, ref_token, 4, device)
    times, ref_times = [], []
    for _ in range(rounds):
        ref_token, t = timed_steps(model, ref_cache, ref_token, block, device)
        ref_times += t
        token, t = timed_steps(model, cache, token, block, device)
        times += t
    median, ref_median = statistics.median(times), statistics.median(ref_times)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": name, "context": context, "reference_context": reference,
            "prefilled_tokens": min(context, softmax_max_prefill) if name == "softmax" else context,
            "prefill_seconds": prefill_seconds, "decode_steps": len(times), "median_step_seconds": median,
            "tokens_per_second": 1.0 / median, "speed_vs_reference": ref_median / median,
            "cache_bytes": cache_bytes, "rss_bytes": rss, "peak_rss_bytes": peak,
            "device_bytes": device_bytes, "device_peak_bytes": device_peak, "param_bytes": param_bytes,
            "bytes_per_token": param_bytes + cache_bytes, "flops_per_token": decode_flops_per_token(model, context)}


def run_isolated(args: argparse.Namespace, name: str, context: int, reference: int, max_context: int) -> dict:
    """``measure`` in a fresh Python process (clean memory figures); returns its result."""
    cmd = [sys.executable, __file__, "--worker", name, "--contexts", f"{context},{reference}",
           "--max-context", str(max_context), "--rounds", str(args.rounds), "--block", str(args.block),
           "--vocab-size", str(args.vocab_size),
           "--device", args.device, "--softmax-max-prefill", str(args.softmax_max_prefill)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {name} @ {context} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def format_table(rows: list[dict]) -> str:
    """tok/s at each context, its speed relative to the shortest context measured alongside it, memory, and the
    bytes per second a step's weights and state imply; GPU memory when measured on CUDA."""
    gpu = any(r.get("device_bytes") is not None for r in rows)
    head = (f"{'model':<9}{'context':>8}{'tok/s':>9}{'vs ref':>8}{'cache MiB':>11}{'RSS MiB':>10}{'vs 1st':>8}"
            f"{'peak MiB':>10}{'prefill s':>11}{'GB/s':>8}" + (f"{'dev MiB':>10}{'dev peak':>10}" if gpu else ""))
    lines = [head, "-" * len(head)]
    first = {}
    for r in rows:
        f = first.setdefault(r["model"], r)
        device = f"{mib(r['device_bytes']):>10}{mib(r['device_peak_bytes']):>10}" if gpu else ""
        lines.append(f"{r['model']:<9}{r['context']:>8}{r['tokens_per_second']:>9.1f}{r['speed_vs_reference']:>8.3f}"
                     f"{mib(r['cache_bytes']):>11}{mib(r['rss_bytes']):>10}{r['rss_bytes'] / f['rss_bytes']:>8.3f}"
                     f"{mib(r['peak_rss_bytes']):>10}{r['prefill_seconds']:>11.2f}"
                     f"{r['bytes_per_token'] * r['tokens_per_second'] / 1e9:>8.3f}{device}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--models", default=",".join(MODELS), help=f"some of {','.join(MODELS)}")
    p.add_argument("--rounds", type=int, default=32, help="alternations between the context and the reference")
    p.add_argument("--block", type=int, default=4, help="decode steps per cache per round")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--softmax-max-prefill", type=int, default=4096)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each (model, context) in a fresh process (default); --no-isolate: all in this one")
    p.add_argument("--json", type=Path, default=Path("bench_results/generate.json"))
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--max-context", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    if args.worker:
        result = measure(args.worker, contexts[0], contexts[1], args.max_context, args.rounds, args.block,
                         args.vocab_size, args.device, args.softmax_max_prefill)
        print(json.dumps(result))
        return 0
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or not contexts or min(contexts) < 2 or args.rounds < 1 or args.block < 1:
        p.error(f"--models must be among {MODELS}, --contexts >= 2, --rounds and --block >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), device {args.device}; model: {SIZE}, 64 features, "
          f"vocab {args.vocab_size}, random init, fp32" + ("" if args.isolate else "; all rows in one process"),
          file=sys.stderr)
    rows = []
    for name in models:
        for context in contexts:
            if args.isolate:
                rows.append(run_isolated(args, name, context, contexts[0], max(contexts)))
            else:
                rows.append(measure(name, context, contexts[0], max(contexts), args.rounds, args.block,
                                    args.vocab_size, args.device, args.softmax_max_prefill))
            r = rows[-1]
            print(f"{name} @ {context}: {r['tokens_per_second']:.1f} tok/s, cache {mib(r['cache_bytes'])} MiB, "
                  f"RSS {mib(r['rss_bytes'])} MiB", file=sys.stderr, flush=True)
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps({"contexts": contexts, "rounds": args.rounds, "block": args.block,
                                             "size": SIZE, "clip": CLIP, "vocab_size": args.vocab_size,
                                             "device": args.device, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
