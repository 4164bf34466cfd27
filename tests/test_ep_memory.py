"""With ``ep_buffer_factor`` set, no array of the compiled expert-parallel
forward+backward is sized for the worst case.

At EP 8 with the worst-case receive buffer 8x the round's buffer, every
instruction's shape is read off the program: the optimized HLO compiled for
the 8 host CPUs (the padded exchange), and, for the ragged exchange (which
XLA:CPU cannot compile), the StableHLO lowered for CUDA on an abstract mesh,
inside the ``shard_map`` bodies (per-device shapes; outside them arrays are
global). An array fails when it has at least the worst case's
``ep * T_local * min(k*s, L)`` rows: a dimension that long, or as many
elements as that many rows of the narrower of ``d_model`` and ``d_ff / s``
(any dtype: masks and broadcast indices too). The local expert weights are
smaller at these shapes. The same check
finds the worst-case arrays of ``ep_buffer_factor=None``, so it can fail.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.ep_memory import all_to_one_rounds, layer_config
from helpers.expert_parallel import abstract_gpu_mesh
from helpers.host_devices import host_cpus
from jmoe import MoEConfig
from jmoe.parallel import EXPERT, expert_parallel_ffn, make_mesh
from jmoe.parallel.mesh import TOKEN_SPEC
from jmoe.parallel.placement import ExpertSharding

EP, TOKENS_PER_DEVICE = 8, 32
# (E, k, d_ff, buffer factor): worst case / round buffer = 8 in both.
PLAIN = (16, 2, 64, 1.0)  # L = 2: worst 8 * 32 * 2 = 512 rows, buffer 32 * 2 = 64
HIDDEN = (4, 1, 32, 0.5)  # s = 2 splits, L = 1: worst 8 * 32 = 256 rows, buffer 32 * 2 / 2 = 32

_HLO_ARRAY = re.compile(r"\b(?P<dtype>pred|[suf]\d+|bf16)\[(?P<dims>[\d,]*)\]")
_MLIR_ARRAY = re.compile(r"tensor<(?P<dims>(?:\d+x)+)(?P<dtype>i1|i\d+|ui\d+|f\d+|bf16)>")


def _config(num_experts, top_k, d_ff, _=None):
    return MoEConfig(
        d_model=24,
        d_ff=d_ff,
        num_experts=num_experts,
        top_k=top_k,
        expert_type="glu",
        block_size=32,
        impl="xla",
    )


def _large(arrays, rows: int, width: int) -> set[str]:
    """The arrays with a dimension of ``rows`` or more, or as many elements as
    ``rows`` rows of ``width``."""
    found = set()
    for match in arrays:
        dims = [int(d) for d in re.findall(r"\d+", match["dims"])]
        if max(dims, default=0) >= rows or math.prod(dims) >= rows * width:
            found.add(match[0])
    return found


def _loss(config, mesh, buffer_factor, exchange):
    def loss(x, gates, expert_ids, w1, w3, w2):
        y = expert_parallel_ffn(
            config,
            x,
            gates,
            expert_ids,
            w1,
            w3,
            w2,
            mesh=mesh,
            buffer_factor=buffer_factor,
            exchange=exchange,
        )[0]
        return jnp.sum(y * y)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5)))


def _args(config, mesh=None):
    """Abstract operands; on a concrete mesh, sharded as the layer's state is
    (`jmoe.parallel.state_shardings`: tokens over the devices, experts over
    ``"expert"`` when they divide it)."""
    tokens, k = EP * TOKENS_PER_DEVICE, config.top_k
    e, d, f = config.num_experts, config.d_model, config.d_ff

    def spec(shape, dtype, partition):
        sharding = None if mesh is None else NamedSharding(mesh, partition)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    experts = P(EXPERT if e % EP == 0 else None, None, None)
    return (
        spec((tokens, d), jnp.float32, TOKEN_SPEC),
        spec((tokens, k), jnp.float32, TOKEN_SPEC),
        spec((tokens, k), jnp.int32, TOKEN_SPEC),
        spec((e, d, f), jnp.float32, experts),
        spec((e, d, f), jnp.float32, experts),
        spec((e, f, d), jnp.float32, experts),
    )


def _worst_case(config) -> tuple[int, int]:
    """``(rows, width)``: the worst-case buffer's rows, and the narrower of
    ``d_model`` and an expert's ``d_ff`` slice."""
    sharding = ExpertSharding.create(config, EP)
    rows = sharding.capacity(TOKENS_PER_DEVICE, config.top_k, None)
    return rows, min(config.d_model, config.d_ff // sharding.hidden_splits)


def _padded_offenders(case, buffer_factor) -> set[str]:
    config = _config(*case)
    mesh = make_mesh(1, EP, devices=host_cpus())
    compiled = _loss(config, mesh, buffer_factor, "padded").lower(*_args(config, mesh)).compile()
    text = compiled.as_text()
    return _large(_HLO_ARRAY.finditer(text), *_worst_case(config))


def _manual_bodies(text: str) -> str:
    """The ``sdy.manual_computation`` bodies (``shard_map``) of lowered StableHLO,
    and every function they call, transitively."""
    lines, bodies, depth = text.splitlines(), [], 0
    for line in lines:
        if depth:
            depth += line.count("{") - line.count("}")
            bodies.append(line if depth else "")  # the closing line types the global results
        elif "sdy.manual_computation(" in line:
            depth = line.count("{") - line.count("}")
            bodies.append(line.split(" manual_axes=")[-1])
    functions = dict(re.findall(r"func\.func private @(\S+)\((.*?)\n  }", text, re.S))
    called, pending = set(), re.findall(r"call @([\w.]+)\(", "\n".join(bodies))
    while pending:
        name = pending.pop()
        if name not in called and name in functions:
            called.add(name)
            pending += re.findall(r"call @([\w.]+)\(", functions[name])
    return "\n".join(bodies + [functions[name] for name in called])


def _ragged_offenders(case, buffer_factor) -> set[str]:
    config = _config(*case)
    mesh = abstract_gpu_mesh(1, EP, AxisType.Auto)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = _loss(config, mesh, buffer_factor, "ragged").trace(*_args(config))
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "@ragged_all_to_all" in text
    return _large(_MLIR_ARRAY.finditer(_manual_bodies(text)), *_worst_case(config))


@pytest.mark.parametrize("case", [PLAIN, HIDDEN], ids=["plain", "hidden"])
def test_ragged_rounds_hold_no_worst_case_array(case):
    assert _ragged_offenders(case, case[-1]) == set()
    assert _ragged_offenders(case, None)  # the worst-case buffer is found


@pytest.mark.slow
@pytest.mark.parametrize("case", [PLAIN, HIDDEN], ids=["plain", "hidden"])
def test_padded_rounds_hold_no_worst_case_array(case):
    assert _padded_offenders(case, case[-1]) == set()
    assert _padded_offenders(case, None)  # the worst-case buffer is found


def test_benchmark_all_to_one_rounds():
    """`benchmarks.ep_memory.all_to_one_rounds` against counts worked out by hand."""
    goal = layer_config("goal")  # E 64, k 8: rank 0 receives 8 ranks x 1024 x 8 = 65536 rows
    assert all_to_one_rounds(goal, 1024, 8, 1.25) == math.ceil(65536 / 10240)
    assert all_to_one_rounds(goal, 1024, 8, 2.0) == 4
    mixtral = layer_config("Mixtral-8x7B")  # E 8, k 2, L 1: 8 x 1024 rows over 2048 per round
    assert all_to_one_rounds(mixtral, 1024, 8, 1.0) == 4
