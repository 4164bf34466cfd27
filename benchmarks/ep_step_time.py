"""Step time of the expert-parallel layer: ``ep_buffer_factor`` against worst-case buffers.

    python -m benchmarks.ep_step_time                 # 8 host CPUs, d 256, E 64, k 8
    python -m benchmarks.ep_step_time --repeats 9 --tokens 512

Forward + backward of one MoE layer (`expert_parallel_ffn`, SwiGLU, float32,
``impl="xla"``; the padded exchange) on a ``1 x 8`` mesh of host CPUs, under
balanced routing (assignment ``i`` to expert ``i mod E``: every rank receives
exactly ``T k`` rows, one round at factor 1.25) and skewed routing (each
token's ``k`` experts drawn without replacement from a Zipf-1 popularity,
experts placed at random). Both buffer settings are timed side by side
(`timing.interleaved_median_seconds`), so a shared machine slows them alike.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402  (the flag must be set before jax is imported)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.comm_table import zipf_load  # noqa: E402
from benchmarks.timing import interleaved_median_seconds  # noqa: E402
from jmoe import MoEConfig  # noqa: E402
from jmoe.parallel import expert_parallel_ffn, make_mesh  # noqa: E402

EP = 8


def routings(tokens: int, num_experts: int, top_k: int) -> dict[str, np.ndarray]:
    """``{name: expert_ids [tokens, k]}``: balanced and Zipf-1 skewed."""
    balanced = np.arange(tokens * top_k).reshape(tokens, top_k) % num_experts
    rng = np.random.default_rng(0)
    load = zipf_load(num_experts, 1.0)
    skewed = np.stack(
        [rng.choice(num_experts, top_k, replace=False, p=load) for _ in range(tokens)]
    )
    return {"balanced": balanced, "Zipf-1": skewed}


def step_fn(config: MoEConfig, mesh, buffer_factor):
    """Jitted ``(x, gates, ids, w1, w3, w2) -> (rounds, grads)`` of ``sum(y**2)``."""

    def loss(x, gates, expert_ids, w1, w3, w2):
        y, _, _, rounds = expert_parallel_ffn(
            config,
            x,
            gates,
            expert_ids,
            w1,
            w3,
            w2,
            mesh=mesh,
            buffer_factor=buffer_factor,
            return_rounds=True,
        )
        return jnp.sum(y * y), rounds

    grad = jax.grad(loss, argnums=(0, 1, 3, 4, 5), has_aux=True)
    return jax.jit(lambda *args: grad(*args)[::-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per device")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=128)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    config = MoEConfig(
        d_model=args.d_model,
        d_ff=args.d_ff,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_type="glu",
        impl="xla",
    )
    mesh = make_mesh(1, EP, devices=jax.devices("cpu")[:EP])
    tokens, d, f, e = args.tokens * EP, args.d_model, args.d_ff, args.experts
    rng = np.random.default_rng(1)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x = normal(tokens, d)
    w1, w3, w2 = normal(e, d, f) / d**0.5, normal(e, d, f) / d**0.5, normal(e, f, d) / f**0.5
    gates = jnp.asarray(rng.random((tokens, args.top_k)), jnp.float32)
    steps = {
        "worst case": step_fn(config, mesh, None),
        f"f={args.factor}": step_fn(config, mesh, args.factor),
    }
    print(
        f"Layer forward+backward on {EP} host CPUs, T={args.tokens} tokens/device, d={d}, "
        f"d_ff={f}, E={e}, k={args.top_k}, float32 (median of {args.repeats}, interleaved)"
    )
    print(
        f"| routing | rounds at f={args.factor} | worst case (ms) | f={args.factor} (ms) | ratio |"
    )
    print("|---|---:|---:|---:|---:|", flush=True)
    for name, ids in routings(tokens, e, args.top_k).items():
        operands = (x, gates, jnp.asarray(ids, jnp.int32), w1, w3, w2)
        rounds = int(steps[f"f={args.factor}"](*operands)[0])
        calls = {label: (fn, operands) for label, fn in steps.items()}
        times = interleaved_median_seconds(calls, args.repeats)
        worst, bounded = times["worst case"], times[f"f={args.factor}"]
        print(
            f"| {name} | {rounds} | {worst * 1e3:.0f} | {bounded * 1e3:.0f} | "
            f"{bounded / worst:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
