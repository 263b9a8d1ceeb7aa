"""Write local lm-evaluation-harness tasks over a text file (no hub needed): lm/eval/harness_tasks.py.

    python tools/harness_tasks.py wiki.test.tokens DIR [--prefix wikitext_local] [--num-questions 200]
                                  [--num-choices 4] [--seed 0] [--text-field text]

The file is WikiText-format text (one document per article), or documents in a .jsonl / .json (also .gz / .zst) /
.parquet file, their text in the column --text-field names.

then `python tools/harness.py RUN_DIR --tasks wikitext_local_rolling,wikitext_local_next_word --include-path DIR`.
Files of the same names in DIR are replaced.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lm.cli.common import USER_ERRORS, CommandError, command_parser, report_error, reports_disk_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    p.add_argument("text_file", type=Path, help="e.g. wiki.test.tokens, or documents: test.jsonl.gz")
    p.add_argument("out_dir", type=Path, help="directory for the task files (pass it as --include-path)")
    p.add_argument("--prefix", default="wikitext_local", help="task names: PREFIX_rolling, PREFIX_next_word")
    p.add_argument("--num-questions", type=int, default=200, help="multiple-choice questions")
    p.add_argument("--num-choices", type=int, default=4, help="choices per question (one is right)")
    p.add_argument("--seed", type=int, default=0, help="seed of the questions")
    p.add_argument("--text-field", default="text", help="the column holding the text (documents files)")
    return p.parse_args(argv)


@reports_disk_errors(status=2)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lm.eval.harness_tasks import write_tasks  # after parsing: a fast --help

    try:
        if args.num_questions < 1:
            raise CommandError(f"--num-questions={args.num_questions} must be >= 1")
        if args.num_choices < 2:
            raise CommandError(f"--num-choices={args.num_choices} must be >= 2")
        try:
            names = write_tasks(args.text_file, args.out_dir, args.prefix, args.num_questions, args.num_choices,
                                args.seed, text_field=args.text_field)
        except (OSError, UnicodeDecodeError) as e:  # unreadable text file, unwritable directory
            raise CommandError(f"cannot write the tasks of {str(args.text_file)!r} into {str(args.out_dir)!r}: "
                               f"{e}") from None
    except USER_ERRORS as e:
        return report_error(e, status=2)
    print(f"wrote tasks {', '.join(names)} to {args.out_dir} (use --include-path {args.out_dir})")
    return 0
