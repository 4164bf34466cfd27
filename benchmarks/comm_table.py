"""Bytes each device sends per MoE layer (forward): the expert-parallel
exchange against all-gathering every token of the expert-parallel group.

    python -m benchmarks.comm_table                      # T=4096/device d=1024 E=64 k=8
    python -m benchmarks.comm_table --top-k 1 --tokens 2048

Nothing runs: each variant is compiled (or lowered) on 8 host CPU devices and
the collectives are read off the program text, at expert-parallel sizes 2, 4
and 8 (mesh ``1 x ep``). Tokens are float32 because XLA:CPU widens bfloat16
collectives to float32; bfloat16 halves every number.

* ``ragged``: `expert_parallel_ffn` lowered for CUDA on an abstract mesh (the
  ragged all-to-all does not compile for CPU). What it moves depends on the
  routing; the program gives the size ``R`` of a device's ``T * k``
  expert-sorted rows (the dispatch operand, the combine result). Balanced
  routing: each of the two exchanges sends ``R (ep-1)/ep``. Hot rank (every
  token routed to its experts): it sends nothing in the dispatch and
  ``R (ep-1)`` back in the combine.
* ``padded``: the XLA:CPU fallback, compiled: ``all_to_all`` of worst-case
  ``[ep, min(T*k, capacity), d]`` buckets each way.
* ``all-gather``: the alternative without an exchange, compiled: all-gather
  the group's tokens and routing, run the local experts on all of them,
  reduce-scatter the outputs.

Bytes sent per device by a collective over a group of ``g`` with operand
``B`` bytes (ring algorithms): all-to-all ``B (g-1)/g``, all-gather
``B (g-1)``, reduce-scatter ``B (g-1)/g``, all-reduce ``2 B (g-1)/g``. The
backward pass sends the same again (each collective's transpose moves the
same bytes).

A second table (``--table buffers``; nothing compiled) compares each rank's
receive-buffer memory at Mixtral-, OLMoE- and DeepSeek-V3-like shapes at EP 8
and 64: the worst-case buffer against ``ep_buffer_factor`` 1.0 / 1.25 / 2.0
(rows from `ExpertSharding.capacity`, padded to blocks as the layout is), and
the expected number of exchange rounds (`plan.num_rounds`) when every rank's
``T k`` assignments are drawn from a routing distribution: uniform, Zipf
(expert popularity ``1 / rank^a``, experts placed on ranks at random), and,
with ``--metrics runs/x/metrics.jsonl``, the per-layer expert loads an
`experiments.train` run logged (``expert_load``; the run's own E).

    python -m benchmarks.comm_table --table buffers
    python -m benchmarks.comm_table --table buffers --metrics runs/xs-dmoe/metrics.jsonl
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402  (the flag must be set before jax is imported)
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AbstractDevice, AbstractMesh  # noqa: E402
from jax.sharding import PartitionSpec as P

from jmoe import MoEConfig  # noqa: E402
from jmoe.moe import dropless_ffn  # noqa: E402
from jmoe.parallel import EXPERT, expert_parallel_ffn, make_mesh  # noqa: E402
from jmoe.parallel.mesh import TOKEN_SPEC  # noqa: E402
from jmoe.parallel.placement import ExpertSharding  # noqa: E402
from jmoe.parallel.plan import num_rounds  # noqa: E402
from pallas_kernels.topology import max_block_rows  # noqa: E402

EP_SIZES = (2, 4, 8)
_DTYPE_BYTES = {
    "bf16": 2,
    "f16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "pred": 1,
    "s8": 1,
    "u8": 1,
}
_HLO_OPS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce")
# `%x = f32[256,128]{1,0} all-gather(%y), ..., replica_groups=mesh['data'=1,'expert'=4] {'expert'}`
_HLO_COLLECTIVE = re.compile(
    r"= (?P<result>\([^)]*\)|\S+) (?P<op>" + "|".join(_HLO_OPS) + r")(?:-start)?\("
    r".*?replica_groups=(?P<groups>mesh\[[^\]]*\] \{[^}]*\}|\{\{[^}]*\}|\[[\d,]+\]<=)"
)
_HLO_SHAPE = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_MESH_AXIS = re.compile(r"'(?P<name>[^']+)'=(?P<size>\d+)")
# `stablehlo.custom_call @ragged_all_to_all(...) ... : (tensor<32768x1024xf32>, tensor<...`
_RAGGED = re.compile(
    r"@ragged_all_to_all\(.*?: \(tensor<(?P<operand>[^>]*)>, tensor<(?P<output>[^>]*)>"
)
_MLIR_DTYPES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4}


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    operand_bytes: int
    group: int

    @property
    def sent_bytes(self) -> float:
        g, b = self.group, self.operand_bytes
        return {
            "all-to-all": b * (g - 1) / g,
            "all-gather": b * (g - 1),
            "reduce-scatter": b * (g - 1) / g,
            "all-reduce": 2 * b * (g - 1) / g,
        }[self.op]


def _group_size(groups: str) -> int:
    """Devices per group of an HLO ``replica_groups`` attribute (any of its three forms)."""
    if groups.startswith("mesh["):  # mesh['data'=1,'expert'=4] {'expert'}
        mesh, axes = groups.split("] {")
        sizes = {m["name"]: int(m["size"]) for m in _MESH_AXIS.finditer(mesh)}
        return math.prod(sizes[a.strip("' ")] for a in axes.rstrip("}").split(","))
    if groups.startswith("{{"):  # explicit {{0,1,2,3},{4,5,6,7}}
        return len(groups[2:].split(","))
    return int(groups[1:-3].split(",")[-1])  # iota [num_groups,size]<=


def hlo_collectives(text: str) -> list[Collective]:
    """Collectives of a compiled HLO module, with operand bytes and group size.

    Operands are printed by name only, so their size comes from the result
    shape: an all-gather's operand is ``1/g`` of its result, a
    reduce-scatter's ``g`` times it, the others' the same.
    """
    found = []
    for match in _HLO_COLLECTIVE.finditer(text):
        group = _group_size(match["groups"])
        result = sum(
            _DTYPE_BYTES[s["dtype"]] * math.prod(int(d) for d in s["dims"].split(",") if d)
            for s in _HLO_SHAPE.finditer(match["result"])
        )
        operand = {"all-gather": result // group, "reduce-scatter": result * group}.get(
            match["op"], result
        )
        found.append(Collective(match["op"], operand, group))
    return found


def _tensor_bytes(mlir_type: str) -> int:
    *dims, dtype = mlir_type.split("x")
    return _MLIR_DTYPES[dtype] * math.prod(map(int, dims))


def ragged_row_bytes(text: str) -> int:
    """Bytes of a device's expert-sorted rows in lowered StableHLO text: the
    smaller of operand and output of its ``ragged_all_to_all`` calls (the
    dispatch operand and the combine output; the other side is the receive
    layout, sized for the worst case)."""
    return min(
        min(_tensor_bytes(m["operand"]), _tensor_bytes(m["output"])) for m in _RAGGED.finditer(text)
    )


def _inputs(config: MoEConfig, tokens: int):
    """Abstract ``(x, weights, indices, w1, w3, w2)`` for ``tokens`` global tokens."""
    e, d, f, k = config.num_experts, config.d_model, config.d_ff, config.top_k
    spec = jax.ShapeDtypeStruct
    return (
        spec((tokens, d), config.dtype),
        spec((tokens, k), jnp.float32),
        spec((tokens, k), jnp.int32),
        spec((e, d, f), config.dtype),
        None,
        spec((e, f, d), config.dtype),
    )


def _exchange_fn(config, mesh, exchange):
    return lambda x, w, i, w1, w3, w2: expert_parallel_ffn(
        config, x, w, i, w1, w3, w2, mesh=mesh, exchange=exchange
    )[0]


def allgather_ffn(config: MoEConfig, mesh):
    """The no-exchange alternative: each rank gathers the group's tokens and
    routing, computes its own experts for all of them (other experts' weights
    zeroed) and reduce-scatters the sums. ``-> fn(x, weights, indices, w1, w3, w2)``."""
    num_local = config.num_experts // mesh.shape[EXPERT]
    local = config.replace(num_experts=num_local, top_k=min(config.top_k, num_local))

    def body(x, weights, indices, w1, w3, w2):
        gather = lambda a: lax.all_gather(a, EXPERT, tiled=True)
        x, weights, indices = gather(x), gather(weights), gather(indices)
        local_ids = indices - lax.axis_index(EXPERT) * num_local
        mine = (local_ids >= 0) & (local_ids < num_local)
        y, _ = dropless_ffn(
            local, x, jnp.where(mine, weights, 0.0), jnp.where(mine, local_ids, 0), w1, w3, w2
        )
        return lax.psum_scatter(y, EXPERT, tiled=True)

    expert_spec = P(EXPERT, None, None)
    return jax.shard_map(
        body,
        mesh=mesh,
        check_vma=False,
        in_specs=(TOKEN_SPEC,) * 3 + (expert_spec,) * 3,
        out_specs=TOKEN_SPEC,
    )


def measure(config: MoEConfig, tokens_per_device: int, ep: int) -> dict:
    """MiB sent per device per layer (forward) by each variant at EP size ``ep``."""
    mesh = make_mesh(1, ep, devices=jax.devices("cpu"))
    args = _inputs(config, tokens_per_device * ep)
    mib = lambda collectives: sum(c.sent_bytes for c in collectives) / 2**20
    padded = jax.jit(_exchange_fn(config, mesh, "padded")).lower(*args).compile().as_text()
    allgather = jax.jit(allgather_ffn(config, mesh)).lower(*args).compile().as_text()
    gpu = AbstractDevice(device_kind="gpu", num_cores=None, platform="cuda")
    abstract = AbstractMesh(
        (1, ep), mesh.axis_names, axis_types=mesh.axis_types, abstract_device=gpu
    )
    with jax.sharding.use_abstract_mesh(abstract):
        ragged_text = (
            jax.jit(_exchange_fn(config, abstract, "auto"))
            .trace(*args)
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    rows = ragged_row_bytes(ragged_text)
    return {
        "ragged_balanced": 2 * rows * (ep - 1) / ep / 2**20,
        "ragged_hot_rank": rows * (ep - 1) / 2**20,
        "padded": mib(hlo_collectives(padded)),
        "allgather": mib(hlo_collectives(allgather)),
    }


# (d_model, d_ff, E, k) of the canonical layers (SwiGLU experts).
MODEL_SHAPES = {
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "OLMoE-1B-7B": (2048, 1024, 64, 8),
    "DeepSeek-V3": (7168, 2048, 256, 8),
}
BUFFER_EP_SIZES = (8, 64)
BUFFER_FACTORS = (1.0, 1.25, 2.0)


def buffer_rows(
    config: MoEConfig, tokens_per_device: int, ep: int, buffer_factor: float | None
) -> int:
    """Rows of one rank's receive layout: the buffer `ExpertSharding.capacity`
    sizes (worst case for None), padded to blocks as `make_topology` pads it."""
    sharding = ExpertSharding.create(config, ep)
    rows = sharding.capacity(tokens_per_device, config.top_k, buffer_factor)
    return max_block_rows(rows, sharding.num_local, config.block_size) * config.block_size


def buffer_gib(config: MoEConfig, rows: int, ep: int, dtype_bytes: int = 2) -> float:
    """GiB of one rank's activations that scale with its buffer: received rows
    and expert outputs ``[rows, d]``, gate, up and activation ``[rows, d_ff / s]``
    (SwiGLU; ``s`` hidden splits). One layer, forward, bf16 by default."""
    d_ff = config.d_ff // ExpertSharding.create(config, ep).hidden_splits
    hidden = 3 if config.expert_type == "glu" else 2
    return rows * (2 * config.d_model + hidden * d_ff) * dtype_bytes / 2**30


def zipf_load(num_experts: int, exponent: float, seed: int = 0) -> np.ndarray:
    """``[E]`` expert popularity ``~ 1 / rank^exponent``, experts shuffled over ranks."""
    load = 1.0 / np.arange(1, num_experts + 1) ** exponent
    return np.random.default_rng(seed).permutation(load / load.sum())


def measured_loads(path: str) -> list[np.ndarray]:
    """Per MoE layer ``[E]`` share of the assignments, from the last ``"train"``
    record of an `experiments.train` ``metrics.jsonl`` (``expert_load``)."""
    with open(path) as f:
        train = [r for r in map(json.loads, filter(str.strip, f)) if r["kind"] == "train"]
    if not train:
        raise ValueError(f"{path} has no 'train' records with expert_load")
    return [np.asarray(layer, np.float64) for layer in train[-1]["expert_load"]]


def expected_rounds(
    config: MoEConfig,
    load: np.ndarray,
    tokens_per_device: int,
    ep: int,
    buffer_factor: float,
    samples: int = 8,
    seed: int = 0,
) -> float:
    """Mean `plan.num_rounds` over ``samples`` draws of the ``[ep, E]`` counts:
    each rank's ``T k`` assignments split over the experts as ``load``
    (multinomial), each sent to all hidden splits of its expert."""
    sharding = ExpertSharding.create(config, ep)
    capacity = sharding.capacity(tokens_per_device, config.top_k, buffer_factor)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(tokens_per_device * config.top_k, load / load.sum(), size=(samples, ep))
    counts = np.repeat(draws, sharding.hidden_splits, axis=-1)  # [samples, ep, E*s]
    rounds = [int(num_rounds(jnp.asarray(c), sharding.num_local, capacity)) for c in counts]
    return float(np.mean(rounds))


def _print_table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


def print_buffer_tables(
    tokens: int, metrics: str | None, metrics_top_k: int, zipf: tuple[float, ...]
):
    """The two tables of ``--table buffers`` (see the module docstring)."""
    configs = {
        name: MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k, expert_type="glu", impl="xla")
        for name, (d, f, e, k) in MODEL_SHAPES.items()
    }
    print(
        f"\nReceive layout per rank, one layer: rows (GiB of bf16 activations that scale "
        f"with it), T={tokens} tokens/device, block 128"
    )
    header = ("model", "EP", "worst case", *(f"f={f}" for f in BUFFER_FACTORS), "worst / f=1.0")
    table = []
    for name, config in configs.items():
        for ep in BUFFER_EP_SIZES:
            rows = [buffer_rows(config, tokens, ep, f) for f in (None, *BUFFER_FACTORS)]
            cells = [f"{r} ({buffer_gib(config, r, ep):.2f})" for r in rows]
            table.append((name, ep, *cells, f"{rows[0] / rows[1]:.1f}x"))
    _print_table(header, table)
    loads = {
        "uniform": lambda e: np.full(e, 1.0 / e),
        **{f"Zipf a={a}": lambda e, a=a: zipf_load(e, a) for a in zipf},
    }
    print(
        f"\nExpected exchange rounds (mean of 8 draws of every rank's T k assignments), T={tokens}"
    )
    header = ("model", "EP", "routing", *(f"f={f}" for f in BUFFER_FACTORS))
    table = []
    for name, config in configs.items():
        for ep in BUFFER_EP_SIZES:
            for label, load_of in loads.items():
                load = load_of(config.num_experts)
                table.append(
                    (
                        name,
                        ep,
                        label,
                        *(
                            f"{expected_rounds(config, load, tokens, ep, f):.2f}"
                            for f in BUFFER_FACTORS
                        ),
                    )
                )
    for layer, load in enumerate(measured_loads(metrics) if metrics else ()):
        config = MoEConfig(
            d_model=64, d_ff=64, num_experts=load.shape[0], top_k=metrics_top_k, impl="xla"
        )
        for ep in (2, 4, 8):
            if config.num_experts % ep and ep % config.num_experts:
                continue
            table.append(
                (
                    f"run layer {layer} (E {load.shape[0]}, k {metrics_top_k})",
                    ep,
                    "measured",
                    *(
                        f"{expected_rounds(config, load, tokens, ep, f):.2f}"
                        for f in BUFFER_FACTORS
                    ),
                )
            )
    _print_table(header, table)


def print_comm_table(config: MoEConfig, tokens: int):
    print(
        f"MiB sent per device per MoE layer (forward; backward sends the same again), "
        f"T={tokens} tokens/device, d={config.d_model}, E={config.num_experts}, "
        f"k={config.top_k}, float32"
    )
    header = (
        "EP",
        "ragged, balanced",
        "ragged, hot rank",
        "padded (CPU)",
        "all-gather",
        "ragged balanced / all-gather",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for ep in EP_SIZES:
        r = measure(config, tokens, ep)
        cells = (
            ep,
            f"{r['ragged_balanced']:.1f}",
            f"{r['ragged_hot_rank']:.1f}",
            f"{r['padded']:.1f}",
            f"{r['allgather']:.1f}",
            f"{r['ragged_balanced'] / r['allgather']:.2f}",
        )
        print("| " + " | ".join(map(str, cells)) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per device")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--table", choices=("comm", "buffers", "all"), default="all")
    parser.add_argument(
        "--metrics",
        default=None,
        help="an experiments.train metrics.jsonl: rounds for its expert loads",
    )
    parser.add_argument(
        "--metrics-top-k",
        type=int,
        default=1,
        help="top_k of the --metrics run (the train presets use 1)",
    )
    parser.add_argument(
        "--zipf",
        type=float,
        nargs="*",
        default=(0.5, 1.0),
        help="Zipf exponents of the modelled skewed routings",
    )
    args = parser.parse_args(argv)
    if args.table in ("comm", "all"):
        config = MoEConfig(
            d_model=args.d_model,
            d_ff=args.d_ff,
            num_experts=args.experts,
            top_k=args.top_k,
            impl="xla",
        )
        print_comm_table(config, args.tokens)
    if args.table in ("buffers", "all"):
        print_buffer_tables(args.tokens, args.metrics, args.metrics_top_k, tuple(args.zipf))


if __name__ == "__main__":
    main()
