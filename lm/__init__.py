"""lm: decoder-only language models with causal kernelized attention and relative positional encoding.

Packages by concern (docs/ARCHITECTURE.md has the layers and what each may import):

    ops/        pure tensor functions: the attention op (parallel and recurrent forms), feature maps
    model/      RPE, attention layers, the Transformer, the decoding caches
    data/       corpora, tokenizer and token caches, training batches
    inference/  loading a checkpoint to run it, decoding, sampling
    eval/       perplexity, lm-evaluation-harness
    training/   the loop, engines, distributed, checkpoint saving and resuming
    stability/  the stability study
    cli/        the command lines behind tools/*.py and the lm-* console scripts

and a shared bottom: config/ (the config tree; config/model.py, the model's part, travels in a Hugging Face
export), checkpoint.py (the checkpoint format), tokenizer.py, device.py, fileio.py (crash-safe files), errors.py
(the base of every error a user can fix).
"""
