"""Perplexity of a trained model on a split of its corpus (token, word and bits per byte), sliding windows.

    python tools/eval_ppl.py RUN_DIR_OR_CHECKPOINT [--split valid|test] [--context N | --contexts 512,1024,...]
                             [--stride S] [--batch-size B] [--per-document] [--json PATH] [--plot PATH]
                             [key=value ...]

Every token of the split is scored exactly once, each with at least ``context - stride`` tokens of history
(stride defaults to the context: non-overlapping windows). The context defaults to the training context
(``data.seq_len``), where the token perplexity equals the validation perplexity training logged; longer contexts
work (RPE offsets beyond the table clamp). ``key=value`` overrides apply to the stored config, e.g.
``data.path=DIR`` to read the split from local files. The split is always tokenized with the checkpoint's own
tokenizer, never one re-derived from the data settings, so it cannot be scored with token ids the model was not
trained on.

Word perplexity is reported for a text of lines (WikiText's convention: words + line ends); a documents corpus
(data.files, a hub dataset of documents) gets token perplexity and bits per byte, and with ``--per-document`` each
document is scored on its own, from BOS, never seeing the document before it.

Writes the figures as JSON (default RUN_DIR/eval/<checkpoint>_<split>_ctx<contexts>[_stride<S>].json, so that
evaluations at other contexts never overwrite each other) and, for several contexts, a PNG of perplexity against
context length next to it. Given a run directory it scores the newest intact checkpoint (warning about newer
damaged ones); a damaged checkpoint named explicitly is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lm.cli.common import (USER_ERRORS, CommandError, add_checkpoint_arguments, command_parser, eval_dir,
                           report_error, resolve_device)
from lm.device import set_cpu_threads, set_tf32

if TYPE_CHECKING:
    from lm.eval.perplexity import SplitPerplexity


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    add_checkpoint_arguments(p, "data.path=DIR")
    p.add_argument("--split", default="valid", choices=["valid", "test"])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--context", type=int, help="tokens per window, BOS included (default: data.seq_len)")
    group.add_argument("--contexts", help="comma-separated contexts, e.g. 512,1024,2048: the extrapolation curve")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: the context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--per-document", action="store_true",
                   help="documents corpus: score each document on its own, from BOS (default: the packed stream)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--json", type=Path, help="where to write the results (default RUN_DIR/eval/...)")
    p.add_argument("--plot", type=Path, help="PNG of perplexity vs context (default: the JSON path, .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_intermixed_args(argv)


def parse_contexts(args: argparse.Namespace) -> list[int] | None:
    """Contexts asked for (None = the training context), validated with the stride and the batch size."""
    if args.batch_size < 1:
        raise CommandError(f"--batch-size={args.batch_size} must be >= 1")
    if args.stride is not None and args.stride < 1:
        raise CommandError(f"--stride={args.stride} must be >= 1 (new tokens scored per window)")
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
    if args.stride is not None and args.stride > min(contexts):
        raise CommandError(f"--stride={args.stride} must be in [1, smallest context={min(contexts)}]")
    return contexts


def default_json_path(checkpoint: Path, split: str, contexts: list[int], stride: int | None = None,
                      per_document: bool = False) -> Path:
    """RUN_DIR/eval/<checkpoint name>_<split>_ctx<c1-c2-...>[_stride<S>][_perdoc].json for
    RUN_DIR/checkpoints/<name>, else the same name inside the checkpoint."""
    name = f"{checkpoint.name}_{split}_ctx{'-'.join(map(str, contexts))}{f'_stride{stride}' if stride else ''}"
    return eval_dir(checkpoint) / f"{name}{'_perdoc' if per_document else ''}.json"


def check_writable(path: Path, flag: str) -> None:
    """A CommandError now, before the work, if ``path`` could not be written (creating its folders is allowed)."""
    if path.is_dir():
        raise CommandError(f"{flag}={path} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CommandError(f"{flag}={path} is not writable; give another path")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{flag}={path} cannot be written ({parent} is not a writable directory); give another "
                           f"path")


def format_table(rows: list[SplitPerplexity]) -> str:
    """The results as a text table: columns separated by at least two spaces whatever the values (perplexities
    past 1e6 in exponent notation, a diverged model's as inf). ``word ppl`` is per word-level token (words + line
    ends: the WikiText-103 convention, as in the literature); a documents corpus has none ("-") and a ``docs``
    column instead."""
    from lm.eval.perplexity import format_perplexity

    documents = any(r.num_documents for r in rows)
    head = ["split", "context", "stride", "tokens", "docs" if documents else "words+eol", "token ppl", "word ppl",
            "bits/byte", "tok/s"]
    body = [[r.split, f"{r.context}", f"{r.stride}", f"{r.num_tokens:,}",
             f"{r.num_documents:,}" if documents else f"{r.num_word_level_tokens:,}",
             format_perplexity(r.token_perplexity),
             "-" if r.word_perplexity is None else format_perplexity(r.word_perplexity), f"{r.bits_per_byte:.4f}",
             f"{r.num_tokens / r.seconds:.0f}" if r.seconds > 0 else "-"] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    if documents:
        how = "each document on its own, from BOS" if any(r.per_document for r in rows) else "the packed stream"
        note = (f"documents corpus ({how}): tokens include an EOS per document; no word ppl (bits/byte compares "
                f"tokenizers)")
    else:
        note = "word ppl = exp(NLL / (whitespace words + line ends)): the WikiText-103 convention of the literature"
    return "\n".join([line(head), "-" * len(line(head)), *map(line, body), note])


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
    from lm.eval.perplexity import evaluate_split, tokenize_split  # after parsing: a fast --help
    from lm.inference.loading import load_for_inference

    try:
        contexts = parse_contexts(args)
        device = resolve_device(args.device)
        if args.plot is not None:
            check_writable(args.plot, "--plot")
        inference = load_for_inference(args.path, args.overrides, device=device)
        set_tf32(inference.cfg.compute.tf32, device)
        set_cpu_threads(inference.cfg.compute.cpu_threads)
        cfg, model, tokenizer = inference.cfg, inference.model, inference.tokenizer
        contexts = contexts or [cfg.data.seq_len]
        if args.stride is not None and args.stride > min(contexts):
            raise CommandError(f"--stride={args.stride} must be <= the context ({min(contexts)})")
        json_path = args.json or default_json_path(inference.path, args.split, contexts, args.stride,
                                                   args.per_document)
        check_writable(json_path, "--json")
        split = tokenize_split(cfg.data, tokenizer, args.split)
        if args.per_document and not split.num_documents:
            raise CommandError(f"--per-document needs a documents corpus; the {args.split} split of this run's "
                               f"corpus is a text of lines (WikiText): drop --per-document")
        what = f"{split.num_documents:,} documents" if split.num_documents else f"{split.num_line_ends:,} lines"
        print(f"checkpoint {inference.path} (step {inference.step}, {cfg.model.attention.kind}, trained at context "
              f"{cfg.data.seq_len}) on {device}; {args.split}: {split.num_tokens:,} tokens, {split.num_words:,} "
              f"words, {what}", file=sys.stderr)
        rows = evaluate_split(model, split, contexts, args.stride, args.batch_size, tokenizer.bos_id, device,
                              progress=not args.no_progress,
                              per_document_eos=tokenizer.eos_id if args.per_document else None)
    except USER_ERRORS as e:
        return report_error(e, status=2)

    print(format_table(rows))
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
