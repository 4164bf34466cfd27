"""The whole routed-expert MLP in one loop over experts, fused with the token
gather and the weighted combine: the CPU path (``impl="xla"``) of a dMoE layer.

For a layout of ``P`` expert-sorted rows (a `Topology`; row ``i`` holds one
assignment of token ``row_tokens[i]`` with router weight ``row_weights[i]``)::

    y[t] = sum over rows i of token t:  row_weights[i] * mlp_e(x[t]),
    mlp_e(x) = activation(x @ w1[e], x @ w3[e]) @ w2[e],    e = expert of row i

which is ``unpermute(dsd(act(sdd(permute(x)))))`` of the unfused path. Each
expert's rows are walked in the same chunks as the ``xla`` products
(`xla_impl.over_chunks`: usually one GEMM per expert), and a chunk does all of
its work while it is in cache: gather its tokens' rows of ``x``, the three
GEMMs, and a weighted scatter-add into ``y``. What the unfused path writes to
memory as ``[P, d_model]`` arrays (the permuted tokens, the expert outputs, the
combine's gather, and their gradients) never exists. On CPU that matters as
much as the FLOPs: XLA allocates every buffer afresh on each call and the
kernel page-faults it in, which costs about as much as a pass over it. The
residuals for the backward pass are the two ``[P, d_ff]`` pre-activations
(``gate`` and ``up``), as in a dense MLP; with ``recompute_hidden`` there are
none, and the backward recomputes each chunk's ``gate`` and ``up`` (two more
GEMMs per chunk) from the rows it gathers anyway.

Backward (`custom_vjp`), per chunk, with ``g = dy[tokens] @ w2[e]ᵀ``:

* ``d row_weights = rowsum(hidden * g)``, ``d hidden = row_weights * g``;
* ``d gate, d up`` from the activation's VJP;
* ``dw2[e] += hiddenᵀ (row_weights * dy[tokens])``, ``dw1[e] += x[tokens]ᵀ d gate``,
  ``dw3[e] += x[tokens]ᵀ d up``;
* ``dx[tokens] += d gate @ w1[e]ᵀ + d up @ w3[e]ᵀ`` (scatter-add).

Rows that hold no assignment (``~topo.row_is_valid()``) are ignored and add
nothing; experts without rows get exactly zero weight gradients.

A layout of at most ``TILE_ROWS`` rows (a decode step) skips the loop: each
expert's group is gathered into ``[E, slots, d_model]`` and the three weights
are three batched GEMMs (`_few_rows`), differentiated by JAX.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from pallas_kernels import xla_impl
from pallas_kernels.activations import Activation, get_activation
from pallas_kernels.backend import ExpertWeights, RowMap
from pallas_kernels.topology import Topology
from pallas_kernels.xla_impl import (
    masked_update,
    over_chunks,
    scheduled_after,
    transposed_lhs_dot,
)

__all__ = ["BACKEND", "fused_expert_mlp"]

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def fused_expert_mlp(
    x: ArrayLike,
    rows: RowMap | None,
    topo: Topology,
    weights: ExpertWeights,
    activation: str | Activation,
    recompute_hidden: bool = False,
) -> jax.Array:
    """Routed experts' weighted outputs, summed per token (the xla `Backend.expert_mlp`).

    Args:
      x: ``[tokens, d_model]`` compute dtype; with ``rows=None``, ``[P, d_model]``
        rows already in ``topo``'s layout (``P = topo.padded_rows``).
      rows: ``rows.row_tokens [P] int`` token of each layout row (only rows
        inside a group are read) and ``rows.row_weights [P]`` router weight of
        each row's assignment; ``rows.token_rows`` is not used. None: identity
        rows with unit weights.
      topo: the row layout (any block size; 1, unpadded, wastes no memory).
      weights: ``w1 [E, d_model, d_ff]``, ``w3`` (the same or None: no ``up``
        input to ``activation``), ``w2 [E, d_ff, d_model]``, all in ``x.dtype``.
      activation: a name in `pallas_kernels.activations.ACTIVATIONS`
        (``"swiglu"``, ``"gelu"``) or a static ``(gate, up) -> hidden``.
      recompute_hidden: save no ``[P, d_ff]`` pre-activations for the
        backward pass; it recomputes them, chunk by chunk (for callers that
        recompute the forward pass anyway, e.g. the expert-parallel rounds).

    Returns:
      ``[tokens, d_model]`` (``[P, d_model]`` with ``rows=None``) in ``x.dtype``;
      the sum over a token's rows is accumulated in float32.
    """
    x = jnp.asarray(x)
    if rows is None:
        rows = RowMap(
            jnp.arange(topo.padded_rows, dtype=jnp.int32), jnp.ones((topo.padded_rows,), x.dtype)
        )
    # The loops index the weights with a traced expert id: they must be jax arrays.
    row_tokens, row_weights = jnp.asarray(rows.row_tokens), jnp.asarray(rows.row_weights)
    weights = ExpertWeights(*(None if w is None else jnp.asarray(w) for w in weights))
    if row_tokens.shape != (topo.padded_rows,) or row_weights.shape != (topo.padded_rows,):
        raise ValueError(
            f"fused_expert_mlp: row_tokens and row_weights must be [padded_rows="
            f"{topo.padded_rows}], got {row_tokens.shape} and {row_weights.shape}"
        )
    d_model, d_ff = x.shape[1], weights.w1.shape[-1]
    expected = ExpertWeights(
        w1=(topo.num_experts, d_model, d_ff),
        w3=(topo.num_experts, d_model, d_ff),
        w2=(topo.num_experts, d_ff, d_model),
    )
    for name, w, shape in zip(ExpertWeights._fields, weights, expected):
        if w is not None and (w.shape != shape or w.dtype != x.dtype):
            raise ValueError(
                f"fused_expert_mlp: {name} must be {x.dtype.name}{shape} "
                f"(x is {x.dtype.name}{x.shape}), got {w.dtype.name}{w.shape}"
            )
    if isinstance(activation, str):
        activation = get_activation(activation)
    if topo.padded_rows <= xla_impl.TILE_ROWS:
        few_rows = jax.checkpoint(_few_rows, static_argnums=0) if recompute_hidden else _few_rows
        return few_rows(activation, x, row_tokens, row_weights, topo, weights)
    return _fused(activation, recompute_hidden, x, row_tokens, row_weights, topo, weights)


def _few_rows(activation, x, row_tokens, row_weights, topo, weights: ExpertWeights):
    """The MLP of a layout of at most ``TILE_ROWS`` rows (a decode step: ``batch x
    top_k`` rows) as one batched GEMM per weight over ``[E, slots, d_model]``, each
    expert's group in ``slots`` rows, the largest group's size rounded up to a
    `slot_counts` entry (a `lax.switch`). Every expert's weights are read once, in
    three GEMMs, where the loop over experts runs ``3 E`` GEMMs of a few rows each
    (docs/hf.md, decode profile). Differentiated by JAX; it computes ``E x slots``
    rows, ``slots`` at most 1.5x the largest group."""

    def run(slots):
        rank = jnp.arange(slots, dtype=jnp.int32)
        owned = rank < topo.group_sizes[:, None]  # [E, slots]
        layout_rows = jnp.where(owned, topo.bin_starts[:, None] + rank, topo.padded_rows)
        tokens = jnp.take(row_tokens, layout_rows, mode="fill", fill_value=x.shape[0])
        rows = jnp.take(x, tokens, axis=0, mode="fill", fill_value=0)  # [E, slots, d]
        mm = lambda a, w: jnp.einsum(
            "esd,edf->esf", a, w, preferred_element_type=jnp.float32
        ).astype(x.dtype)
        up = None if weights.w3 is None else mm(rows, weights.w3)
        out = mm(activation(mm(rows, weights.w1), up), weights.w2)
        gates = jnp.take(row_weights, layout_rows, mode="fill", fill_value=0)
        weighted = out.astype(jnp.float32) * gates.astype(jnp.float32)[..., None]
        y = _scatter_add(jnp.zeros(x.shape, jnp.float32), tokens, weighted)
        return y.astype(x.dtype)

    counts = slot_counts(topo.padded_rows)
    branches = [functools.partial(run, slots) for slots in counts]
    return lax.switch(jnp.searchsorted(jnp.asarray(counts), jnp.max(topo.group_sizes)), branches)


def slot_counts(rows_total: int) -> list[int]:
    """The slot counts `_few_rows` compiles: 1, 2, 3, 4, 6, 8, 12, ... below
    ``rows_total``, then ``rows_total`` (at most 1.5x the largest group)."""
    counts = {
        min(n, rows_total) for i in range(rows_total.bit_length()) for n in (1 << i, 3 << i >> 1)
    }
    return sorted(counts | {rows_total})


def _chunk_inputs(x, row_tokens, row_weights, row, owned):
    """The chunk's token ids ``[size]``, their rows of ``x`` and their weights
    (float32), all zero where the chunk does not own the row."""
    tokens = lax.dynamic_slice_in_dim(row_tokens, row, owned.shape[0])
    tokens = jnp.where(owned, tokens, x.shape[0])  # out of range: gathers 0, scatters nowhere
    rows = jnp.take(x, tokens, axis=0, mode="fill", fill_value=0)
    weights = lax.dynamic_slice_in_dim(row_weights, row, owned.shape[0])
    return tokens, rows, jnp.where(owned, weights, 0).astype(jnp.float32)


def _expert_weights(expert, weights: ExpertWeights) -> ExpertWeights:
    """``expert``'s slice of each weight (None stays None)."""
    return ExpertWeights(*(None if w is None else w[expert] for w in weights))


def _scatter_add(acc, tokens, values):
    return acc.at[tokens].add(values, mode="drop")


def _chunk_hidden(x, rows, w1e, w3e):
    """A chunk's pre-activations ``(gate, up or None)`` ``[size, d_ff]`` in ``x.dtype``."""
    gate = _dot(rows, w1e, _NN).astype(x.dtype)
    return gate, None if w3e is None else _dot(rows, w3e, _NN).astype(x.dtype)


def _forward(activation, x, row_tokens, row_weights, topo, weights: ExpertWeights, save=True):
    """``-> (y [T, d] x.dtype, gate [P, f], up [P, f] or None)``; without
    ``save``, ``gate`` and ``up`` are None."""
    save_up = save and weights.w3 is not None

    def per_expert(expert, carry):
        w1e, w3e, w2e = _expert_weights(expert, weights)

        def chunk(carry, row, owned):
            y, gate_buf, up_buf = carry
            tokens, rows, weights = _chunk_inputs(x, row_tokens, row_weights, row, owned)
            gate, up = _chunk_hidden(x, rows, w1e, w3e)
            out = _dot(activation(gate, up), w2e, _NN).astype(x.dtype)
            y = _scatter_add(y, tokens, out.astype(jnp.float32) * weights[:, None])
            gate_buf = masked_update(gate_buf, gate, row, owned) if save else None
            up_buf = masked_update(up_buf, up, row, owned) if save_up else None
            return y, gate_buf, up_buf

        return over_chunks(topo, expert, chunk, carry)

    residual = jnp.zeros((topo.padded_rows, weights.w1.shape[2]), x.dtype) if save else None
    init = scheduled_after(
        x, (jnp.zeros(x.shape, jnp.float32), residual, residual if save_up else None)
    )
    y, gate, up = lax.fori_loop(0, topo.num_experts, per_expert, init)
    return y.astype(x.dtype), gate, up


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(activation, recompute_hidden, x, row_tokens, row_weights, topo, weights):
    return _forward(activation, x, row_tokens, row_weights, topo, weights, save=False)[0]


def _fused_fwd(activation, recompute_hidden, x, row_tokens, row_weights, topo, weights):
    y, gate, up = _forward(
        activation, x, row_tokens, row_weights, topo, weights, save=not recompute_hidden
    )
    return y, (x, row_tokens, row_weights, topo, weights, gate, up)


def _fused_bwd(activation, recompute_hidden, residuals, dy):
    x, row_tokens, row_weights, topo, weights, gate_buf, up_buf = residuals
    w1, w3, w2 = weights
    glu = w3 is not None
    dy = dy.astype(x.dtype)

    def per_expert(expert, carry):
        w1e, w3e, w2e = _expert_weights(expert, weights)

        def chunk(carry, row, owned):
            dx, d_row_weights, dw1e, dw3e, dw2e = carry
            tokens, rows, weights = _chunk_inputs(x, row_tokens, row_weights, row, owned)
            dys = jnp.take(dy, tokens, axis=0, mode="fill", fill_value=0)
            if recompute_hidden:
                gate, up = _chunk_hidden(x, rows, w1e, w3e)
            else:
                gate = lax.dynamic_slice_in_dim(gate_buf, row, owned.shape[0])
                up = lax.dynamic_slice_in_dim(up_buf, row, owned.shape[0]) if glu else None
            hidden, activation_vjp = jax.vjp(activation, gate, up)
            hidden = jnp.where(owned[:, None], hidden, 0)
            g = _dot(dys, w2e, _NT)  # [size, d_ff] f32
            d_row_weights = masked_update(
                d_row_weights, jnp.sum(hidden.astype(jnp.float32) * g, axis=1), row, owned
            )
            d_gate, d_up = activation_vjp((weights[:, None] * g).astype(x.dtype))
            dw2e = dw2e + transposed_lhs_dot(hidden, (weights[:, None] * dys).astype(x.dtype))
            dw1e = dw1e + transposed_lhs_dot(rows, d_gate)
            d_rows = _dot(d_gate, w1e, _NT)
            if glu:
                dw3e = dw3e + transposed_lhs_dot(rows, d_up)
                d_rows = d_rows + _dot(d_up, w3e, _NT)
            dx = _scatter_add(dx, tokens, d_rows.astype(x.dtype).astype(jnp.float32))
            return dx, d_row_weights, dw1e, dw3e, dw2e

        dx, d_row_weights, dw1, dw3, dw2 = carry
        zeros = lambda w: jnp.zeros(w.shape[1:], jnp.float32)
        dx, d_row_weights, dw1e, dw3e, dw2e = over_chunks(
            topo,
            expert,
            chunk,
            (dx, d_row_weights, zeros(w1), zeros(w3) if glu else None, zeros(w2)),
        )
        dw1 = dw1.at[expert].set(dw1e.astype(dw1.dtype))
        dw3 = dw3.at[expert].set(dw3e.astype(dw3.dtype)) if glu else None
        dw2 = dw2.at[expert].set(dw2e.astype(dw2.dtype))
        return dx, d_row_weights, dw1, dw3, dw2

    init = scheduled_after(
        dy,
        (
            jnp.zeros(x.shape, jnp.float32),
            jnp.zeros(row_weights.shape, jnp.float32),
            jnp.zeros_like(w1),
            jnp.zeros_like(w3) if glu else None,
            jnp.zeros_like(w2),
        ),
    )
    dx, d_row_weights, dw1, dw3, dw2 = lax.fori_loop(0, topo.num_experts, per_expert, init)
    d_weights = ExpertWeights(dw1, dw3, dw2)
    return dx.astype(x.dtype), None, d_row_weights.astype(row_weights.dtype), None, d_weights


_fused.defvjp(_fused_fwd, _fused_bwd)


BACKEND = xla_impl.BACKEND._replace(expert_mlp=fused_expert_mlp)
