"""Moving token rows to the ranks that own their experts, and back.

* `dispatch`: this rank's tokens ``[T, d]`` -> its local experts' padded block
  layout ``[topology.padded_rows, d]``, holding the plan's rows of every source
  rank (zeros elsewhere): with rounds, the plan's round's part.
* `combine`: the reverse, fused with the weighted un-permutation: layout rows
  ``[padded_rows, d]`` -> ``y [T, d]``, each token's gate-weighted sum of the
  expert outputs of its assignments in the plan (zero for the others).
* `padded_round`: dispatch, expert MLP and combine of the padded method in one
  pass per step, with no ``[padded_rows, d]`` layout: the expert MLP reads the
  received bucket ``[ep * slots, d]`` through a `RowMap` and writes its
  gate-weighted outputs back into it (the expert-parallel layer's CPU path).

This rank's ``n = T * k`` assignments are sorted by expert (a
`permutation.Dispatch` of block size 1: ``row_tokens [n]``, the token of each
sorted row, and ``assignment_rows [T*k]``, the sorted row of each assignment).
Two methods give exactly the same result (both only move data):

* ``"ragged"``: one `jax.lax.ragged_all_to_all` each way with one slice per
  (rank, expert) chunk of the ``[n, d]`` sorted rows, written straight into
  the receiver's layout; only the kept rows travel. GPU and TPU.
* ``"padded"``: `jax.lax.all_to_all` of ``[ep, slots, d]`` buckets, gathered
  from the tokens and unpacked into the layout (and back) by index arrays of
  bucket size. For XLA:CPU, which does not implement the ragged all-to-all.
  ``slots = ceil(capacity / ep)`` (at most the rows one rank can send another),
  so a bucket is about one receive buffer, never the worst case; when a rank
  sends another more than ``slots`` rows in one round (skewed routing), the
  exchange takes several steps of ``slots`` rows each (`rounds.sum_over_rounds`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jmoe import permutation
from jmoe.parallel.mesh import EXPERT
from jmoe.parallel.plan import ExchangePlan
from jmoe.parallel.rounds import sum_over_rounds
from pallas_kernels.backend import ExpertWeights, RowMap
from pallas_kernels.topology import Topology, make_topology

METHODS = ("ragged", "padded")


def _take(x: jax.Array, index: jax.Array, fill=0) -> jax.Array:
    """Rows ``x[index]``; out-of-range indices give ``fill`` rows."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=fill)


def _invert(index: jax.Array, size: int, fill: int) -> jax.Array:
    """``inv [size]`` with ``inv[index[i]] = i``; ``fill`` where nothing lands.

    ``index`` is injective on its in-range entries; out-of-range ones are skipped.
    """
    positions = jnp.arange(index.shape[0], dtype=jnp.int32)
    return jnp.full((size,), fill, jnp.int32).at[index].set(positions, mode="drop")


def step_slots(plan: ExchangePlan, num_tokens: int, num_rows: int) -> tuple[int, int]:
    """``(slots, most steps)`` of the padded exchange: bucket rows per (sender,
    receiver) pair, and the most steps one round can need.

    In one round a rank sends another at most ``pair = min(n, capacity, T *
    min(n / T, L))`` rows (a token's assignments go to distinct experts);
    ``slots`` is the smaller of that and an even share ``ceil(capacity / ep)``
    of the receive buffer.
    """
    per_token = min(num_rows // max(1, num_tokens), plan.num_local_experts)
    pair = max(1, min(num_rows, plan.capacity, num_tokens * per_token))
    slots = max(1, min(pair, math.ceil(plan.capacity / plan.num_ranks)))
    return slots, math.ceil(pair / slots)


def num_steps(plan: ExchangePlan, slots: int) -> jax.Array:
    """``[] int32`` steps this round needs: the most rows any rank sends another,
    over ``slots`` (at least 1; the same on every rank of the group)."""
    pairs = jnp.sum(plan.kept.reshape(plan.num_ranks, plan.num_ranks, -1), axis=2)
    return jnp.maximum(1, (jnp.max(pairs) + slots - 1) // slots).astype(jnp.int32)


def _in_steps(step_fn, plan: ExchangePlan, num_tokens: int, num_rows: int, *operands):
    """``sum_{j < steps} step_fn(slots, j, plan, *operands)`` over the steps of
    the padded exchange; a single call, no loop, when one step always suffices."""
    slots, most = step_slots(plan, num_tokens, num_rows)
    step = functools.partial(step_fn, slots)
    if most == 1:
        return step(0, plan, *operands)
    return sum_over_rounds(step, num_steps(plan, slots), (plan, *operands))


def _bucket_of_sent_rows(plan: ExchangePlan, num_rows: int, slots: int, step) -> jax.Array:
    """``[n]``: bucket slot (of ``ep * slots``) of each sorted row in step
    ``step``; out of range if it is not sent then."""
    num_local = plan.num_local_experts
    counts, kept, starts = plan.own(plan.counts), plan.own(plan.kept), plan.own(plan.send_offsets)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    expert = jnp.searchsorted(jnp.cumsum(counts), rows, side="right").astype(jnp.int32)
    expert = jnp.minimum(expert, counts.shape[0] - 1)
    rank_in_chunk = rows - starts[expert]  # negative for rows sent in earlier rounds
    kept_per_owner = kept.reshape(plan.num_ranks, num_local)
    start_in_pair = jnp.cumsum(kept_per_owner, axis=1) - kept_per_owner
    position = start_in_pair.reshape(-1)[expert] + rank_in_chunk - step * slots
    sent_now = (rank_in_chunk >= 0) & (rank_in_chunk < kept[expert])
    sent_now &= (position >= 0) & (position < slots)
    return jnp.where(sent_now, (expert // num_local) * slots + position, plan.num_ranks * slots)


def _layout_of_received_slots(plan: ExchangePlan, slots: int, step) -> jax.Array:
    """``[ep * slots]``: layout row of each bucket slot received in step
    ``step``; out of range if empty."""
    num_local = plan.num_local_experts
    kept = plan.local(plan.kept)  # [ep, L] chunks from each source
    ends = jnp.cumsum(kept, axis=1)
    position = jnp.arange(slots, dtype=jnp.int32) + step * slots
    expert = jax.vmap(lambda e: jnp.searchsorted(e, position, side="right"))(ends)
    safe = jnp.minimum(expert, num_local - 1)
    rank_in_chunk = position - jnp.take_along_axis(ends - kept, safe, axis=1)
    row = jnp.take_along_axis(plan.local(plan.recv_offsets), safe, axis=1) + rank_in_chunk
    return jnp.where(expert < num_local, row, plan.topology.padded_rows).reshape(-1)


def _dispatch_step(slots: int, step, plan: ExchangePlan, x, assignments) -> jax.Array:
    """Step ``step`` of the padded `dispatch`: ``[padded_rows, d]``, its rows only."""
    num_rows, bucket_rows = assignments.row_tokens.shape[0], plan.num_ranks * slots
    sorted_rows = _invert(_bucket_of_sent_rows(plan, num_rows, slots, step), bucket_rows, num_rows)
    buckets = _take(x, _take(assignments.row_tokens, sorted_rows, fill=x.shape[0]))
    received = lax.all_to_all(buckets, EXPERT, 0, 0, tiled=True)
    layout = _layout_of_received_slots(plan, slots, step)
    return _take(received, _invert(layout, plan.topology.padded_rows, bucket_rows))


def _combine_step(slots: int, step, plan: ExchangePlan, rows, assignments, gates) -> jax.Array:
    """Step ``step`` of the padded `combine`: ``[T, d]``, its rows only."""
    buckets = _take(rows, _layout_of_received_slots(plan, slots, step))
    returned = lax.all_to_all(buckets, EXPERT, 0, 0, tiled=True)
    slot = _bucket_of_sent_rows(plan, assignments.row_tokens.shape[0], slots, step)
    bucket_of_assignment = _take(slot, assignments.assignment_rows, fill=returned.shape[0])
    return permutation.unpermute(
        returned, dataclasses.replace(assignments, assignment_rows=bucket_of_assignment), gates
    )


def dispatch(
    x: jax.Array, assignments: permutation.Dispatch, plan: ExchangePlan, method: str
) -> jax.Array:
    """Tokens ``x [T, d]`` -> ``[padded_rows, d]`` local layout.

    ``assignments``: this rank's expert-sorted assignments (block size 1).
    """
    width, num_rows = x.shape[1], assignments.row_tokens.shape[0]
    if method == "ragged":
        return lax.ragged_all_to_all(
            _take(x, assignments.row_tokens),
            jnp.zeros((plan.topology.padded_rows, width), x.dtype),
            plan.own(plan.send_offsets),
            plan.own(plan.kept),
            plan.own(plan.recv_offsets),
            plan.local(plan.kept).reshape(-1),
            axis_name=EXPERT,
        )
    return _in_steps(_dispatch_step, plan, x.shape[0], num_rows, x, assignments)


def combine(
    rows: jax.Array,
    plan: ExchangePlan,
    method: str,
    assignments: permutation.Dispatch,
    gates: jax.Array,
) -> jax.Array:
    """``[padded_rows, d]`` expert outputs -> ``y [T, d]``: every token's sum of
    ``gates [T, k]`` times the outputs of its assignments in the plan."""
    num_rows = assignments.row_tokens.shape[0]
    if method == "ragged":
        returned = lax.ragged_all_to_all(
            rows,
            jnp.zeros((num_rows, rows.shape[1]), rows.dtype),
            plan.local(plan.recv_offsets).reshape(-1),
            plan.local(plan.kept).reshape(-1),
            plan.local(plan.send_offsets).reshape(-1),
            plan.own(plan.kept),
            axis_name=EXPERT,
        )
        return permutation.unpermute(returned, assignments, gates)
    return _in_steps(_combine_step, plan, gates.shape[0], num_rows, rows, assignments, gates)


def _step_layout(plan: ExchangePlan, slots: int, step) -> tuple[Topology, jax.Array]:
    """The local experts' layout of the rows received in step ``step`` alone:
    its `Topology` (``ep * slots`` rows) and the layout row of each bucket
    slot ``[ep * slots]`` (out of range if empty)."""
    num_local = plan.num_local_experts
    kept = plan.local(plan.kept)  # [ep, L]: each source's chunks, in its stream's order
    ends = jnp.cumsum(kept, axis=1)
    first = jnp.maximum(ends - kept, step * slots)  # a chunk's first position in the step
    in_step = jnp.clip(jnp.minimum(ends, (step + 1) * slots) - first, 0)
    topology = make_topology(
        jnp.sum(in_step, axis=0), plan.num_ranks * slots, plan.topology.block_size
    )
    offsets = topology.bin_starts + jnp.cumsum(in_step, axis=0) - in_step - first
    position = jnp.arange(slots, dtype=jnp.int32) + step * slots
    expert = jax.vmap(lambda e: jnp.searchsorted(e, position, side="right"))(ends)
    row = jnp.take_along_axis(offsets, jnp.minimum(expert, num_local - 1), axis=1) + position
    return topology, jnp.where(expert < num_local, row, topology.padded_rows).reshape(-1)


def padded_step(
    mlp, slots: int, step, plan: ExchangePlan, x, assignments, gates, weights
) -> jax.Array:
    """Step ``step`` of `padded_round` (``slots`` from `step_slots`): ``[T, d]``,
    the gate-weighted expert outputs of the rows it sends."""
    num_tokens, num_rows = x.shape[0], assignments.row_tokens.shape[0]
    slot = _bucket_of_sent_rows(plan, num_rows, slots, step)
    sorted_rows = _invert(slot, plan.num_ranks * slots, num_rows)
    tokens = _take(assignments.row_tokens, sorted_rows, fill=num_tokens)  # [ep * slots]
    sent_gates = _take(permutation.row_weights(gates, assignments), sorted_rows)
    received = lax.all_to_all(_take(x, tokens), EXPERT, 0, 0, tiled=True)
    received_gates = lax.all_to_all(sent_gates, EXPERT, 0, 0, tiled=True)
    topology, layout = _step_layout(plan, slots, step)
    row_slots = _invert(layout, topology.padded_rows, received.shape[0])
    rows = RowMap(row_slots, _take(received_gates, row_slots), layout[:, None])
    returned = lax.all_to_all(mlp(received, rows, topology, weights), EXPERT, 0, 0, tiled=True)
    y = jnp.zeros(x.shape, jnp.float32).at[tokens].add(returned.astype(jnp.float32), mode="drop")
    return y.astype(x.dtype)


def padded_round(
    mlp,
    plan: ExchangePlan,
    x: jax.Array,
    assignments: permutation.Dispatch,
    gates: jax.Array,
    weights: ExpertWeights,
) -> jax.Array:
    """``combine(mlp(dispatch(x)))`` of the padded method, step by step, without
    the ``[padded_rows, d]`` layout.

    Each step sends its ``[ep, slots, d]`` bucket and the rows' gates; the
    owner runs ``mlp(received [ep * slots, d], RowMap, topology, weights)``
    (`jmoe.experts.expert_mlp` with the config bound) on the step's rows, in
    a layout of the local experts built for the step, and gets the
    gate-weighted outputs back in bucket order; they return and are added into
    their tokens.

    Returns:
      ``y [T, d]``: every token's sum of ``gates [T, k]`` times the expert
      outputs of its assignments in the plan.
    """
    num_rows = assignments.row_tokens.shape[0]
    step = functools.partial(padded_step, mlp)
    return _in_steps(step, plan, x.shape[0], num_rows, x, assignments, gates, weights)
