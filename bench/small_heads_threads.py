"""Bench: the MIL head's training on 2 torch intra-op threads vs 1, alternating in one process.

Why the MIL and VQA heads train inside `one_torch_thread()` (mmkd/evaluation/tasks/__init__.py): their ops are
too small to share between threads. Runs the MIL task's training loop (bypassing the one-thread guard) on a bag
set shaped like the default suite's (160 bags x 6 instances, 128-d, 5 folds), 3 rounds of (2 threads, 1
thread), and prints the median of each and their ratio. Usage: .venv/bin/python bench/small_heads_threads.py
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

import numpy as np
import torch

import mmkd.evaluation.tasks.mil as mil_task


def run(threads: int, bags, labels) -> float:
    """In a worker thread, as the Prefect flow's evaluation units run."""
    out = []

    def work():
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        mil_task.mil(bags, labels, 2, seed=0)
        out.append(time.perf_counter() - t0)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return out[0]


def main() -> None:
    mil_task.one_torch_thread = contextlib.nullcontext  # measure the raw loop at the thread count set here
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(6, 128)).astype(np.float32) for _ in range(160)]
    labels = rng.integers(0, 2, 160)
    times: dict[int, list[float]] = {2: [], 1: []}
    for _ in range(3):
        for threads in (2, 1):
            times[threads].append(run(threads, bags, labels))
    two, one = statistics.median(times[2]), statistics.median(times[1])
    print(f"2 threads: {two:.2f} s, 1 thread: {one:.2f} s (medians of 3); 1-thread / 2-thread time: {one / two:.2f}")


if __name__ == "__main__":
    main()
