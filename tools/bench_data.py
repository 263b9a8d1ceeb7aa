#!/usr/bin/env python
"""Preparing a large documents corpus in bounded memory: peak RSS and throughput of each phase.

    python tools/bench_data.py [--gb 2] [--shards 16] [--num-proc 2] [--vocab-size 8192]
                               [--tokenizer-mb 20] [--dir /tmp/lm_bench_data] [--json PATH]

Writes a synthetic JSONL corpus of ``--gb`` GB in ``--shards`` shards under ``--dir`` (reused when it is already
there: documents of 1 to 30 paragraphs of Zipf-distributed pseudo-words), then prepares it as ``data.files.train``
with the valid and test splits carved out (``data.valid_fraction``, default 0.5% each), one phase per process:

- ``tokenizer``: train the tokenizer on a ``--tokenizer-mb`` MB sample spread over the shards;
- ``train``: tokenize the train split (``--num-proc`` worker processes);
- ``valid+test``: read the corpus again and tokenize the carved-out documents;
- ``reuse``: a second preparation, which only checks the caches (hashes of inputs and token files).

Peak RSS is the largest sum, sampled every 0.1 s, over the phase's process and all its children (the tokenizer
workers); MB/s is the corpus's size on disk over the phase's wall time. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from lm.fileio import atomic_write_text

PHASES = {
    "tokenizer": "from lm.data.corpus import resolve_sources\n"
                 "from lm.data.tokenizer_cache import prepare_tokenizer\n"
                 "prepare_tokenizer(cfg, resolve_sources(cfg, ['train'])['train'], None)",
    "train": "prepare_corpus(cfg, splits=['train'])",
    "valid+test": "prepare_corpus(cfg, splits=['valid', 'test'])",
    "reuse": "assert prepare_corpus(cfg).built == ()",
}
CHILD = """
import sys
from lm.config import load_config
from lm.data import prepare_corpus
cfg = load_config([], sys.argv[1:]).data
{code}
"""


def write_corpus(folder: Path, total_bytes: int, shards: int, seed: int = 0) -> None:
    """``shards`` JSONL files of about ``total_bytes`` together (skipped when a marker says they exist)."""
    marker = folder / "corpus.json"
    spec = {"bytes": total_bytes, "shards": shards, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = np.array(["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(50_000)])
    per_shard = total_bytes // shards
    for k in range(shards):
        with open(folder / f"train-{k:05d}.jsonl", "w") as f:
            written = 0
            while written < per_shard:
                words = vocab[(rng.zipf(1.1, 20_000) - 1) % len(vocab)].tolist()
                cuts = [0, *sorted(rng.choice(np.arange(1, len(words)), 60, replace=False).tolist()), len(words)]
                paragraphs = [" ".join(words[a:b]) + "." for a, b in itertools.pairwise(cuts)]
                i = 0
                while i < len(paragraphs):
                    n = int(rng.integers(1, 31))
                    line = json.dumps({"text": "\n\n".join(paragraphs[i:i + n]), "id": written}) + "\n"
                    i += n
                    f.write(line)
                    written += len(line)
        print(f"wrote {folder / f'train-{k:05d}.jsonl'}", file=sys.stderr)
    atomic_write_text(marker, json.dumps(spec))  # last: a corpus interrupted mid-write is rewritten


def run_phase(name: str, overrides: list[str]) -> dict:
    """Run one phase in a child process; its wall time and the peak RSS of its process tree."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(code=PHASES[name]), *overrides])
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:  # a worker ended between listing and reading
            continue
        peak = max(peak, rss)
        time.sleep(0.1)
    if child.returncode:
        raise SystemExit(f"phase {name} failed (exit status {child.returncode})")
    return {"phase": name, "seconds": time.perf_counter() - start, "peak_rss_mb": peak / 2 ** 20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0, help="corpus size on disk, GB (1e9 bytes)")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--num-proc", type=int, default=2, help="tokenizer worker processes (data.num_proc)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-mb", type=int, default=20, help="data.tokenizer.train_max_bytes, MB")
    p.add_argument("--dir", type=Path, default=Path("/tmp/lm_bench_data"), help="corpus and cache folder")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    corpus = args.dir / "corpus"
    write_corpus(corpus, int(args.gb * 1e9), args.shards)
    cache = args.dir / "cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    overrides = [f"data.files.train={corpus}/train-*.jsonl", f"data.cache_dir={cache}", "data.progress=false",
                 f"data.num_proc={args.num_proc}", f"data.tokenizer.vocab_size={args.vocab_size}",
                 f"data.tokenizer.train_max_bytes={args.tokenizer_mb * 10 ** 6}"]
    size_mb = sum(f.stat().st_size for f in corpus.glob("train-*.jsonl")) / 1e6
    rows = [run_phase(name, overrides) for name in PHASES]
    token_files = sorted((cache / "tokens").rglob("part-*.bin"))
    token_mb = sum(f.stat().st_size for f in token_files) / 1e6
    print(f"\ncorpus: {size_mb:,.0f} MB of JSONL in {args.shards} shards; token files: {token_mb:,.0f} MB in "
          f"{len(token_files)} parts; {os.cpu_count()} cores, data.num_proc={args.num_proc}\n")
    print("| phase | seconds | MB/s (corpus on disk) | peak RSS, all processes (MB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['seconds']:.0f} | {size_mb / r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} |")
    if args.json:
        atomic_write_text(args.json, json.dumps({"corpus_mb": size_mb, "token_mb": token_mb, "args": vars(args) | {
            "dir": str(args.dir), "json": str(args.json)}, "phases": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
