"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax


def _seconds(fn, *args, calls: int = 1) -> float:
    """Seconds per call of ``calls`` back-to-back calls (waiting for the last)."""
    start = time.perf_counter()
    for _ in range(calls - 1):
        fn(*args)
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / calls


def median_seconds(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` over ``repeats`` calls, after one warm-up
    (compile) call; every call is waited for with `jax.block_until_ready`."""
    jax.block_until_ready(fn(*args))
    return statistics.median(_seconds(fn, *args) for _ in range(repeats))


def interleaved_samples(calls: dict, repeats: int, calls_per_sample: int = 1) -> dict:
    """``{name: (fn, args)}`` -> ``{name: [seconds per call, one per round]}``, timed side by side.

    Every round runs each function in turn, so a slow spell of a shared
    machine hits all of them alike instead of whichever happened to be
    running. Each timed call follows an untimed one of the same function: it
    measures the steady state of a training loop (the allocator holding that
    program's buffers), not the cost of switching programs. A sample is the
    mean of ``calls_per_sample`` back-to-back calls (launch gaps hidden behind
    queued work, as in a training step).
    """
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            jax.block_until_ready(fn(*args))
            samples[name].append(_seconds(fn, *args, calls=calls_per_sample))
    return samples


def interleaved_median_seconds(calls: dict, repeats: int, calls_per_sample: int = 1) -> dict:
    """``{name: (fn, args)}`` -> ``{name: median seconds}`` of `interleaved_samples`."""
    samples = interleaved_samples(calls, repeats, calls_per_sample)
    return {name: statistics.median(times) for name, times in samples.items()}
