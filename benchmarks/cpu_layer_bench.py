"""CPU benchmark: one MoE layer, forward + backward, five ways side by side.

    python -m benchmarks.cpu_layer_bench            # both default cases
    python -m benchmarks.cpu_layer_bench --repeats 5 --cases e8

For each case it times ``value_and_grad`` of a layer (gradients of the input
and of every parameter), side by side: each round calls every layer in turn
(an untimed call, then a timed one), and the median over the rounds is
reported. The layers:

* ``dmoe-xla``: `DroplessMoE` with ``impl="xla"`` (the CPU path: the fused
  expert MLP of `pallas_kernels.fused_mlp`);
* ``dmoe-ragged_dot``: `DroplessMoE` with ``impl="ragged_dot"``
  (``jax.lax.ragged_dot``, which XLA:CPU expands densely over experts);
* ``capacity-cf0``: `CapacityMoE` at the capacity that drops nothing;
* ``balanced-cf1``: `CapacityMoE` at capacity factor 1 with uniform routing
  (every expert gets exactly ``T k / E`` tokens, none dropped): a perfectly
  balanced MoE: the same expert GEMM shapes and token permutation as the
  dMoE with no load imbalance -- the limit for an MoE layer of these shapes;
* ``dense-equal-flops``: a `DenseMLP` of hidden width ``top_k * d_ff`` on the
  same tokens: the same useful FLOPs in one big GEMM (the limit).

and prints the time, the ratio to the dense limit, and executed / useful
FLOPs. Executed FLOPs come from XLA's cost analysis, except for ``dmoe-xla``:
cost analysis counts a ``while`` body once, so its FLOPs are counted from the
chunk schedule the routing produced (`pallas_kernels.xla_impl.chunk_rows`:
each group rounded up to 32 rows).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import interleaved_median_seconds
from jmoe import CapacityMoE, DenseMLP, DroplessMoE, MoEConfig
from pallas_kernels.xla_impl import chunk_rows


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    expert_type: str = "glu"


CASES = {
    "e8": Case("E8 top-2 (Mixtral-like)", 2048, 512, 1024, 8, 2),
    "e64": Case("E64 top-8 (OLMoE-like)", 2048, 512, 256, 64, 8),
}


def _matmuls_per_token(case: Case) -> int:
    return 3 if case.expert_type == "glu" else 2


def useful_flops(case: Case) -> float:
    """Forward + backward expert FLOPs: 3 passes x matmuls x 2 d f per assignment."""
    return 3 * _matmuls_per_token(case) * 2.0 * case.tokens * case.top_k * case.d_model * case.d_ff


def tiled_flops(case: Case, tokens_per_expert: np.ndarray) -> float:
    """FLOPs the ``xla`` impl executes: each expert's rows rounded up to its chunks."""
    rows = int(np.sum(chunk_rows(tokens_per_expert, case.tokens * case.top_k)))
    return 3 * _matmuls_per_token(case) * 2.0 * rows * case.d_model * case.d_ff


def _loss_and_grad(layer, x):
    """Jitted ``(x, params) -> (loss, grads)`` for ``layer``; returns (fn, params)."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    cotangent = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

    def loss(x, params):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * cotangent) + aux["load_balancing_loss"]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _cost_flops(fn, *args) -> float:
    analysis = fn.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis["flops"])


def run_case(case: Case, repeats: int):
    """Times the five layers side by side; returns rows ``(layer, seconds, executed_flops)``."""
    config = MoEConfig(
        d_model=case.d_model,
        d_ff=case.d_ff,
        num_experts=case.num_experts,
        top_k=case.top_k,
        expert_type=case.expert_type,
        block_size=128,
    )
    x = jax.random.normal(jax.random.key(0), (case.tokens, case.d_model), jnp.float32)
    layers = {
        "dmoe-xla": DroplessMoE(config.replace(impl="xla"), rngs=nnx.Rngs(0)),
        "dmoe-ragged_dot": DroplessMoE(config.replace(impl="ragged_dot"), rngs=nnx.Rngs(0)),
        "capacity-cf0": CapacityMoE(config.replace(capacity_factor=0), rngs=nnx.Rngs(0)),
        "balanced-cf1": CapacityMoE(
            config.replace(capacity_factor=1, uniform_expert_assignment=True), rngs=nnx.Rngs(0)
        ),
        "dense-equal-flops": DenseMLP(config, d_ff=case.top_k * case.d_ff, rngs=nnx.Rngs(0)),
    }
    tokens_per_expert = np.asarray(layers["dmoe-xla"](x)[1]["tokens_per_expert"])
    calls = {}
    for name, layer in layers.items():
        fn, params = _loss_and_grad(layer, x)
        calls[name] = (fn, (x, params))
    # ragged_dot takes ~10-100x the others: time it on its own, fewer times.
    slow = {"dmoe-ragged_dot": calls.pop("dmoe-ragged_dot")}
    seconds = {
        **interleaved_median_seconds(calls, repeats),
        **interleaved_median_seconds(slow, max(1, repeats // 3)),
    }
    calls |= slow
    rows = []
    for name in layers:
        fn, args = calls[name]
        if name == "dmoe-xla":
            flops = tiled_flops(case, tokens_per_expert)
        else:
            flops = _cost_flops(fn, *args)
        rows.append((name, seconds[name], flops))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument(
        "--repeats",
        type=int,
        default=11,
        help="rounds of interleaved calls (ragged_dot: a third as many)",
    )
    args = parser.parse_args(argv)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({jax.device_count()} device), float32, fwd+bwd of one layer, "
        f"median of {args.repeats} interleaved rounds"
    )
    for key in args.cases:
        case = CASES[key]
        print(
            f"\n{case.name}: T={case.tokens} d_model={case.d_model} d_ff={case.d_ff} "
            f"E={case.num_experts} k={case.top_k} {case.expert_type}"
        )
        rows = run_case(case, args.repeats)
        dense_seconds = dict((name, s) for name, s, _ in rows)["dense-equal-flops"]
        useful = useful_flops(case)
        print(f"{'layer':<20}{'ms':>10}{'x dense':>10}{'exec/useful FLOPs':>20}")
        for name, seconds, flops in rows:
            print(
                f"{name:<20}{seconds * 1e3:>10.1f}{seconds / dense_seconds:>10.2f}"
                f"{flops / useful:>20.2f}"
            )
        times = dict((name, s) for name, s, _ in rows)
        print(
            f"dmoe-xla vs dense limit: {times['dmoe-xla'] / dense_seconds:.2f}x; "
            f"vs balanced MoE: {times['dmoe-xla'] / times['balanced-cf1']:.2f}x; "
            f"ragged_dot / dmoe-xla: {times['dmoe-ragged_dot'] / times['dmoe-xla']:.1f}x"
        )


if __name__ == "__main__":
    main()
