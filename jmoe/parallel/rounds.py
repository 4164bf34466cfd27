"""A sum over a data-dependent number of rounds, under ``jit``, with bounded memory.

`sum_over_rounds` computes ``sum_{r < num_rounds} round_fn(r, *operands)``
with a `jax.lax.while_loop` (static shapes, the trip count a traced scalar: no
host sync). ``while_loop`` has no reverse-mode derivative, so the sum is a
`jax.custom_vjp` whose backward runs its own loop over the rounds and
recomputes each round's forward from the saved operands (as `jax.checkpoint`
would): the residuals are the operands alone, whatever the number of rounds,
and each round's intermediates live only inside one loop iteration.

The expert-parallel FFN uses it for the multi-round exchange
(``ep_buffer_factor``): round ``r`` sends the ``r``-th buffer's worth of
rows to their experts' owners, runs the expert MLP and sends the results
back; every assignment is served in exactly one round, so the rounds' outputs
(zero elsewhere) add up to the one-round result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.xla_impl import scheduled_after


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zeros_like_shape(tree):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _loop(num_rounds: jax.Array, body, init):
    """``body(r, carry) -> carry`` for ``r = 0 .. num_rounds - 1``."""

    def step(state):
        r, carry = state
        return r + 1, body(r, carry)

    return lax.while_loop(
        lambda state: state[0] < num_rounds, step, (jnp.zeros((), jnp.int32), init)
    )[1]


def sum_over_rounds(round_fn, num_rounds: jax.Array, operands):
    """``sum_{r < num_rounds} round_fn(r, *operands)``.

    Args:
      round_fn: ``(r [] int32, *operands) -> array``; it may close over static
        values only (it is called again in the backward pass).
      num_rounds: ``[] int32`` trip count (traced).
      operands: tuple of pytrees of arrays (None entries allowed); the integer
        leaves get no gradient.

    Returns:
      The sum, shaped like one round's output.
    """
    leaves, treedef = jax.tree.flatten(tuple(operands))
    flat_fn = functools.partial(_round_of_leaves, round_fn, treedef)
    return _sum_over_rounds(flat_fn, num_rounds, tuple(leaves))


def _round_of_leaves(round_fn, treedef, r, *leaves):
    return round_fn(r, *jax.tree.unflatten(treedef, leaves))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sum_over_rounds(round_fn, num_rounds: jax.Array, operands: tuple):
    """`sum_over_rounds` on a flat tuple of array operands."""
    out = jax.eval_shape(round_fn, 0, *operands)
    init = scheduled_after(operands, _zeros_like_shape(out))
    return _loop(num_rounds, lambda r, acc: acc + round_fn(r, *operands), init)


def _forward(round_fn, num_rounds, operands):
    return _sum_over_rounds(round_fn, num_rounds, operands), (num_rounds, operands)


def _backward(round_fn, residuals, cotangent):
    """Per round: recompute the round's forward, pull ``cotangent`` back, accumulate."""
    num_rounds, operands = residuals
    is_diff = [_is_float(x) for x in operands]
    diff = [x for x, d in zip(operands, is_diff) if d]

    def round_of_diff(r, *diff_values):
        values = iter(diff_values)
        return round_fn(r, *(next(values) if d else x for x, d in zip(operands, is_diff)))

    def body(r, grads):
        _, pullback = jax.vjp(functools.partial(round_of_diff, r), *diff)
        return [g + c for g, c in zip(grads, pullback(cotangent))]

    init = scheduled_after(cotangent, [jnp.zeros_like(x) for x in diff])
    grads = iter(_loop(num_rounds, body, init))
    return None, tuple(next(grads) if d else None for d in is_diff)


_sum_over_rounds.defvjp(_forward, _backward)
