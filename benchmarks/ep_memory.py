"""Per-device temporary memory of the expert-parallel layer, forward + backward.

    python -m benchmarks.ep_memory                       # every layer, EP 8
    python -m benchmarks.ep_memory --models goal --ep 8  # the issue-25 goal shape only
    python -m benchmarks.ep_memory --ep 8 64             # EP 64 too (slow compiles)

Nothing runs: `jax.grad` of ``sum(y**2)`` of one MoE layer (SwiGLU, float32,
``impl="xla"``, 1024 tokens per device) is compiled for a ``1 x ep`` mesh of
host CPUs (64 of them are made) with the operands sharded as
`jmoe.parallel.state_shardings` places a layer's state (tokens over the
devices, experts over ``"expert"``), and XLA's ``memory_analysis()`` gives the
temporaries per device. Columns: the same layer on one device over the local
tokens (what a perfectly balanced rank computes), worst-case buffers
(``ep_buffer_factor=None``), and ``ep_buffer_factor`` 1.0 / 1.25 / 2.0; the
ratio is factor 1.25 over one device. XLA:CPU compiles the padded exchange.

A second table gives the rounds the factors take (`plan.num_rounds`) under
uniform routing, Zipf-1 expert popularity (mean of 8 multinomial draws,
`comm_table.expected_rounds`) and all-to-one routing (every token's ``k``
choices on as few ranks as possible, rank 0 first: one rank receives
everything).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64"
    ).strip()

import argparse  # noqa: E402  (the flag must be set before jax is imported)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.comm_table import MODEL_SHAPES, expected_rounds, zipf_load  # noqa: E402
from jmoe import MoEConfig  # noqa: E402
from jmoe.moe import dropless_ffn  # noqa: E402
from jmoe.parallel import EXPERT, expert_parallel_ffn, make_mesh  # noqa: E402
from jmoe.parallel.mesh import TOKEN_SPEC  # noqa: E402
from jmoe.parallel.placement import ExpertSharding  # noqa: E402
from jmoe.parallel.plan import num_rounds  # noqa: E402

# (d_model, d_ff, E, k): issue 25's goal shape (OLMoE-like, narrower) and the canonical layers.
SHAPES = {"goal": (1024, 512, 64, 8), **MODEL_SHAPES}
FACTORS = (1.0, 1.25, 2.0)


def layer_config(name: str) -> MoEConfig:
    d, f, e, k = SHAPES[name]
    return MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, expert_type="glu", impl="xla")


def _operands(config: MoEConfig, tokens: int, mesh=None) -> tuple:
    """Abstract ``(x, gates, expert_ids, w1, w3, w2)``; sharded on ``mesh``."""
    e, d, f, k = config.num_experts, config.d_model, config.d_ff, config.top_k
    experts = P(EXPERT if mesh is not None and e % mesh.shape[EXPERT] == 0 else None, None, None)

    def spec(shape, dtype, partition):
        sharding = None if mesh is None else NamedSharding(mesh, partition)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return (
        spec((tokens, d), jnp.float32, TOKEN_SPEC),
        spec((tokens, k), jnp.float32, TOKEN_SPEC),
        spec((tokens, k), jnp.int32, TOKEN_SPEC),
        spec((e, d, f), jnp.float32, experts),
        spec((e, d, f), jnp.float32, experts),
        spec((e, f, d), jnp.float32, experts),
    )


def _temp_mib(ffn, operands) -> float:
    def loss(x, gates, expert_ids, w1, w3, w2):
        return jnp.sum(ffn(x, gates, expert_ids, w1, w3, w2)[0] ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5))).lower(*operands).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def single_device_mib(config: MoEConfig, tokens_per_device: int) -> float:
    """Temporaries of `dropless_ffn` on one device over ``tokens_per_device`` tokens."""
    ffn = lambda *args: dropless_ffn(config, *args)
    return _temp_mib(ffn, _operands(config, tokens_per_device))


def expert_parallel_mib(
    config: MoEConfig, tokens_per_device: int, ep: int, buffer_factor: float | None
) -> float:
    """Temporaries per device of `expert_parallel_ffn` on a ``1 x ep`` host mesh."""
    mesh = make_mesh(1, ep, devices=jax.devices("cpu")[:ep])
    ffn = lambda *args: expert_parallel_ffn(config, *args, mesh=mesh, buffer_factor=buffer_factor)
    return _temp_mib(ffn, _operands(config, tokens_per_device * ep, mesh))


def all_to_one_rounds(config: MoEConfig, tokens_per_device: int, ep: int, factor: float) -> int:
    """Rounds when every token of every rank picks its ``k`` experts on as few
    ranks as possible, rank 0's first (rank 0 receives ``T * min(k s, L)`` rows
    from every rank)."""
    sharding = ExpertSharding.create(config, ep)
    virtual_k = config.top_k * sharding.hidden_splits
    counts = np.zeros((ep, sharding.num_virtual), np.int32)
    counts[:, :virtual_k] = tokens_per_device  # virtual experts 0.. are rank 0's, then rank 1's
    capacity = sharding.capacity(tokens_per_device, config.top_k, factor)
    return int(num_rounds(jnp.asarray(counts), sharding.num_local, capacity))


def _print_table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|", flush=True)
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |", flush=True)


def print_memory_table(models, eps, tokens: int, factors=FACTORS):
    print(
        f"Temporaries per device, MiB (forward + backward, float32, T={tokens} tokens/device)",
        flush=True,
    )
    header = ("layer", "EP", "one device", "worst case", *(f"f={f}" for f in factors))
    header += ("f=1.25 / one device",) if 1.25 in factors else ()
    _print_table(header, [])
    for name in models:
        config = layer_config(name)
        single = single_device_mib(config, tokens)
        for ep in eps:
            bounded = {f: expert_parallel_mib(config, tokens, ep, f) for f in factors}
            cells = [f"{single:.0f}", f"{expert_parallel_mib(config, tokens, ep, None):.0f}"]
            cells += [f"{bounded[f]:.0f}" for f in factors]
            if 1.25 in factors:
                cells.append(f"{bounded[1.25] / single:.1f}x")
            print(f"| {name} | {ep} | " + " | ".join(cells) + " |", flush=True)


def print_rounds_table(models, eps, tokens: int, factors=FACTORS):
    print(f"\nExchange rounds, T={tokens} tokens/device", flush=True)
    rows = []
    for name in models:
        config = layer_config(name)
        for ep in eps:
            loads = {
                "uniform": np.full(config.num_experts, 1 / config.num_experts),
                "Zipf a=1": zipf_load(config.num_experts, 1.0),
            }
            for label, load in loads.items():
                rounds = [expected_rounds(config, load, tokens, ep, f) for f in factors]
                rows.append((name, ep, label, *(f"{r:.2f}" for r in rounds)))
            rounds = [all_to_one_rounds(config, tokens, ep, f) for f in factors]
            rows.append((name, ep, "all-to-one", *rounds))
    _print_table(("layer", "EP", "routing", *(f"f={f}" for f in factors)), rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ep", type=int, nargs="*", default=[8])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per device")
    parser.add_argument("--table", choices=("memory", "rounds", "all"), default="all")
    args = parser.parse_args(argv)
    if args.table in ("memory", "all"):
        print_memory_table(args.models, args.ep, args.tokens)
    if args.table in ("rounds", "all"):
        print_rounds_table(args.models, args.ep, args.tokens)


if __name__ == "__main__":
    main()
