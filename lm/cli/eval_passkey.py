"""Passkey retrieval of a trained model: accuracy per (context, depth) of a number hidden in filler text.

    python tools/eval_passkey.py RUN_DIR_OR_CHECKPOINT [--contexts 256,1024,4096] [--depths 0,0.25,0.5,0.75,1.0]
                                 [--trials N] [--seed S] [--task auto|passkey|records] [--filler auto|valid|builtin]
                                 [--digits D] [--batch-size B] [--json PATH] [--plot PATH] [key=value ...]

Each prompt holds ``context`` tokens at most (BOS included): a short instruction, filler, the needle stating the
value at the given depth of the filler (0 = farthest from the question, 1 = just before it), and the question.
The model decodes the answer greedily; it counts only when every token is the value's (and the true answer's
negative log-likelihood, teacher-forced, shows how close a miss was). Each (context, depth)
cell runs ``--trials`` prompts (default 10) drawn from ``--seed``; the depths of one trial share value and
filler, so a row differs only in where the needle sits.

Tasks (``--task auto`` picks by the run's corpus):

- ``passkey`` (any text corpus): the test of Mohtashami and Jaggi (2023), "The pass key is 68079. Remember it.
  68079 is the pass key." in filler text, then "What is the pass key? The pass key is"; a ``--digits``-digit
  number (default 5). ``--filler valid`` (the default) takes the filler from the run's own validation split, a
  random span per trial, tokenized with the checkpoint's tokenizer (a documents corpus without its EOS tokens);
  ``--filler builtin`` repeats the original test's five sentences ("The grass is green. The sky is blue. ...").
  Nothing is downloaded.
- ``records`` (the built-in synthetic corpus, ``data.source=synthetic``): the corpus's own format: one fact
  "facts : kelo is 37 ." among the corpus's filler sentences, then "questions : what is kelo ?" (or, for
  ``data.synthetic.style=pairs``, "facts : kelo 37 ." and "questions : kelo"); keys and values are the
  corpus's. What the corpus trains (recall of a fact across filler), at any length.

Prints the accuracy table (rows: contexts, columns: depths), writes it with every trial as JSON (default
RUN_DIR/eval/<checkpoint>_passkey_<task>_ctx<contexts>.json) and a heatmap PNG next to it (or ``--plot``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lm.cli.common import (USER_ERRORS, CommandError, add_checkpoint_arguments, add_device_argument, check_writable,
                           command_parser, eval_dir, load_checkpoint, number_list, report_error, resolve_device,
                           write_report)

if TYPE_CHECKING:
    from lm.eval.passkey import PasskeyReport, PasskeyTask

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1.0"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    add_checkpoint_arguments(p, "data.path=DIR")
    p.add_argument("--contexts", help="comma-separated prompt lengths in tokens (default: 1, 2, 4 and 8 times "
                                      "the training context)")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"comma-separated needle depths in [0, 1] "
                                                            f"(default {DEFAULT_DEPTHS})")
    p.add_argument("--trials", type=int, default=10, help="prompts per (context, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="draws values, keys and filler spans")
    p.add_argument("--task", default="auto", choices=["auto", "passkey", "records"],
                   help="auto: records for the synthetic corpus, passkey otherwise")
    p.add_argument("--filler", default="auto", choices=["auto", "valid", "builtin"],
                   help="passkey task: the run's validation split (auto) or the built-in sentences")
    p.add_argument("--digits", type=int, default=5, help="passkey task: digits of the pass key")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    add_device_argument(p)
    p.add_argument("--json", type=Path, help="where to write the results (default RUN_DIR/eval/...)")
    p.add_argument("--plot", type=Path, help="heatmap PNG (default: the JSON path, .png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_intermixed_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[int] | None, list[float]]:
    """Contexts (None = from the training context) and depths, validated with the other numbers."""
    for flag, value in (("--trials", args.trials), ("--batch-size", args.batch_size), ("--digits", args.digits)):
        if value < 1:
            raise CommandError(f"{flag}={value} must be >= 1")
    depths = number_list(args.depths, "--depths", float, DEFAULT_DEPTHS)
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise CommandError(f"--depths={args.depths}: depths are fractions of the filler, in [0, 1]")
    contexts = number_list(args.contexts, "--contexts", int, "256,1024") if args.contexts is not None else None
    if contexts is not None and min(contexts) < 1:
        raise CommandError(f"--contexts must be >= 1, got {contexts}")
    return contexts, depths


def build_task(args: argparse.Namespace, cfg, tokenizer) -> PasskeyTask:
    """The task asked for (``auto``: the corpus's), over the checkpoint's tokenizer."""
    from lm.eval.passkey import passkey_task, records_task
    from lm.eval.perplexity import tokenize_split
    synthetic = cfg.data.source == "synthetic"
    name = args.task if args.task != "auto" else "records" if synthetic else "passkey"
    if name == "records":
        if not synthetic:
            raise CommandError(f"--task records is the synthetic corpus's format; this run trained on "
                               f"data.source={cfg.data.source}: use --task passkey")
        if args.filler != "auto":
            raise CommandError("--filler is for --task passkey (records uses the synthetic corpus's own filler "
                               "sentences): drop --filler")
        from lm.data.synthetic import STYLES, filler_sentence, make_keys
        s = cfg.data.synthetic
        fact, question = STYLES[s.style]
        return records_task(tokenizer.encode, tokenizer.bos_id, make_keys(s.num_keys, s.seed), s.num_values,
                            filler_sentence, fact, question)
    filler = None
    if args.filler in ("auto", "valid"):
        split = tokenize_split(cfg.data, tokenizer, "valid")
        filler = split.tokens
        if split.num_documents:  # one running text: no end of document inside a prompt
            filler = filler[filler != tokenizer.eos_id]
    return passkey_task(tokenizer.encode, tokenizer.bos_id, filler, args.digits)


def format_table(report: PasskeyReport) -> str:
    """Accuracy per context (rows) and depth (columns), with each row's mean; then the true answer's mean NLL
    in the same layout."""
    head = ["context", *[f"depth {d:g}" for d in report.depths], "mean"]

    def block(table, fmt: str) -> list[list[str]]:
        return [[str(c), *[format(a, fmt) for a in row], format(row.mean(), fmt)]
                for c, row in zip(report.contexts, table)]
    accuracy, nll = block(report.accuracy(), ".2f"), block(report.answer_nll(), ".2f")
    widths = [max(len(r[i]) for r in [head, *accuracy, *nll]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    rule = "-" * len(line(head))
    return "\n".join(["accuracy (greedy answer, exact match)", line(head), rule, *map(line, accuracy), "",
                      "answer NLL (nats, teacher-forced; lower is better)", line(head), rule, *map(line, nll),
                      f"{report.task}: {report.description}; {report.trials} trials per cell (seed {report.seed}); "
                      f"a guess that ignores the context is right with probability {report.chance:.2g}"])


def default_json_path(checkpoint: Path, task: str, contexts: list[int]) -> Path:
    return eval_dir(checkpoint) / f"{checkpoint.name}_passkey_{task}_ctx{'-'.join(map(str, contexts))}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lm.eval.passkey import evaluate_passkey  # after parsing: a fast --help
    from lm.eval.plots import plot_passkey

    try:
        contexts, depths = check_args(args)
        device = resolve_device(args.device)
        if args.plot is not None:
            check_writable(args.plot, "--plot")
        inference = load_checkpoint(args.path, args.overrides, device)
        cfg, tokenizer = inference.cfg, inference.tokenizer
        contexts = contexts or [cfg.data.seq_len * k for k in (1, 2, 4, 8)]
        task = build_task(args, cfg, tokenizer)
        json_path = args.json or default_json_path(inference.path, task.name, contexts)
        plot_path = args.plot or json_path.with_suffix(".png")
        check_writable(json_path, "--json")
        check_writable(plot_path, "--plot")
        print(f"checkpoint {inference.path} (step {inference.step}, {cfg.model.attention.kind}, trained at context "
              f"{cfg.data.seq_len}) on {device}; {task.name}: {task.description}", file=sys.stderr)
        report = evaluate_passkey(inference.model, task, contexts, depths, args.trials, args.seed, args.batch_size,
                                  device, decode=tokenizer.decode, progress=not args.no_progress)
    except USER_ERRORS as e:
        return report_error(e, status=2)
    print(format_table(report))
    out = {"checkpoint": str(inference.path), "step": inference.step, "attention": cfg.model.attention.kind,
           "rpe": cfg.model.attention.rpe, "train_context": cfg.data.seq_len, "device": device, **report.to_dict()}
    title = (f"{task.name} retrieval: {cfg.model.attention.kind}, step {inference.step} (training context "
             f"{cfg.data.seq_len})")
    try:
        write_report(json_path, out, lambda path: plot_passkey(report, path, title), plot_path)
    except USER_ERRORS as e:
        return report_error(e, status=2)
    return 0
