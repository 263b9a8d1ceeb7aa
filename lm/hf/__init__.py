"""Hugging Face ``transformers`` integration: a model trained here as a ``transformers`` causal LM.

    configuration.py  KernelizedLMConfig: our model config inside a transformers config (model_type lm_kernelized)
    modeling.py       KernelizedLMForCausalLM (forward with padding masks, position ids, logits_to_keep, labels)
                      and KernelizedCache, our constant-memory decoding state as a transformers Cache
    tokenizer.py      our SentencePiece tokenizer as a transformers tokenizer.json (exactly the same ids)
    export.py         export_checkpoint: a checkpoint -> a Hugging Face model directory

Importing this package registers the classes with ``AutoConfig`` and ``AutoModelForCausalLM``, so an exported
directory then loads without ``trust_remote_code``. It needs the optional extra ``pip install -e '.[hf]'``;
without it, importing raises :class:`HFMissing` with that one line.
"""
from __future__ import annotations

from lm.errors import UserError


class HFMissing(UserError, ImportError):
    """transformers / safetensors are not installed."""


try:
    import safetensors  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise HFMissing(f"the Hugging Face integration needs transformers and safetensors ({e.name} is missing): "
                    f"pip install -e '.[hf]' in the lm repository") from None

from lm.hf.configuration import MODEL_TYPE, KernelizedLMConfig  # noqa: E402
from lm.hf.modeling import KernelizedCache, KernelizedLMForCausalLM  # noqa: E402


def register() -> None:
    """Register the classes with transformers' Auto factories (idempotent; done on import)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, KernelizedLMConfig)
    except ValueError:  # already registered (a second import, or the remote-code copy of this module)
        pass
    try:
        AutoModelForCausalLM.register(KernelizedLMConfig, KernelizedLMForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["KernelizedLMConfig", "KernelizedLMForCausalLM", "KernelizedCache", "HFMissing", "register", "MODEL_TYPE"]
