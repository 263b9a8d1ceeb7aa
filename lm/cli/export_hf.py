"""Export a trained model to a Hugging Face transformers model directory.

    python tools/export_hf.py RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype float32|bfloat16] [--force] [key=value ...]

Writes config.json, model.safetensors, generation_config.json, the tokenizer files (tokenizer.json: exactly our
tokenizer's ids, BOS first), the model's code that ``trust_remote_code=True`` loads (copies of this package's
modules, needing only torch and transformers where the model is loaded) and a model card. Load it with
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(OUT_DIR,
trust_remote_code=True)``. Given a run directory it exports the newest intact checkpoint. The export is checked
before it is put in place (the written model's logits equal the checkpoint's). --force replaces only an earlier
export (recognised by its lm_export.json), once the new one is complete; a run directory, a folder holding runs or
anything else is never replaced. Needs the optional extra: pip install -e '.[hf]'.
"""
from __future__ import annotations

from lm.cli.common import USER_ERRORS, command_parser, report_error, tell_deepspeed_the_accelerator


def main(argv: list[str] | None = None) -> int:
    p = command_parser(__doc__)
    p.add_argument("path", help="run directory (its newest checkpoint) or one checkpoints/step_* directory")
    p.add_argument("out_dir", help="the Hugging Face model directory to write")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.attention.method=fft")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="replace an earlier export in OUT_DIR (and nothing else)")
    args = p.parse_intermixed_args(argv)
    tell_deepspeed_the_accelerator()
    try:
        from lm.hf.export import export_checkpoint  # needs the optional extra: the error says how to install it

        done = export_checkpoint(args.path, args.out_dir, args.dtype, args.force, args.overrides)
    except USER_ERRORS as e:
        return report_error(e, status=2)
    print(f"exported step {done.step} ({done.dtype}) to {done.directory} (logits checked: relative error "
          f"{done.logits_error:.1e})")
    return 0
