"""CPU schedule of the op: independent (batch, head) items spread over Python worker threads.

On CPU the FFT works best per item on cache-sized tiles; torch's intra-op threads would put a barrier into each
of those small kernels, and on a busy machine a descheduled thread stalls every barrier. Worker threads over
items join once per call instead (transforms and elementwise kernels release the GIL).

The thread policy is an explicit setting, :class:`CPUThreads`, passed down from the op's ``cpu_threads``
argument. Workers make their own kernels single-threaded with :func:`torch.set_num_threads`. torch applies that
to the worker's own OpenMP/MKL settings, but also stores it as the default that threads started later pick up;
so when the workers have joined, the calling thread puts that default back to its own count (which the workers
never change). ``CPUThreads(workers=1)`` starts no threads and touches no setting at all.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["CPUThreads", "run_items"]


@dataclass(frozen=True)
class CPUThreads:
    """How the op uses CPU threads. ``workers``: Python threads that split the (batch, head) items, each running
    torch single-threaded; ``0`` (default) = ``torch.get_num_threads()`` of the calling thread at call time;
    ``1`` = all items in the calling thread, with torch's own intra-op threading as configured."""

    workers: int = 0

    def resolve(self, items: int) -> int:
        """Number of worker threads for ``items`` independent items (>= 1)."""
        if self.workers < 0:
            raise ValueError(f"cpu_threads={self.workers}: use 0 (torch.get_num_threads()) or a positive count")
        want = self.workers or torch.get_num_threads()
        return max(1, min(want, items))


def run_items(fn: Callable[[int, int], None], items: int, workers: int) -> None:
    """Call ``fn(start, stop)`` on contiguous slices of ``range(items)``; with ``workers > 1`` each slice runs
    in its own thread with single-threaded torch kernels and grad mode off."""
    if workers <= 1:
        fn(0, items)
        return
    bounds = [(items * w // workers, items * (w + 1) // workers) for w in range(workers)]

    caller = torch.get_num_threads()

    def work(start: int, stop: int) -> None:
        torch.set_num_threads(1)  # this worker's kernels (it also sets the default for threads started later)
        with torch.no_grad():  # grad mode is per thread, and these are plain kernels
            fn(start, stop)

    try:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work, a, b) for a, b in bounds if b > a]:
                f.result()
    finally:
        torch.set_num_threads(caller)  # restores the default for new threads; the caller's own count is unchanged
