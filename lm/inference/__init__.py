"""Running a trained model: loading a checkpoint, incremental decoding, sampling. Imports nothing of training
(no DeepSpeed, no engine, no process group).

    loading.py      load_for_inference: a checkpoint (or a run's newest intact one) -> model, config, tokenizer
    decoding.py     prefill + decode_step over the layers' caches
    generation.py   sampling (temperature, top-k, top-p), the generation loop, streaming detokenization
"""
from lm.inference.decoding import DecodeCache, decode_step, prefill
from lm.inference.generation import GenerationStats, Sampling, TextStream, generate
from lm.inference.loading import Inference, load_for_inference

__all__ = ["Inference", "load_for_inference", "DecodeCache", "prefill", "decode_step", "Sampling", "generate",
           "GenerationStats", "TextStream"]
