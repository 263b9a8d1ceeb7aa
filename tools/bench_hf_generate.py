#!/usr/bin/env python
"""Memory of transformers' own generate() on an exported model, against the context length: our cache inside
transformers' generation loop stays constant for clipped RPE and grows for general RPE and softmax.

    python tools/bench_hf_generate.py [--contexts 1024,4096,16384,65536] [--new-tokens 16] [--json PATH]

For each model and context n, in a fresh process: a small model (random init, as tools/bench_generate.py's: the
memory does not depend on the weights) saved as a Hugging Face directory and loaded back with
``AutoModelForCausalLM``, then ``generate(prompt of n tokens, max_new_tokens, do_sample=False,
return_dict_in_generate=True)``. Reported: the bytes the returned cache holds (``KernelizedCache.nbytes``, allocated
capacity included), the process's resident memory after generation and its peak, and decode tokens/s (the new
tokens after the first, over the time after the prefill). Models: ``clipped`` (kernelized_rpe, per-offset RPE clipped
at 512 offsets), ``general`` (one RPE entry per offset up to the longest context), ``softmax`` (softmax attention
with the clipped RPE as a bias and a KV cache; its prefill is quadratic, so it stops at --softmax-max-context).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_generate import rss_bytes  # tools/ is this script's folder: the same memory reading as bench_generate
from lm.fileio import atomic_write_text

MODELS = ("clipped", "general", "softmax")
SIZE = dict(n_layers=2, d_model=128, n_heads=4, d_ff=512)
CLIP = 512


def attention(name: str, max_context: int) -> dict:
    if name == "clipped":
        return dict(kind="kernelized_rpe", num_features=64, rpe="per_offset", rpe_max_distance=CLIP)
    if name == "general":
        return dict(kind="kernelized_rpe", num_features=64, rpe="per_offset", rpe_max_distance=max_context + 64)
    return dict(kind="softmax", rpe="per_offset", rpe_max_distance=CLIP)


def measure(name: str, context: int, max_context: int, new_tokens: int, vocab_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria

    import lm.hf  # noqa: F401  (registers the Auto classes)
    from lm.config import AttentionConfig, ModelConfig
    from lm.hf import KernelizedLMConfig, KernelizedLMForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, dropout=0.0, attention=AttentionConfig(**attention(name, max_context)),
                      **SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        KernelizedLMForCausalLM(KernelizedLMConfig.from_model_config(cfg, 512)).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp).eval()
    prompt = torch.randint(3, vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    marks = []

    class Clock(StoppingCriteria):  # called once per generated token, after its forward
        def __call__(self, input_ids, scores, **kwargs):
            marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         stopping_criteria=[Clock()])
    rss, peak = rss_bytes()
    decode = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
    return {"model": name, "context": context, "new_tokens": new_tokens, "cache_bytes": out.cache.nbytes(),
            "rss_bytes": rss, "peak_rss_bytes": peak, "decode_tokens_per_second": decode,
            "cache_position": out.cache.get_seq_length()}


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<9}{'context':>8}{'cache MiB':>11}{'RSS MiB':>10}{'peak MiB':>10}{'decode tok/s':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<9}{r['context']:>8}{mib(r['cache_bytes']):>11}{mib(r['rss_bytes']):>10}"
                     f"{mib(r['peak_rss_bytes']):>10}{r['decode_tokens_per_second']:>14.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--contexts", default="1024,4096,16384,65536")
    p.add_argument("--models", default=",".join(MODELS), help=f"some of {','.join(MODELS)}")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--softmax-max-context", type=int, default=16384)
    p.add_argument("--json", type=Path, default=Path("bench_results/hf_generate.json"))
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--max-context", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    if args.worker:
        print(json.dumps(measure(args.worker, contexts[0], args.max_context, args.new_tokens, args.vocab_size)))
        return 0
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models) or not contexts or min(contexts) < 2 or args.new_tokens < 2:
        p.error(f"--models must be among {MODELS}, --contexts >= 2, --new-tokens >= 2")
    rows = []
    for name in models:
        for context in contexts:
            if name == "softmax" and context > args.softmax_max_context:
                continue
            cmd = [sys.executable, __file__, "--worker", name, "--contexts", str(context), "--max-context",
                   str(max(contexts)), "--new-tokens", str(args.new_tokens), "--vocab-size", str(args.vocab_size)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{name} @ {context} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name} @ {context}: cache {mib(rows[-1]['cache_bytes'])} MiB", file=sys.stderr, flush=True)
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps({"size": SIZE, "clip": CLIP, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
