"""Dropless expert parallelism: the routed experts of a dMoE inside ``shard_map``.

MegaBlocks' expert-parallel forward with static shapes. Tokens are split over
every mesh axis (``"data" x "expert"``, or e.g. ``"data" x "fsdp" x
"expert"``: the axes other than ``"expert"`` are all token axes), experts over
``"expert"``. On each device:

1. sort its assignments by expert (unpadded, `permutation.dropless_dispatch`
   with block size 1);
2. all-gather the per-expert counts over ``"expert"`` and plan the exchange
   (`plan.make_plan`);
3. send every row to the rank owning its expert, straight into that rank's
   padded block layout (`exchange.dispatch`);
4. run the local experts' MLP on it (`experts.expert_mlp`, the routed MLP
   of ``config.impl`` on the plan's `Topology`, rows already in its layout);
5. send the results back, un-permuted and weighted (`exchange.combine`).

The padded exchange (XLA:CPU) does 3-5 in steps of one bucket per rank pair,
the MLP reading the received bucket itself (`exchange.padded_round`).

Static shapes: a rank can receive up to ``ep * T_local * min(k, L)`` rows
(every token of every rank choosing its experts), so by default the receive
buffer and the local layout are sized for that worst case and no token is
ever dropped. A ``capacity_factor`` ``c`` bounds the buffer to
``ceil(c * T_local * k)`` rows, times the hidden splits (``c = 1`` holds
perfectly balanced routing); assignments past it are dropped, counted, and returned as ``dropped``.
A ``buffer_factor`` ``f`` bounds it the same way without dropping: steps 3-5
repeat in rounds (`rounds.sum_over_rounds`, a ``while_loop`` with its own
backward), each sending the next buffer's worth of every rank's rows, until
all are served (docs/expert_parallel_rounds.md).

With fewer experts than ranks, every expert's ``d_ff`` is split over several
ranks (hidden sharding, `placement.ExpertSharding`).

Gradients: the expert weights enter replicated over the token axes other
than ``"expert"``, so the transpose of ``shard_map`` sums their per-device
gradients over those axes once; the router gates flow back through the un-permutation. ``shard_map``
runs with ``check_vma=False`` because the product kernels' loop carries are
not typed as device-varying; the transpose then psums the cotangent of every
input over the mesh axes its spec leaves out, which is exactly that sum.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe import permutation
from jmoe.config import EP_EXCHANGES, MoEConfig
from jmoe.experts import ExpertWeights, expert_mlp
from jmoe.parallel import exchange as exchange_lib
from jmoe.parallel.mesh import (
    EXPERT,
    batch_axes,
    check_mesh,
    context_mesh,
    is_explicit,
    token_axes,
    token_spec,
)
from jmoe.parallel.placement import ExpertSharding
from jmoe.parallel.plan import ExchangePlan, make_plan, num_rounds
from jmoe.parallel.rounds import sum_over_rounds
from pallas_kernels.products import layout_block_size

_RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
_EXPERT_SPEC = P(EXPERT, None, None)


def exchange_method(exchange: str, mesh: Mesh | AbstractMesh) -> str:
    """``"auto"`` -> ``"ragged"`` on GPU/TPU meshes, ``"padded"`` elsewhere (XLA:CPU)."""
    if exchange not in EP_EXCHANGES:
        raise ValueError(f"exchange must be one of {EP_EXCHANGES}, got {exchange!r}")
    if exchange != "auto":
        return exchange
    device = getattr(mesh, "abstract_mesh", mesh).abstract_device
    platform = jax.default_backend() if device is None else device.platform
    return "ragged" if platform in _RAGGED_PLATFORMS else "padded"


class _ExchangeSettings(NamedTuple):
    """The static part of one device's FFN (`_local_ffn`).

    Attributes:
      config: the layer's config.
      sharding: where the experts live on the ``"expert"`` axis.
      capacity: rows a rank receives (per round when ``in_rounds``).
      in_rounds: exchange ``capacity`` rows per round until every assignment
        is served; otherwise one round, dropping what does not fit.
      method: ``"ragged"`` or ``"padded"`` (`exchange.METHODS`).
      token_axes: every mesh axis (the tokens are split over all of them).
      batch_axes: the token axes other than ``"expert"``.
    """

    config: MoEConfig
    sharding: ExpertSharding
    capacity: int
    in_rounds: bool
    method: str
    token_axes: tuple[str, ...]
    batch_axes: tuple[str, ...]


def _mlp(settings: _ExchangeSettings):
    """``(x, rows, topology, weights) -> out``: `expert_mlp` with the layer's
    config; in rounds, whose backward recomputes each round's forward, it
    keeps no hidden activations for its own backward."""
    return functools.partial(expert_mlp, settings.config, recompute_hidden=settings.in_rounds)


def _exchange_round(
    settings: _ExchangeSettings,
    plan: ExchangePlan,
    assignments: permutation.Dispatch,
    x: jax.Array,
    gates: jax.Array,
    weights: ExpertWeights,
) -> jax.Array:
    """One exchange: tokens ``x [T_local, d]`` -> ``[T_local, d]``, each token's
    gate-weighted sum of the expert outputs of its assignments in the plan."""
    mlp = _mlp(settings)
    if settings.method == "padded":
        return exchange_lib.padded_round(mlp, plan, x, assignments, gates, weights)
    rows = exchange_lib.dispatch(x, assignments, plan, settings.method)
    out = mlp(rows, None, plan.topology, weights)
    return exchange_lib.combine(out, plan, settings.method, assignments, gates)


def _plan(settings: _ExchangeSettings, counts: jax.Array, round_index=0) -> ExchangePlan:
    """This rank's `ExchangePlan` for the all-gathered ``counts [ep, E*s]``."""
    config = settings.config
    return make_plan(
        counts,
        lax.axis_index(EXPERT),
        settings.sharding.num_local,
        settings.capacity,
        layout_block_size(config.impl, config.block_size),
        round_index,
    )


def _planned_round(settings: _ExchangeSettings, round_index, counts, *operands):
    """Round ``round_index`` of the multi-round exchange (`rounds.sum_over_rounds`)."""
    return _exchange_round(settings, _plan(settings, counts, round_index), *operands)


def _padded_step_of_rounds(
    settings: _ExchangeSettings, slots: int, index, steps, counts, assignments, x, gates, weights
) -> jax.Array:
    """Step ``index`` of all the rounds' padded-exchange steps, in order
    (``steps [max_rounds]``: each round's, 0 past the last round)."""
    ends = jnp.cumsum(steps)
    round_index = jnp.searchsorted(ends, index, side="right").astype(jnp.int32)
    step = index - ends[round_index] + steps[round_index]
    plan = _plan(settings, counts, round_index)
    return exchange_lib.padded_step(
        _mlp(settings), slots, step, plan, x, assignments, gates, weights
    )


def _padded_rounds(settings: _ExchangeSettings, rounds, counts, top_k: int, operands):
    """`sum_over_rounds` of the rounds of the padded exchange, as one loop over
    all their steps: the backward holds one set of weight-gradient
    accumulators, not one per nested loop."""
    assignments, x = operands[:2]
    num_tokens, num_rows = x.shape[0], assignments.row_tokens.shape[0]
    slots, _ = exchange_lib.step_slots(_plan(settings, counts), num_tokens, num_rows)
    worst = settings.sharding.capacity(num_tokens, top_k, None)
    round_indices = jnp.arange(-(-worst // settings.capacity), dtype=jnp.int32)
    steps = jax.vmap(lambda r: exchange_lib.num_steps(_plan(settings, counts, r), slots))(
        round_indices
    )
    steps = jnp.where(round_indices < rounds, steps, 0)
    step_fn = functools.partial(_padded_step_of_rounds, settings, slots)
    return sum_over_rounds(step_fn, jnp.sum(steps), (steps, counts, *operands))


def _local_ffn(
    settings: _ExchangeSettings,
    x: jax.Array,
    gates: jax.Array,
    expert_ids: jax.Array,
    weights: ExpertWeights,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One device's part: ``x [T_local, d]``, ``gates/expert_ids [T_local, k]``,
    ``weights`` of its ``L`` (virtual) experts -> ``(y [T_local, d],
    tokens_per_expert [E], dropped [], rounds [])``.

    Every round is bounded by ``T_local * k`` (the sorted assignments) and the
    receive buffer: the rounds' outputs are ``[T_local, d]`` and their sum's
    backward recomputes each round (no array of all rounds' rows exists).
    """
    sharding = settings.sharding
    v_gates, v_expert_ids = sharding.split_routing(gates, expert_ids)
    assignments, send_topo = permutation.dropless_dispatch(v_expert_ids, sharding.num_virtual, 1)
    counts = lax.all_gather(send_topo.group_sizes, EXPERT)
    operands = (assignments, x, v_gates, weights)
    if settings.in_rounds:
        rounds = num_rounds(counts, sharding.num_local, settings.capacity)
        if settings.method == "padded":
            y = _padded_rounds(settings, rounds, counts, expert_ids.shape[1], operands)
        else:
            y = sum_over_rounds(
                functools.partial(_planned_round, settings), rounds, (counts, *operands)
            )
        dropped = jnp.zeros((), jnp.int32)
        if settings.batch_axes:  # the replicas may differ; each "expert" group agrees
            rounds = lax.pmax(rounds, settings.batch_axes)
    else:
        rounds = jnp.ones((), jnp.int32)
        plan = _plan(settings, counts)
        y = _exchange_round(settings, plan, *operands)
        dropped = lax.psum(plan.dropped, settings.token_axes) // sharding.hidden_splits
    local_counts = jnp.bincount(expert_ids.reshape(-1), length=settings.config.num_experts)
    tokens_per_expert = lax.psum(local_counts.astype(jnp.int32), settings.token_axes)
    return y, tokens_per_expert, dropped, rounds


def expert_parallel_ffn(
    config: MoEConfig,
    x: jax.Array,
    gates: jax.Array,
    expert_ids: jax.Array,
    w1: jax.Array,
    w3: jax.Array | None,
    w2: jax.Array,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    capacity_factor: float | None = None,
    buffer_factor: float | None = None,
    exchange: str | None = None,
    return_rounds: bool = False,
) -> tuple[jax.Array, ...]:
    """Routed experts of a dropless MoE, expert-parallel over ``mesh``.

    Same contract as `jmoe.moe.dropless_ffn`, on global arrays.

    Args:
      x: ``[tokens, d_model]`` in the compute dtype; ``tokens`` divisible by
        the mesh's device count.
      gates, expert_ids: ``[tokens, k]`` router output (`RouterOutput`; each
        token's k experts distinct, as top-k gives them).
      w1, w3, w2: ``[E, d_model, d_ff]``, same or None, ``[E, d_ff, d_model]``.
      mesh: a mesh with an ``"expert"`` axis (concrete or abstract; its other
        axes, e.g. ``"data"`` and ``"fsdp"``, split the tokens too); defaults
        to the `jax.set_mesh` one.
      capacity_factor: None (default: ``config.ep_capacity_factor``; None
        there is dropless) or ``c > 0``: each rank receives at
        most ``ceil(c * tokens_per_device * k)`` rows (times the hidden splits).
      buffer_factor: None (default: ``config.ep_buffer_factor``) or ``f > 0``:
        each rank receives ``ceil(f * tokens_per_device * k)`` rows (times the
        hidden splits) per round, in as many rounds as the routing needs
        (dropless; `rounds`). Exclusive with ``capacity_factor``.
      exchange: None (default: ``config.ep_exchange``), ``"auto"``,
        ``"ragged"`` or ``"padded"`` (see `exchange`).
      return_rounds: also return the number of exchange rounds.

    Returns:
      ``(y [tokens, d_model], tokens_per_expert [E] int32, dropped [] int32)``,
      and ``rounds [] int32`` (the most any replica ran; 1 without a buffer
      factor) when ``return_rounds``; ``dropped`` counts assignments past the
      capacity (0 when dropless).
    """
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("mesh is None and no jax.set_mesh mesh with an 'expert' axis is set")
    check_mesh(mesh)
    if capacity_factor is None:
        capacity_factor = config.ep_capacity_factor
    if buffer_factor is None:
        buffer_factor = config.ep_buffer_factor
    for name, value in (("capacity_factor", capacity_factor), ("buffer_factor", buffer_factor)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be None or > 0, got {value!r}")
    if capacity_factor is not None and buffer_factor is not None:
        raise ValueError(
            f"capacity_factor={capacity_factor} (ep_capacity_factor: bound and "
            f"drop) and buffer_factor={buffer_factor} (ep_buffer_factor: bound "
            "and exchange in rounds) are exclusive: set at most one of them"
        )
    method = exchange_method(config.ep_exchange if exchange is None else exchange, mesh)
    sharding = ExpertSharding.create(config, mesh.shape[EXPERT])
    devices = math.prod(mesh.shape[name] for name in token_axes(mesh))
    if x.shape[0] % devices:
        raise ValueError(
            f"x has {x.shape[0]} tokens, not divisible by the {devices} devices "
            f"of the mesh's {' x '.join(token_axes(mesh))} axes "
            f"({' x '.join(str(mesh.shape[name]) for name in token_axes(mesh))})"
        )
    bound = capacity_factor if buffer_factor is None else buffer_factor
    capacity = sharding.capacity(x.shape[0] // devices, expert_ids.shape[1], bound)
    settings = _ExchangeSettings(
        config,
        sharding,
        capacity,
        buffer_factor is not None,
        method,
        token_axes(mesh),
        batch_axes(mesh),
    )
    tokens = token_spec(mesh)
    y, tokens_per_expert, dropped, rounds = jax.shard_map(
        functools.partial(_local_ffn, settings),
        mesh=mesh,
        in_specs=(tokens,) * 3 + (_EXPERT_SPEC,),
        out_specs=(tokens, P(), P(), P()),
        check_vma=False,
    )(*_operands(mesh, sharding, x, gates, expert_ids, ExpertWeights(w1, w3, w2)))
    if is_explicit(mesh) and not jax.typeof(x).sharding.mesh.empty:
        y = jax.reshard(y, jax.typeof(x).sharding)  # y has x's type
    if return_rounds:
        return y, tokens_per_expert, dropped, rounds
    return y, tokens_per_expert, dropped


def _operands(
    mesh, sharding: ExpertSharding, x, gates, expert_ids, weights: ExpertWeights
) -> tuple:
    """The ``shard_map`` operands: tokens, routing and the (virtual) expert weights.

    On Explicit axes they are resharded to the ``in_specs`` (hidden sharding
    first gathers the weights, then each rank keeps its slice); on Auto axes
    ``shard_map`` reshards them itself.
    """
    if not is_explicit(mesh):
        return x, gates, expert_ids, sharding.split_weights(weights)
    if sharding.hidden_splits > 1:
        weights = _reshard(weights, mesh, P())
    weights = sharding.split_weights(weights)
    return (
        *_reshard((x, gates, expert_ids), mesh, token_spec(mesh)),
        _reshard(weights, mesh, _EXPERT_SPEC),
    )


def _reshard(arrays, mesh, spec: P):
    """`jax.reshard` of every array in ``arrays`` (None entries kept) to ``spec``."""
    return jax.tree.map(lambda a: jax.reshard(a, NamedSharding(mesh, spec)), arrays)
