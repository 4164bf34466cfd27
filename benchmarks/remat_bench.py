"""Activation memory vs step time of `TransformerConfig.remat`, side by side.

    python -m benchmarks.remat_bench                      # xs dMoE, seq 1024, batch 16
    python -m benchmarks.remat_bench --preset s --seq 512 --batch 8 --repeats 5

For each of ``"none"``, ``"ffn"`` and ``"block"`` it compiles the training
step of `experiments.train` (forward, backward, AdamW update) for the preset at
``--seq`` tokens (``max_seq_len`` raised to it) and ``--batch`` sequences, and
prints the compiled step's temporary memory (``compiled.memory_analysis()
.temp_size_in_bytes``: activations and other scratch, not parameters or
optimizer state) and its median step time (rounds interleave the three
steps, see `benchmarks.timing.interleaved_median_seconds`), each also as a
ratio to ``"none"``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import numpy as np
from flax import nnx

from benchmarks.timing import interleaved_median_seconds
from experiments.presets import PRESETS, preset
from experiments.train import TrainConfig, optimizer, train_step
from jmoe.transformer import FFN_KINDS, REMAT_KINDS, MoETransformer


def compiled_step(config: TrainConfig, tokens: np.ndarray):
    """``(compiled train step, its state)`` of ``config`` on ``tokens [batch, seq + 1]``."""
    model = MoETransformer(config.model, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)))
    step = jax.jit(functools.partial(train_step, graphdef)).lower(state, tokens).compile()
    return step, state


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.remat_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", choices=PRESETS, default="xs")
    parser.add_argument("--ffn", choices=FFN_KINDS, default="dmoe")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq + 1), np.int32)
    calls, temp = {}, {}
    for remat in REMAT_KINDS:
        model = preset(args.preset, ffn=args.ffn).replace(max_seq_len=args.seq, remat=remat)
        config = TrainConfig(model=model, out="unused", cache_dir="unused")
        step, state = compiled_step(config, tokens)
        temp[remat] = step.memory_analysis().temp_size_in_bytes
        calls[remat] = (lambda step=step, state=state: step(state, tokens), ())
        print(f"compiled remat={remat}: temp memory {temp[remat] / 2**20:,.1f} MiB", flush=True)
    seconds = interleaved_median_seconds(calls, args.repeats)

    print(
        f"\n{args.preset} {args.ffn}, seq {args.seq}, batch {args.batch}, "
        f"backend {jax.default_backend()}, median of {args.repeats} steps"
    )
    print("| remat | temp memory (MiB) | vs none | step time (s) | vs none |")
    print("|---|---:|---:|---:|---:|")
    for remat in REMAT_KINDS:
        print(
            f"| {remat} | {temp[remat] / 2**20:,.1f} | {temp[remat] / temp['none']:.2f}x | "
            f"{seconds[remat]:.3f} | {seconds[remat] / seconds['none']:.2f}x |"
        )


if __name__ == "__main__":
    main()
