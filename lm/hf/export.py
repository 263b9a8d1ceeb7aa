"""A checkpoint -> a Hugging Face model directory (:func:`export_checkpoint`, ``tools/export_hf.py``).

The directory::

    config.json                   KernelizedLMConfig: the model config, token ids, the training context, auto_map
    model.safetensors             the weights (float32 or bfloat16), random-feature projections included
    generation_config.json        BOS / EOS / pad ids
    tokenizer.json, tokenizer_config.json   exactly our tokenizer (lm.hf.tokenizer), BOS put first by default
    configuration_lm_kernelized.py, modeling_lm_kernelized.py, lm_kernelized_*.py
                                  what ``trust_remote_code=True`` loads: copies of this package's model code
                                  (:mod:`lm.hf.remote_code`), needing only torch and transformers
    lm_training_config.yaml       the full config the checkpoint was trained with (provenance)
    README.md                     a short model card: what it is, how to load it

It is written into a temporary directory beside ``OUT_DIR`` and checked before it takes that name: the written
model, loaded back, gives the checkpoint's logits on a sample (float32: relative error <= 1e-5). An existing
non-empty ``OUT_DIR`` is kept unless ``force``; with ``force`` the old directory is replaced only once the new one
is complete.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from lm.config import to_yaml
from lm.errors import UserError
from lm.fileio import fsync_dir, fsync_tree
from lm.hf.configuration import KernelizedLMConfig
from lm.hf.modeling import KernelizedLMForCausalLM
from lm.hf.remote_code import CONFIGURATION_FILE, MODELING_FILE, remote_module, write_remote_code
from lm.hf.tokenizer import CHECK_TEXT, save_hf_tokenizer
from lm.inference.loading import Inference, load_for_inference

__all__ = ["ExportError", "Exported", "export_checkpoint", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOGITS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 0.0}
"""How far the written model's logits may be from the checkpoint's (max-norm relative error). bfloat16: the same
computation in the same dtype, so the same numbers."""


class ExportError(UserError, ValueError):
    """An export that cannot be done as asked; the message says what to change."""


@dataclass
class Exported:
    directory: Path
    step: int
    dtype: str
    logits_error: float
    """Max-norm relative error of the written model's logits against the checkpoint's, on the check sample."""


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; give another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} is not empty; give an empty or new OUT_DIR, or pass --force to replace it "
                          f"(it is kept until the new export is complete)")


def _model_card(inference: Inference, dtype: str) -> str:
    m = inference.cfg.model
    a = m.attention
    return "\n".join([
        "# A language model trained with `lm`", "",
        f"Decoder-only Transformer, {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, attention "
        f"`{a.kind}` (feature map {a.feature_map}, RPE {a.rpe}), vocabulary {m.vocab_size}, trained at context "
        f"{inference.cfg.data.seq_len} for {inference.step} steps; weights in {dtype}.", "",
        "Loading needs `torch` and `transformers` only: the model's code is in this directory "
        "(`modeling_lm_kernelized.py` and the files it imports), hence `trust_remote_code=True`.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # it reads config.json too",
        "ids = tokenizer(\"The\", return_tensors=\"pt\")  # BOS first, as the model expects",
        "out = model.generate(**ids, max_new_tokens=50, do_sample=False)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```", "",
        "`lm_training_config.yaml` is the configuration it was trained with.", ""])


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def export_checkpoint(path: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False,
                      overrides=()) -> Exported:
    """Export the checkpoint ``path`` (or a run directory's newest intact one) to ``out_dir`` (see the module
    docstring). ``overrides``: ``key=value`` config overrides applied when loading (e.g. an op method)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r} is not one of {list(DTYPES)}")
    out_dir = Path(out_dir)
    _check_target(out_dir, force)
    inference = load_for_inference(path, overrides, device="cpu")
    tok, cfg = inference.tokenizer, inference.cfg
    config = KernelizedLMConfig.from_model_config(cfg.model, cfg.data.seq_len, bos_token_id=tok.bos_id,
                                                  eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    config.auto_map = {"AutoConfig": f"{CONFIGURATION_FILE}.KernelizedLMConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE}.KernelizedLMForCausalLM"}
    torch_dtype = DTYPES[dtype]
    config.dtype = dtype
    model = KernelizedLMForCausalLM(config)
    model.model.load_state_dict(inference.model.state_dict())
    model = model.to(torch_dtype).eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one file of a few tensors: no progress bars (restored below)
    try:
        model.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        _same_mode_as(tmp / "model.safetensors", tmp / "config.json")  # safetensors writes its file 0600
        try:
            save_hf_tokenizer(tok, tmp)
        except ValueError as e:
            raise ExportError(f"{inference.path}: {e}") from None
        write_remote_code(tmp)
        (tmp / "lm_training_config.yaml").write_text(to_yaml(cfg))
        (tmp / "README.md").write_text(_model_card(inference, dtype))
        error = _check_written(tmp, inference, torch_dtype)
        fsync_tree(tmp)
        _put_in_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    return Exported(out_dir, inference.step, dtype, error)


def _same_mode_as(path: Path, like: Path) -> None:
    """Give ``path`` the permissions of ``like`` (a file written with the umask's default mode)."""
    os.chmod(path, like.stat().st_mode & 0o777)


@torch.no_grad()
def _check_written(directory: Path, inference: Inference, dtype: torch.dtype) -> float:
    """Load the written model back, with the code written beside it, and compare its logits with the checkpoint's
    on the check sample."""
    ids = torch.tensor([[inference.tokenizer.bos_id, *inference.tokenizer.encode(CHECK_TEXT)]])
    want = inference.model.to(dtype)(ids)
    inference.model.float()
    with remote_module(directory, MODELING_FILE) as code:
        loaded = code.KernelizedLMForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
        got = loaded(ids, use_cache=False).logits
    error = _relative_error(got, want)
    if not error <= LOGITS_RTOL[dtype]:
        raise ExportError(f"the written model's logits differ from the checkpoint's (relative error {error:.2e} > "
                          f"{LOGITS_RTOL[dtype]:.0e}): this is a bug in the export, nothing was written")
    return error


def _put_in_place(tmp: Path, out_dir: Path) -> None:
    """Rename the complete export ``tmp`` to ``out_dir``; an existing ``out_dir`` goes only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)
