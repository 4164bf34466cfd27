"""Moving token rows to the ranks that own their experts, and back.

* `dispatch`: this rank's expert-sorted rows ``[n, d]`` -> its local experts'
  padded block layout ``[topology.padded_rows, d]``, holding the kept rows of
  every source rank (zeros elsewhere): with rounds, the plan's round's part.
* `combine`: the reverse: layout rows ``[padded_rows, d]`` -> ``[n, d]`` in
  this rank's send order; rows of dropped assignments are zero.

Two methods give exactly the same result (both only move data):

* ``"ragged"``: one `jax.lax.ragged_all_to_all` each way with one slice per
  (rank, expert) chunk, written straight into the receiver's layout; only the
  kept rows travel. GPU and TPU.
* ``"padded"``: `jax.lax.all_to_all` of ``[ep, slots, d]`` buckets with
  ``slots = min(n, capacity)`` (the most rows one rank can send another), and
  gathers to pack and unpack them. For XLA:CPU, which does not implement the
  ragged all-to-all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jmoe.parallel.mesh import EXPERT
from jmoe.parallel.plan import ExchangePlan

METHODS = ("ragged", "padded")


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """Rows ``x[index]``; out-of-range indices give zero rows."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _invert(index: jax.Array, size: int, fill: int) -> jax.Array:
    """``inv [size]`` with ``inv[index[i]] = i``; ``fill`` where nothing lands.

    ``index`` is injective on its in-range entries; out-of-range ones are skipped.
    """
    positions = jnp.arange(index.shape[0], dtype=jnp.int32)
    return jnp.full((size,), fill, jnp.int32).at[index].set(positions, mode="drop")


def _slots(plan: ExchangePlan, num_rows: int) -> int:
    return min(num_rows, plan.capacity)


def _bucket_of_sent_rows(plan: ExchangePlan, num_rows: int) -> jax.Array:
    """``[n]``: bucket slot (of ``ep * slots``) of each sorted row; out of range if dropped."""
    slots, num_local = _slots(plan, num_rows), plan.num_local_experts
    counts, kept, starts = plan.own(plan.counts), plan.own(plan.kept), plan.own(plan.send_offsets)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    expert = jnp.searchsorted(jnp.cumsum(counts), rows, side="right").astype(jnp.int32)
    expert = jnp.minimum(expert, counts.shape[0] - 1)
    rank_in_chunk = rows - starts[expert]  # negative for rows sent in earlier rounds
    kept_per_owner = kept.reshape(plan.num_ranks, num_local)
    start_in_bucket = jnp.cumsum(kept_per_owner, axis=1) - kept_per_owner
    slot = (expert // num_local) * slots + start_in_bucket.reshape(-1)[expert] + rank_in_chunk
    sent_now = (rank_in_chunk >= 0) & (rank_in_chunk < kept[expert])
    return jnp.where(sent_now, slot, plan.num_ranks * slots)


def _layout_of_received_slots(plan: ExchangePlan, num_rows: int) -> jax.Array:
    """``[ep * slots]``: layout row of each received bucket slot; out of range if empty."""
    slots, num_local = _slots(plan, num_rows), plan.num_local_experts
    kept = plan.local(plan.kept)  # [ep, L] chunks from each source
    ends = jnp.cumsum(kept, axis=1)
    slot = jnp.arange(slots, dtype=jnp.int32)
    expert = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)
    safe = jnp.minimum(expert, num_local - 1)
    rank_in_chunk = slot - jnp.take_along_axis(ends - kept, safe, axis=1)
    row = jnp.take_along_axis(plan.local(plan.recv_offsets), safe, axis=1) + rank_in_chunk
    return jnp.where(expert < num_local, row, plan.topology.padded_rows).reshape(-1)


def dispatch(x_sorted: jax.Array, plan: ExchangePlan, method: str) -> jax.Array:
    """``[n, d]`` expert-sorted rows -> ``[padded_rows, d]`` local layout."""
    num_rows, width = x_sorted.shape
    layout_rows = plan.topology.padded_rows
    if method == "ragged":
        return lax.ragged_all_to_all(
            x_sorted,
            jnp.zeros((layout_rows, width), x_sorted.dtype),
            plan.own(plan.send_offsets),
            plan.own(plan.kept),
            plan.own(plan.recv_offsets),
            plan.local(plan.kept).reshape(-1),
            axis_name=EXPERT,
        )
    bucket_rows = plan.num_ranks * _slots(plan, num_rows)
    buckets = _take(x_sorted, _invert(_bucket_of_sent_rows(plan, num_rows), bucket_rows, num_rows))
    received = lax.all_to_all(buckets, EXPERT, 0, 0, tiled=True)
    return _take(
        received, _invert(_layout_of_received_slots(plan, num_rows), layout_rows, bucket_rows)
    )


def combine(rows: jax.Array, plan: ExchangePlan, method: str, num_rows: int) -> jax.Array:
    """``[padded_rows, d]`` expert outputs -> ``[num_rows, d]`` in this rank's send order."""
    if method == "ragged":
        return lax.ragged_all_to_all(
            rows,
            jnp.zeros((num_rows, rows.shape[1]), rows.dtype),
            plan.local(plan.recv_offsets).reshape(-1),
            plan.local(plan.kept).reshape(-1),
            plan.local(plan.send_offsets).reshape(-1),
            plan.own(plan.kept),
            axis_name=EXPERT,
        )
    buckets = _take(rows, _layout_of_received_slots(plan, num_rows))
    returned = lax.all_to_all(buckets, EXPERT, 0, 0, tiled=True)
    return _take(returned, _bucket_of_sent_rows(plan, num_rows))
