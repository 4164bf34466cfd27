"""Compile time of the training step vs depth: the Python loop of blocks vs
scan over layers (`TransformerConfig.scan_layers`).

    python -m benchmarks.compile_bench                    # xs dMoE at 4, 16 and 32 layers
    python -m benchmarks.compile_bench --preset s --layers 2 8 --ffn dense

For each depth and layout it builds the step of `experiments.train` (the LM
loss's value and gradient, the AdamW update, the expert-bias update) on
abstract state (``nnx.eval_shape``: nothing is initialised), then times
``jax.jit(step).lower(...)`` (tracing) and ``.compile()`` (XLA) once each, in
one process, and prints a table with the ratios to the shallowest depth and
scan / loop. Compile times depend on the machine's load: the ratios of one
run are what to compare.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.presets import PRESET_TRAINING, PRESETS, preset
from experiments.train import TrainConfig, optimizer, train_step
from jmoe.transformer import FFN_KINDS, MoETransformer, TransformerConfig

LAYOUTS = ("loop", "scan")


def compile_seconds(model: TransformerConfig, batch: int) -> tuple[float, float]:
    """``(lower seconds, compile seconds)`` of the train step of ``model`` on
    ``batch`` sequences of ``max_seq_len + 1`` tokens."""
    config = TrainConfig(model=model, out="unused", cache_dir="unused")

    def build():
        lm = MoETransformer(model, rngs=nnx.Rngs(0))
        return lm, nnx.Optimizer(lm, optimizer(config), wrt=nnx.Param)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    tokens = jax.ShapeDtypeStruct((batch, model.max_seq_len + 1), jnp.int32)
    start = time.perf_counter()
    lowered = jax.jit(functools.partial(train_step, graphdef)).lower(state, tokens)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compile_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", choices=PRESETS, default="xs")
    parser.add_argument("--ffn", choices=FFN_KINDS, default="dmoe")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    args = parser.parse_args(argv)
    batch = args.batch or PRESET_TRAINING[args.preset]["batch_size"]

    seconds = {}
    for layers in args.layers:
        for layout in LAYOUTS:
            model = preset(args.preset, ffn=args.ffn).replace(
                num_layers=layers, scan_layers=layout == "scan"
            )
            lower, compile_ = compile_seconds(model, batch)
            seconds[layers, layout] = lower + compile_
            print(
                f"{layers:3d} layers {layout}: lower {lower:.1f} s + compile {compile_:.1f} s",
                flush=True,
            )

    first = args.layers[0]
    print(
        f"\n{args.preset} {args.ffn} train step (value_and_grad + AdamW), batch {batch}, "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s); lower + compile"
    )
    print(f"| layers | loop (s) | vs {first} | scan (s) | vs {first} | scan / loop |")
    print("|---:|---:|---:|---:|---:|---:|")
    for layers in args.layers:
        loop, scan = seconds[layers, "loop"], seconds[layers, "scan"]
        print(
            f"| {layers} | {loop:.1f} | {loop / seconds[first, 'loop']:.2f}x | {scan:.1f} | "
            f"{scan / seconds[first, 'scan']:.2f}x | {scan / loop:.2f}x |"
        )
    return seconds


if __name__ == "__main__":
    main()
