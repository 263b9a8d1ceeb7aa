"""Evaluation: sliding-window perplexity, and EleutherAI's lm-evaluation-harness over our checkpoints.

    perplexity.py     score_tokens / evaluate_split: the one scorer behind eval_ppl and training's validation
    harness.py        the lm-evaluation-harness model lm-kernelized (needs the optional extra: pip install -e '.[eval]')
    harness_tasks.py  local lm-eval tasks over a WikiText-format text file
"""
