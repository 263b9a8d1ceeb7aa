"""Evaluation: sliding-window perplexity, context use (loss by position, passkey retrieval), and EleutherAI's
lm-evaluation-harness over our checkpoints.

    perplexity.py     score_tokens / evaluate_split: the one scorer behind eval_ppl and training's validation
    position.py       loss_by_position: mean loss at each position of the window (any causal LM)
    passkey.py        evaluate_passkey: a value hidden at a depth of filler, asked for at the end, greedy answers
    plots.py          their PNGs: loss by position (one line per context), passkey accuracy heatmap
    harness.py        the lm-evaluation-harness model lm-kernelized (needs the optional extra: pip install -e '.[eval]')
    harness_tasks.py  local lm-eval tasks over a WikiText-format text file
"""
