"""Tracing a layer on abstract shapes and walking the resulting jaxpr (tests only)."""

from __future__ import annotations

import jax
import jax.extend.core
from flax import nnx


def all_eqns(jaxpr):
    """Every equation of a (closed) jaxpr, recursing into loops, conds and calls."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from all_eqns(sub)


def layer_jaxpr(model: nnx.Module, x: jax.ShapeDtypeStruct, *, grad: bool = False):
    """Jaxpr of ``model(x)`` (or of the gradient of a loss of it w.r.t. the
    parameters and ``x``), traced via ``nnx.split/merge`` on abstract values
    only: tracing fails if the layer needs any concrete value on the host."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)

    def loss(model, x):
        y, aux = model(x)
        return (y.astype("float32") ** 2).sum() + aux["load_balancing_loss"] + aux["router_z_loss"]

    def run(params, rest, x):
        model = nnx.merge(graphdef, params, rest)
        return nnx.grad(loss, argnums=(0, 1))(model, x) if grad else model(x)

    return jax.make_jaxpr(run)(abstract(params), abstract(rest), x)


# Primitive names that run on or talk to the host (callbacks, infeed, prints).
HOST_PRIMITIVES = ("callback", "infeed", "outfeed", "host", "print")


def host_primitives(jaxpr) -> set[str]:
    """Names of the equations of ``jaxpr`` that run on or sync with the host."""
    names = {eqn.primitive.name for eqn in all_eqns(jaxpr)}
    return {n for n in names if any(h in n for h in HOST_PRIMITIVES)}


def token_expert_shapes(jaxpr, num_experts: int, token_counts) -> list[tuple]:
    """``(primitive, shape, dtype)`` of every intermediate whose shape has an
    ``num_experts`` axis and an axis of one of ``token_counts`` (tokens,
    assignments, per-device tokens): the footprint of a one-hot dispatch."""
    shapes = []
    for eqn in all_eqns(jaxpr):
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if num_experts in shape and any(n in shape for n in token_counts):
                shapes.append((eqn.primitive.name, shape, str(var.aval.dtype)))
    return shapes
