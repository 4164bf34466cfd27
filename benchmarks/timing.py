"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls, after one warm-up
    (compile) call; every call is waited for with `jax.block_until_ready`."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
