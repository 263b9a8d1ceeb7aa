"""Training: the loop and everything only training needs.

    loop.py             train(cfg): the training loop (tools/train.py, launch.sh)
    engine.py           one optimizer step: DeepSpeed and a plain-torch twin behind one interface
    distributed.py      process group, sequence-parallel shard, every collective (on the backend's device)
    optimizer_state.py  Adam moments by parameter name, in and out of DeepSpeed
    schedule.py         the learning-rate schedule
    divergence.py       which steps are bad, when a run has diverged
    steplog.py          RUN/steps.jsonl, one record per step
    checkpointing.py    saving, pruning and resuming checkpoints (their format is lm.checkpoint)
    memory.py           whether a training step fits in the device's memory, told before anything is written
    preemption.py       stopping early and saved on a signal or a time limit; saving by the clock; SLURM requeue

Nothing outside training imports this package except the stability study and the command lines: evaluation,
generation and export load checkpoints through :mod:`lm.inference`, without DeepSpeed or a process group.
"""
