"""Shared by the product tests: every product's output and VJPs in one call."""

import functools

import jax

from pallas_kernels import products


def products_and_vjps(topo, arrays: dict, *, impl: str, transpose_rhs: bool) -> dict:
    """``name -> (out, d lhs, d rhs)`` for sdd, dsd and dstd.

    ``arrays``: ``x``, ``h`` ``[P, k]`` (sdd / dsd inputs), ``w`` ``[E, k, n]``
    (``[E, n, k]`` if ``transpose_rhs``), ``b``, ``dy`` ``[P, n]``, ``g``
    ``[E, k, n]`` (the dstd cotangent).
    """
    a = arrays
    out = {}
    for name, product, lhs in (("sdd", products.sdd, a["x"]), ("dsd", products.dsd, a["h"])):
        f = functools.partial(product, topo=topo, transpose_rhs=transpose_rhs, impl=impl)
        y, vjp = jax.vjp(f, lhs, a["w"])
        out[name] = (y, *vjp(a["dy"]))
    y, vjp = jax.vjp(functools.partial(products.dstd, topo=topo, impl=impl), a["h"], a["b"])
    out["dstd"] = (y, *vjp(a["g"]))
    return out
