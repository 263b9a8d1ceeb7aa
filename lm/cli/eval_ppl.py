"""Perplexity of a trained model on a WikiText-103 split (token, word and bits per byte), sliding windows.

    python tools/eval_ppl.py RUN_DIR_OR_CHECKPOINT [--split valid|test] [--context N | --contexts 512,1024,...]
                             [--stride S] [--batch-size B] [--json PATH] [--plot PATH] [key=value ...]

Every token of the split is scored exactly once, each with at least ``context - stride`` tokens of history
(stride defaults to the context: non-overlapping windows). The context defaults to the training context
(``data.seq_len``), where the token perplexity equals the validation perplexity training logged; longer contexts
work (RPE offsets beyond the table clamp). ``key=value`` overrides apply to the stored config, e.g.
``data.path=DIR`` to read the split from local files. The split is always tokenized with the checkpoint's own
tokenizer, never one re-derived from the data settings, so it cannot be scored with token ids the model was not
trained on.

Writes the figures as JSON (default RUN_DIR/eval/<checkpoint>_<split>.json) and, for several contexts, a PNG of
perplexity against context length next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from lm.checkpoint import load_for_inference
from lm.cli.common import (USER_ERRORS, CommandError, add_checkpoint_arguments, command_parser, eval_dir,
                           report_error, resolve_device)
from lm.device import set_tf32
from lm.evaluate import SplitPerplexity, score_tokens, split_perplexity, tokenize_split

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    add_checkpoint_arguments(p, "data.path=DIR")
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--context", type=int, help="tokens per window, BOS included (default: data.seq_len)")
    group.add_argument("--contexts", help="comma-separated contexts, e.g. 512,1024,2048: the extrapolation curve")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: the context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", type=Path, help="where to write the results (default RUN_DIR/eval/...)")
    p.add_argument("--plot", type=Path, help="PNG of perplexity vs context (default: the JSON path, .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_intermixed_args(argv)


def parse_contexts(args: argparse.Namespace) -> list[int] | None:
    """Contexts asked for (None = the training context), validated against the stride."""
    if args.contexts is not None:
        try:
            contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
        except ValueError:
            raise CommandError(f"--contexts={args.contexts!r}: give comma-separated integers, e.g. 512,1024") from None
        if not contexts:
            raise CommandError("--contexts is empty")
    elif args.context is not None:
        contexts = [args.context]
    else:
        return None
    if min(contexts) < 1:
        raise CommandError(f"contexts must be >= 1, got {contexts}")
    if args.stride is not None and not 1 <= args.stride <= min(contexts):
        raise CommandError(f"--stride={args.stride} must be in [1, smallest context={min(contexts)}]")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size={args.batch_size} must be >= 1")
    return contexts


def default_json_path(checkpoint: Path, split: str) -> Path:
    """RUN_DIR/eval/<checkpoint name>_<split>.json for RUN_DIR/checkpoints/<name>, else inside the checkpoint."""
    return eval_dir(checkpoint) / f"{checkpoint.name}_{split}.json"


def format_table(rows: list[SplitPerplexity]) -> str:
    """The results table; ``word ppl`` is per word-level token (words + line ends, the WikiText-103 convention)."""
    head = f"{'split':<6}{'context':>8}{'stride':>8}{'tokens':>11}{'words+eol':>11}{'token ppl':>11}" \
           f"{'word ppl':>11}{'bits/byte':>10}{'tok/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.split:<6}{r.context:>8}{r.stride:>8}{r.num_tokens:>11,}{r.num_word_level_tokens:>11,}"
                     f"{r.token_perplexity:>11.3f}{r.word_perplexity:>11.3f}{r.bits_per_byte:>10.4f}"
                     f"{r.num_tokens / r.seconds:>9.0f}")
    lines.append("word ppl = exp(NLL / (whitespace words + line ends)): the WikiText-103 convention of the literature")
    return "\n".join(lines)


def plot_curve(rows: list[SplitPerplexity], train_context: int, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.context for r in rows], [r.token_perplexity for r in rows], marker="o")
    ax.axvline(train_context, color="gray", linestyle="--", label=f"training context {train_context}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context (tokens)")
    ax.set_ylabel("token perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        contexts = parse_contexts(args)
        device = resolve_device(args.device)
        inference = load_for_inference(args.path, args.overrides, device=device)
        set_tf32(inference.cfg.compute.tf32, device)
        cfg, model, tokenizer = inference.cfg, inference.model, inference.tokenizer
        contexts = contexts or [cfg.data.seq_len]
        if args.stride is not None and args.stride > min(contexts):
            raise CommandError(f"--stride={args.stride} must be <= the context ({min(contexts)})")
        split = tokenize_split(cfg.data, tokenizer, args.split)
        print(f"checkpoint {inference.path} (step {inference.step}, {cfg.model.attention.kind}, trained at context "
              f"{cfg.data.seq_len}) on {device}; {args.split}: {split.num_tokens:,} tokens, {split.num_words:,} "
              f"words, {split.num_line_ends:,} lines", file=sys.stderr)
        rows = []
        for context in contexts:
            stride = args.stride or context
            start = time.perf_counter()
            nll = score_tokens(model, split.tokens, context, stride, args.batch_size, tokenizer.bos_id, device,
                               progress=not args.no_progress)
            rows.append(split_perplexity(nll, args.split, split.num_words, split.num_line_ends, split.num_bytes,
                                         context, stride, seconds=time.perf_counter() - start))
    except USER_ERRORS as e:
        return report_error(e, status=2)

    print(format_table(rows))
    json_path = args.json or default_json_path(inference.path, args.split)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(inference.path), "step": inference.step, "attention": cfg.model.attention.kind,
              "rpe": cfg.model.attention.rpe, "train_context": cfg.data.seq_len, "device": device,
              "results": [dataclasses.asdict(r) for r in rows]}
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {json_path}", file=sys.stderr)
    if len(rows) > 1:
        plot_path = args.plot or json_path.with_suffix(".png")
        plot_curve(rows, cfg.data.seq_len, f"{cfg.model.attention.kind}, {args.split}, step {inference.step}",
                   plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)
    return 0
