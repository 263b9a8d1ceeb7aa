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
    lm_export.json                the export's own marker (written last): what it was exported from, the files
                                  it wrote; only a folder holding it, and nothing else, is replaced by ``force``

It is written into a temporary directory beside ``OUT_DIR`` and checked before it takes that name: the written
model, loaded back, gives the checkpoint's logits on a sample (float32: relative error <= 1e-5). An existing
non-empty ``OUT_DIR`` is kept unless it is an earlier export (its marker names every file in it) and ``force``
is given; then the old export is replaced only once the new one is complete. Never replaced, ``force`` or not:
a training run directory, a folder holding runs, the checkpoint being exported, a folder inside a run whose
trainer holds its ``train.lock``. Every refusal is one line that says what to do instead, before anything is
written; a disk that refuses the export (full, read-only) leaves ``OUT_DIR`` as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from lm.config import to_yaml
from lm.errors import DiskError, UserError, disk_problem
from lm.fileio import atomic_write_text, free_bytes, fsync_dir, fsync_tree, lock_holder, remove_path
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


MARKER = "lm_export.json"
"""The marker every export holds (written last): {"format", "exported_from", "step", "dtype", "files"}."""
RUN_MARKS = ("train.lock", "checkpoints", "steps.jsonl")
"""What makes a folder a training run directory (lm.training.loop writes train.lock first of all)."""


def _is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKS)


def _export_files(out_dir: Path) -> set | None:
    """The files ``out_dir``'s marker says the export wrote; None when it has no readable marker."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
        return set(marker["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _entries(out_dir: Path) -> set:
    return {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if not p.is_dir() or p.is_symlink()}


def _held_run(out_dir: Path) -> tuple[Path, dict] | None:
    """(the run directory, its trainer) when ``out_dir`` is inside (or is) a folder whose train.lock is held."""
    for folder in [out_dir, *out_dir.parents]:
        holder = lock_holder(folder / "train.lock")
        if holder is not None:
            return folder, holder
    return None


def _listed(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _check_target(out_dir: Path, source: Path, force: bool) -> None:
    """A one-line ExportError when ``out_dir`` may not receive the export of ``source`` (see the module
    docstring); nothing is written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; give another OUT_DIR")
    out, src = out_dir.resolve(), source.resolve()
    run = next((p for p in [out, *out.parents] if _is_run(p)), None)
    suggestion = f"give a new folder, e.g. {run / 'hf' if run else out.parent / (out.name + '-hf')}"
    if out == src or out in src.parents:
        raise ExportError(f"OUT_DIR={out_dir} is or holds what is being exported ({source}), which an export never "
                          f"replaces; {suggestion}")
    if any(p.name == "checkpoints" and _is_run(p.parent) for p in [out, *out.parents]):
        raise ExportError(f"OUT_DIR={out_dir} is inside a run's checkpoints/ folder (pruning would delete it); give "
                          f"a folder outside it")
    if _is_run(out):
        raise ExportError(f"OUT_DIR={out_dir} is a training run directory, which an export never replaces; "
                          f"{suggestion}")
    if out.is_dir():
        runs = [p.name for p in out.iterdir() if p.is_dir() and _is_run(p)]
        if runs:
            raise ExportError(f"OUT_DIR={out_dir} holds training runs ({_listed(runs)}), which an export never "
                              f"replaces; {suggestion}")
    empty = not out.is_dir() or not any(out.iterdir())
    held = None if empty else _held_run(out)
    if held is not None:
        raise ExportError(f"OUT_DIR={out_dir} is inside the run directory {held[0]}, in use by a trainer (pid "
                          f"{held[1].get('pid', '?')}): an export there is never replaced while it trains; give "
                          f"another OUT_DIR or wait for the run to end")
    if not empty:
        written = _export_files(out)
        if written is None:
            raise ExportError(f"OUT_DIR={out_dir} is not empty and is not an export of this tool (it holds "
                              f"{_listed(p.name for p in out.iterdir())}); give a new or empty OUT_DIR"
                              f"{' (--force replaces only an earlier export)' if force else ''}")
        foreign = _entries(out) - written
        if foreign:
            raise ExportError(f"OUT_DIR={out_dir} holds an earlier export and files it did not write "
                              f"({_listed(foreign)}); move them out, or give another OUT_DIR")
        if not force:
            raise ExportError(f"OUT_DIR={out_dir} holds an earlier export; pass --force to replace it (it is kept "
                              f"until the new export is complete), or give another OUT_DIR")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent if parent != out else out.parent, os.W_OK | os.X_OK):
        raise ExportError(f"OUT_DIR={out_dir} cannot be written ({parent if parent != out else out.parent} is "
                          f"read-only or not writable); give an OUT_DIR in a writable folder")


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
    _check_target(out_dir, Path(path), force)
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

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one file of a few tensors: no progress bars (restored below)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_path(tmp)
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
        _write_marker(tmp, inference, dtype)
        fsync_tree(tmp)
        _put_in_place(tmp, out_dir, Path(path), force)
    except Exception as e:  # a disk that refuses the export: one line, OUT_DIR as it was
        raise _disk_error(e, tmp, out_dir) or e
    finally:
        with contextlib.suppress(OSError):
            remove_path(tmp)
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


def _write_marker(directory: Path, inference: Inference, dtype: str) -> None:
    """The export's marker (:data:`MARKER`), naming every file written into ``directory``."""
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    atomic_write_text(directory / MARKER, json.dumps({"format": 1, "exported_from": str(inference.path),
                                                      "step": inference.step, "dtype": dtype, "files": files},
                                                     indent=1) + "\n")


def _disk_error(error: Exception, tmp: Path, out_dir: Path) -> DiskError | None:
    """The one-line error for a disk that refused the export, else None (safetensors reports a full disk as its own
    error with the OS's words, "No space left on device (os error 28)": then the free space confirms it)."""
    if isinstance(error, UserError):
        return None
    problem = disk_problem(error)
    if problem is None and (isinstance(error, (OSError, RuntimeError)) or "os error" in str(error)):
        free = free_bytes(tmp)
        problem = "no space left on the device" if free is not None and free < (16 << 20) else None
    if problem is None:
        return None
    return DiskError(f"{problem}: {getattr(error, 'filename', None) or tmp}; nothing was written to {out_dir}: free "
                     f"space there (or give an OUT_DIR on another disk) and run the export again")


def _put_in_place(tmp: Path, out_dir: Path, source: Path, force: bool) -> None:
    """Rename the complete export ``tmp`` to ``out_dir``; an existing ``out_dir`` (an earlier export, checked
    again now: a trainer may have started there meanwhile) goes only after that."""
    old = None
    if out_dir.exists():
        _check_target(out_dir, source, force)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        remove_path(old)
