"""The command lines. Each ``tools/<name>.py`` is a thin entry point that calls ``lm.cli.<name>.main``:

    train.py          train [CONFIG.yaml ...] [key=value ...]    (launch.sh runs the same under DeepSpeed)
    eval_ppl.py       perplexity of a checkpoint on a split, sliding windows
    generate.py       sample text from a checkpoint
    prepare_data.py   tokenizer and token caches ahead of training
    harness.py        lm-evaluation-harness tasks on a checkpoint (needs the optional lm-eval)
    harness_tasks.py  local lm-eval tasks over a WikiText-format text file

``common.py`` holds what they share: the errors reported as one line instead of a traceback, device resolution
(:func:`lm.device.resolve_device`) and where a checkpoint's evaluation reports go. Benchmarks
(``tools/bench_*.py``) are measurement scripts, not commands of the library: they stay whole in tools/.
"""
