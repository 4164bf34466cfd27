"""Who sends which rows where in one expert-parallel MoE layer.

Notation: ``ep`` ranks on the ``"expert"`` axis, ``E`` (virtual) experts,
``L = E / ep`` local experts per rank; rank ``p`` owns experts
``p*L .. p*L + L-1``. Every rank sorts its ``n`` assignments by expert
(unpadded) and all-gathers the per-expert counts, so each rank holds the full
``[ep, E]`` count matrix and computes the whole plan by itself, with no
further metadata exchange (one gather gives both the sizes it receives and the
offsets at which its rows land on other ranks):

* ``kept[src, e]``: rows of ``src``'s chunk for expert ``e`` that fit in the
  owner's receive buffer of ``capacity`` rows. The owner fills the buffer in
  (local expert, source) order and a chunk past the capacity keeps a prefix
  (later tokens are dropped first). The worst-case capacity keeps everything.
* ``send_offsets[src, e]``: first row of that part of the chunk in ``src``'s
  expert-sorted buffer.
* ``recv_offsets[src, e]``: first row where it lands in the owner's padded
  block layout (the expert's bin start plus the rows of lower sources), so
  received rows are already in the layout the expert products compute on.

Rounds (``ep_buffer_factor``): the owner's incoming chunks, concatenated in
fill order, form one stream of rows; round ``r`` serves the stream's rows
``[r * capacity, (r + 1) * capacity)``. A chunk's rows before that window are
``sent[src, e]`` (served in earlier rounds), and ``kept`` is the part inside
it, sent from ``send_offsets = chunk start + sent``. Round 0 is the one-round
plan above; an owner receiving ``R_p`` rows in all needs
``ceil(R_p / capacity)`` rounds (`num_rounds`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topology import Topology, make_topology


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["counts", "kept", "send_offsets", "recv_offsets", "topology", "rank"],
    meta_fields=["num_local_experts", "capacity"],
)
@dataclasses.dataclass(frozen=True)
class ExchangePlan:
    """The exchange of one rank (see the module docstring).

    Attributes:
      counts, kept, send_offsets, recv_offsets: ``[ep, E] int32``; ``counts``
        are whole chunks, the others this round's part of them.
      topology: this rank's layout: ``L`` local experts, group sizes summed
        over sources, worst case ``capacity`` rows.
      rank: ``[] int32`` this rank's index on the ``"expert"`` axis.
      num_local_experts: ``L``.
      capacity: rows the receive buffer holds (before block padding).
    """

    counts: jax.Array
    kept: jax.Array
    send_offsets: jax.Array
    recv_offsets: jax.Array
    topology: Topology
    rank: jax.Array
    num_local_experts: int
    capacity: int

    @property
    def num_ranks(self) -> int:
        return self.counts.shape[0]

    def own(self, matrix: jax.Array) -> jax.Array:
        """``[ep, E]`` -> ``[E]``: this rank's row (what it sends)."""
        return lax.dynamic_index_in_dim(matrix, self.rank, keepdims=False)

    def local(self, matrix: jax.Array) -> jax.Array:
        """``[ep, E]`` -> ``[ep, L]``: the columns of this rank's experts (what it receives)."""
        num_local = self.num_local_experts
        return lax.dynamic_slice_in_dim(matrix, self.rank * num_local, num_local, axis=1)

    @property
    def dropped(self) -> jax.Array:
        """``[] int32`` assignments of this rank that did not fit their owner's buffer
        (of a one-round plan; with rounds, those left for later rounds)."""
        return jnp.sum(self.own(self.counts) - self.own(self.kept))


def _exclusive_cumsum(x: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _fill_order(counts: jax.Array, num_local_experts: int) -> jax.Array:
    """``[ep, E]`` -> ``[ep owners, L * ep]``: row p lists rank p's incoming chunks
    in fill order (local expert, source)."""
    num_ranks = counts.shape[0]
    return counts.T.reshape(num_ranks, num_local_experts * num_ranks)


def num_rounds(counts: jax.Array, num_local_experts: int, capacity: int) -> jax.Array:
    """``[] int32`` rounds until every chunk is served: ``max_p ceil(R_p / capacity)``
    over the owners' incoming rows ``R_p`` (at least 1)."""
    incoming = jnp.sum(_fill_order(counts.astype(jnp.int32), num_local_experts), axis=1)
    return jnp.maximum(1, jnp.max((incoming + capacity - 1) // capacity)).astype(jnp.int32)


def make_plan(
    counts: jax.Array,
    rank: jax.Array,
    num_local_experts: int,
    capacity: int,
    block_size: int,
    round_index: jax.Array | int = 0,
) -> ExchangePlan:
    """Plans (round ``round_index`` of) the exchange from the all-gathered counts.

    Args:
      counts: ``[ep, E] int32`` assignments each rank routes to each expert.
      rank: ``[] int32`` this rank.
      num_local_experts: ``L = E / ep``.
      capacity: static receive-buffer rows of every rank (per round).
      block_size: row alignment of the expert bins (the products' layout).
      round_index: ``[] int32`` (or int) round; rows of the owners' streams
        before ``round_index * capacity`` were sent in earlier rounds.
    """
    num_ranks, num_experts = counts.shape
    counts = counts.astype(jnp.int32)
    by_owner = _fill_order(counts, num_local_experts)
    start = _exclusive_cumsum(by_owner, axis=1) - round_index * capacity  # in this round
    sent = jnp.clip(-start, 0, by_owner)
    kept = jnp.clip(capacity - start, 0, by_owner) - sent
    to_source_major = lambda m: m.reshape(num_experts, num_ranks).T
    kept, sent = to_source_major(kept), to_source_major(sent)
    owner_groups = jnp.sum(kept, axis=0).reshape(num_ranks, num_local_experts)
    # Every owner's bin starts (`Topology.bin_starts`), from its [L] group sizes alone.
    bins = -(-owner_groups // block_size) * block_size
    recv_offsets = _exclusive_cumsum(bins, axis=1).reshape(1, num_experts) + _exclusive_cumsum(
        kept, axis=0
    )
    topology = make_topology(
        lax.dynamic_index_in_dim(owner_groups, rank, keepdims=False), capacity, block_size
    )
    return ExchangePlan(
        counts=counts,
        kept=kept,
        send_offsets=_exclusive_cumsum(counts, axis=1) + sent,
        recv_offsets=recv_offsets,
        topology=topology,
        rank=rank,
        num_local_experts=num_local_experts,
        capacity=capacity,
    )
