"""The expert MLP's activations, owned here so that a kernel can fuse them and a
layer names them (``activation="swiglu"``) instead of handing a function down.

Each maps ``(gate [rows, f], up [rows, f] or None) -> hidden [rows, f]`` in the
inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

__all__ = ["ACTIVATIONS", "Activation", "get_activation"]

Activation = Callable[[jax.Array, jax.Array | None], jax.Array]


def gelu(gate: jax.Array, up: jax.Array | None) -> jax.Array:
    """``gelu(gate)`` (tanh approximation); ``up`` is unused (None)."""
    del up
    return jax.nn.gelu(gate, approximate=True)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` (SwiGLU)."""
    return jax.nn.silu(gate) * up


ACTIVATIONS = {"gelu": gelu, "swiglu": swiglu}


def get_activation(name: str) -> Activation:
    """The activation called ``name`` (one of `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
