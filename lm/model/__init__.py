"""The model: relative positional encodings, the attention layers, and the decoder-only Transformer built from
:class:`lm.config.model.ModelConfig` alone (it knows nothing of devices, launchers or files).

    rpe.py          clipped RPE tables (per offset, T5 buckets) and the causal bias matrix of softmax attention
    attention.py    kernelized (random features + the op) and softmax attention layers
    cache.py        the decoding state a layer keeps between calls (recurrent state, KV cache)
    transformer.py  the Transformer: embeddings, pre-norm blocks, tied output
"""
from lm.model.transformer import INIT_STD, Block, Transformer, build_rpe, sinusoidal_positions

__all__ = ["Transformer", "Block", "build_rpe", "sinusoidal_positions", "INIT_STD"]
