"""Perplexity of a trained model on a split of its corpus (token, word and bits per byte), sliding windows.

    python tools/eval_ppl.py RUN_DIR_OR_CHECKPOINT [--split valid|test] [--context N | --contexts 512,1024,...]
                             [--stride S] [--batch-size B] [--per-document] [--json PATH] [--plot PATH]
                             [--by-position [--bucket-width W] [--max-windows K]] [key=value ...]

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
context length next to it.

``--by-position`` reports instead the mean loss at each position of the window, in buckets (powers of two, or
``--bucket-width W`` positions each), for each context: consecutive full windows of the split (at most
``--max-windows``, spread evenly), so every position is averaged over the same windows. Table, JSON
(``..._positions.json``) and a PNG with one line per context: whether later positions are predicted better, and
where a longer context stops helping.

Given a run directory it scores the newest intact checkpoint (warning about newer damaged ones); a damaged
checkpoint named explicitly is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lm.cli.common import (USER_ERRORS, CommandError, add_checkpoint_arguments, add_device_argument, check_writable,
                           command_parser, eval_dir, load_checkpoint, number_list, report_error, resolve_device,
                           write_report)
from lm.fileio import atomic_write

if TYPE_CHECKING:
    from lm.eval.perplexity import SplitPerplexity
    from lm.eval.position import PositionLoss


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
    add_device_argument(p)
    p.add_argument("--json", type=Path, help="where to write the results (default RUN_DIR/eval/...)")
    p.add_argument("--plot", type=Path, help="PNG of perplexity vs context (default: the JSON path, .png)")
    p.add_argument("--by-position", action="store_true",
                   help="mean loss by position in the window (buckets), per context, instead of perplexity")
    p.add_argument("--bucket-width", type=int,
                   help="--by-position: positions per bucket (default: powers of two, 0 1 2-3 4-7 ...)")
    p.add_argument("--max-windows", type=int,
                   help="--by-position: at most this many windows per context, spread over the split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_intermixed_args(argv)


def parse_contexts(args: argparse.Namespace) -> list[int] | None:
    """Contexts asked for (None = the training context), validated with the stride and the batch size."""
    if args.batch_size < 1:
        raise CommandError(f"--batch-size={args.batch_size} must be >= 1")
    if args.stride is not None and args.stride < 1:
        raise CommandError(f"--stride={args.stride} must be >= 1 (new tokens scored per window)")
    if args.contexts is not None:
        contexts = number_list(args.contexts, "--contexts", int, "512,1024")
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
                      per_document: bool = False, by_position: bool = False) -> Path:
    """RUN_DIR/eval/<checkpoint name>_<split>_ctx<c1-c2-...>[_stride<S>][_perdoc][_positions].json for
    RUN_DIR/checkpoints/<name>, else the same name inside the checkpoint."""
    name = f"{checkpoint.name}_{split}_ctx{'-'.join(map(str, contexts))}{f'_stride{stride}' if stride else ''}"
    return eval_dir(checkpoint) / f"{name}{'_perdoc' if per_document else ''}{'_positions' if by_position else ''}.json"


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
        how = ("each document on its own, from BOS" if any(r.per_document for r in rows) else
               "the packed stream, each document seeing only itself (data.document_mask)"
               if any(r.document_mask for r in rows) else "the packed stream")
        note = (f"documents corpus ({how}): tokens include an EOS per document; no word ppl (bits/byte compares "
                f"tokenizers)")
    else:
        note = "word ppl = exp(NLL / (whitespace words + line ends)): the WikiText-103 convention of the literature"
    return "\n".join([line(head), "-" * len(line(head)), *map(line, body), note])


def format_position_table(results: list[PositionLoss]) -> str:
    """Mean loss (nats per token) by position bucket: one row per bucket, one column per context; "-" where a
    context has no such bucket."""
    buckets = sorted({(lo, hi) for r in results for lo, hi in zip(r.edges[:-1], r.edges[1:])})
    head = ["positions", *[f"ctx {r.context}" for r in results]]
    body = []
    for lo, hi in buckets:
        cells = []
        for r in results:
            pairs = dict(zip(zip(r.edges[:-1], r.edges[1:]), r.bucket_loss))
            cells.append(f"{pairs[(lo, hi)]:.4f}" if (lo, hi) in pairs else "-")
        body.append([f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}", *cells])
    body.append(["all", *[f"{r.mean_loss:.4f}" for r in results]])
    body.append(["windows", *[f"{r.num_windows}" for r in results]])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(line(head))
    return "\n".join([line(head), rule, *map(line, body[:-2]), rule, *map(line, body[-2:]),
                      "mean loss (nats per token) at each position of the window (position p sees p + 1 tokens)"])


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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def check_position_args(args: argparse.Namespace) -> None:
    """The flags that go with --by-position (and only with it)."""
    if not args.by_position:
        for flag, value in (("--bucket-width", args.bucket_width), ("--max-windows", args.max_windows)):
            if value is not None:
                raise CommandError(f"{flag} goes with --by-position: add --by-position or drop {flag}")
        return
    if args.stride is not None:
        raise CommandError("--stride does not apply to --by-position (its windows do not overlap): drop --stride")
    if args.per_document:
        raise CommandError("--by-position scores positions of the split's windows, not documents: drop "
                           "--per-document")
    for flag, value in (("--bucket-width", args.bucket_width), ("--max-windows", args.max_windows)):
        if value is not None and value < 1:
            raise CommandError(f"{flag}={value} must be >= 1")


def by_position(args: argparse.Namespace, inference, split, contexts: list[int], device: str) -> int:
    """--by-position: the table, the JSON and the PNG of :func:`lm.eval.position.loss_by_position`."""
    from lm.eval.plots import plot_position_loss
    from lm.eval.position import loss_by_position
    cfg = inference.cfg
    json_path = args.json or default_json_path(inference.path, args.split, contexts, by_position=True)
    plot_path = args.plot or json_path.with_suffix(".png")
    check_writable(json_path, "--json")
    check_writable(plot_path, "--plot")
    too_long = [c for c in contexts if c > split.num_tokens]
    if too_long:
        raise CommandError(f"the {args.split} split has {split.num_tokens:,} tokens, fewer than the context "
                           f"{too_long[0]}: give shorter contexts")
    eos = inference.tokenizer.eos_id if cfg.data.document_mask else None
    results = [loss_by_position(inference.model, split.tokens, c, inference.tokenizer.bos_id, args.batch_size,
                                args.bucket_width, args.max_windows, device, progress=not args.no_progress,
                                document_eos=eos) for c in contexts]
    print(format_position_table(results))
    report = {"checkpoint": str(inference.path), "step": inference.step, "attention": cfg.model.attention.kind,
              "rpe": cfg.model.attention.rpe, "train_context": cfg.data.seq_len, "split": args.split,
              "device": device, "results": [dataclasses.asdict(r) | {"mean_loss": r.mean_loss} for r in results]}
    title = f"{cfg.model.attention.kind}, {args.split}, step {inference.step}"
    write_report(json_path, report, lambda path: plot_position_loss(results, path, title,
                                                                    train_context=cfg.data.seq_len), plot_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lm.eval.perplexity import evaluate_split, tokenize_split  # after parsing: a fast --help

    try:
        contexts = parse_contexts(args)
        check_position_args(args)
        device = resolve_device(args.device)
        if args.plot is not None:
            check_writable(args.plot, "--plot")
        inference = load_checkpoint(args.path, args.overrides, device)
        cfg, model, tokenizer = inference.cfg, inference.model, inference.tokenizer
        contexts = contexts or [cfg.data.seq_len]
        if args.stride is not None and args.stride > min(contexts):
            raise CommandError(f"--stride={args.stride} must be <= the context ({min(contexts)})")
        if args.by_position:
            split = tokenize_split(cfg.data, tokenizer, args.split)
            print(f"checkpoint {inference.path} (step {inference.step}, {cfg.model.attention.kind}, trained at "
                  f"context {cfg.data.seq_len}) on {device}; {args.split}: {split.num_tokens:,} tokens",
                  file=sys.stderr)
            return by_position(args, inference, split, contexts, device)
        json_path = args.json or default_json_path(inference.path, args.split, contexts, args.stride,
                                                   args.per_document)
        check_writable(json_path, "--json")
        split = tokenize_split(cfg.data, tokenizer, args.split)
        if max(contexts) > split.num_tokens:
            raise CommandError(f"context {max(contexts):,} is longer than the {args.split} split ({split.num_tokens:,} "
                               f"tokens): one window would hold it all, so the figure would be that of context "
                               f"{split.num_tokens:,}; give contexts <= {split.num_tokens:,}")
        if args.per_document and not split.num_documents:
            raise CommandError(f"--per-document needs a documents corpus; the {args.split} split of this run's "
                               f"corpus is a text of lines (WikiText): drop --per-document")
        what = f"{split.num_documents:,} documents" if split.num_documents else f"{split.num_line_ends:,} lines"
        print(f"checkpoint {inference.path} (step {inference.step}, {cfg.model.attention.kind}, trained at context "
              f"{cfg.data.seq_len}) on {device}; {args.split}: {split.num_tokens:,} tokens, {split.num_words:,} "
              f"words, {what}", file=sys.stderr)
        rows = evaluate_split(model, split, contexts, args.stride, args.batch_size, tokenizer.bos_id, device,
                              progress=not args.no_progress,
                              per_document_eos=tokenizer.eos_id if args.per_document else None,
                              document_eos=tokenizer.eos_id if cfg.data.document_mask else None)
    except USER_ERRORS as e:
        return report_error(e, status=2)

    print(format_table(rows))
    report = {"checkpoint": str(inference.path), "step": inference.step, "attention": cfg.model.attention.kind,
              "rpe": cfg.model.attention.rpe, "train_context": cfg.data.seq_len, "device": device,
              "results": [dataclasses.asdict(r) for r in rows]}
    plot_path = args.plot or json_path.with_suffix(".png")
    title = f"{cfg.model.attention.kind}, {args.split}, step {inference.step}"
    try:
        write_report(json_path, report, (lambda path: plot_curve(rows, cfg.data.seq_len, title, path))
                     if len(rows) > 1 else None, plot_path)
    except USER_ERRORS as e:
        return report_error(e, status=2)
    return 0
