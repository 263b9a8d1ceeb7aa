"""The command lines. Each ``tools/<name>.py`` is a thin entry point that calls ``lm.cli.<name>.main``, and each is
also the console script ``lm-<name>`` (``pyproject.toml``):

    train.py            train [CONFIG.yaml ...] [key=value ...]    (launch.sh, torchrun and srun run the same)
    prepare_data.py     tokenizer and token caches ahead of training
    eval_ppl.py         perplexity of a checkpoint on a split, sliding windows (or per document)
    generate.py         sample text from a checkpoint
    harness.py          lm-evaluation-harness tasks on a checkpoint (needs the optional extra eval)
    harness_tasks.py    local lm-eval tasks over a WikiText-format text file or a file of documents
    export_hf.py        a checkpoint -> a Hugging Face transformers model directory (needs the optional extra hf)
    stability_study.py  the stability study: a grid of small runs, which diverge, how well the others do
    stability_probe.py  what the attention looks like on the way to a run's first bad step

``common.py`` holds what they share: the errors reported as one line instead of a traceback, device resolution
(:func:`lm.device.resolve_device`) and where a checkpoint's evaluation reports go. Benchmarks
(``tools/bench_*.py``) and the GPU check (``tools/gpu_check.sh``) are measurement scripts, not commands of the
library: they stay whole in tools/.
"""
