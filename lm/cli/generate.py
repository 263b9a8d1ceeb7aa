"""Sample text from a trained model: parallel prefill of the prompt, then recurrent decoding.

    python tools/generate.py RUN_DIR_OR_CHECKPOINT [--prompt TEXT | --prompt-file PATH | < stdin]
                             [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                             [--num-samples K] [--stream] [key=value ...]

Temperature 0 is greedy. The same seed gives the same text (sample i uses seed S + i). Generation stops at the
end-of-sequence token or after --max-new-tokens. Without a prompt (and nothing piped on stdin) it starts from
the beginning-of-sequence token alone. There is no context limit: clipped-RPE models decode with constant memory
per token; general-RPE and softmax models keep a cache that grows with the context. The prompt is prefilled in
one parallel pass: for softmax models that pass holds an (heads, n, n) attention bias, so prompts of tens of
thousands of tokens need tens of GB (kernelized models prefill in O(n) memory). The continuation goes to
stdout (streamed with --stream); statistics (tokens/s) go to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lm.cli.common import (USER_ERRORS, CommandError, add_checkpoint_arguments, add_device_argument, command_parser,
                           load_checkpoint, report_error, resolve_device)

if TYPE_CHECKING:
    from lm.inference.generation import Sampling


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser(__doc__)
    add_checkpoint_arguments(p, "model.attention.method=fft")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default: stdin when piped, else empty)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this probability; 1 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    add_device_argument(p)
    return p.parse_intermixed_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CommandError(f"cannot read --prompt-file {str(args.prompt_file)!r}: {e}") from None
    return "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lm.inference.generation import Sampling  # after parsing: a fast --help

    try:
        try:
            sampling = Sampling(args.temperature, args.top_k, args.top_p)
        except ValueError as e:  # the library's check, reported as the command's
            raise CommandError(str(e)) from None
        if args.max_new_tokens < 0:
            raise CommandError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
        if args.num_samples < 1:
            raise CommandError(f"--num-samples={args.num_samples} must be >= 1")
        device = resolve_device(args.device)
        prompt = read_prompt(args)
        inference = load_checkpoint(args.path, args.overrides, device)
    except USER_ERRORS as e:
        return report_error(e, status=2)
    try:
        _sample(args, inference, prompt, device, sampling)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as any Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_BROKEN_PIPE
    return 0


EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a filter whose reader closed the pipe."""


def _sample(args: argparse.Namespace, inference, prompt: str, device, sampling: Sampling) -> None:
    import torch

    from lm.inference.generation import GenerationStats, TextStream, generate
    tok = inference.tokenizer
    prompt_ids = tok.encode(prompt)
    print(f"checkpoint {inference.path} (step {inference.step}, {inference.cfg.model.attention.kind}) on {device}; "
          f"prompt {len(prompt_ids)} tokens", file=sys.stderr)
    out = sys.stdout
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}===== sample {i + 1} (seed {args.seed + i}) =====\n")
        generator = torch.Generator(device=device).manual_seed(args.seed + i)
        stats = GenerationStats()
        stream = TextStream(tok.decode)
        ids = []
        for token in generate(inference.model, prompt_ids, args.max_new_tokens, sampling, bos_id=tok.bos_id,
                              eos_id=tok.eos_id, generator=generator, device=device, stats=stats):
            ids.append(token)
            if args.stream:
                out.write(stream.push(token))
                out.flush()
        out.write(stream.flush() if args.stream else tok.decode(ids))
        out.write("\n")
        out.flush()
        stop = "end of sequence" if stats.stopped_at_eos else "token budget"
        decode = (f"decode {stats.decode_tokens_per_second:.1f} tokens/s" if stats.decode_steps else
                  "no decoding steps")
        print(f"[sample {i + 1}: {stats.new_tokens} new tokens ({stop}); prefill {stats.prompt_tokens + 1} tokens in "
              f"{stats.prefill_seconds:.3f} s; {decode}]", file=sys.stderr, flush=True)
