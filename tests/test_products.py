"""sdd / dsd / dstd for every CPU impl vs `pallas_kernels.reference` and a NumPy
loop over rows: forward and gradients, float32 and bfloat16, and the padding
contract (garbage, even inf/nan, in invalid input rows is ignored; invalid
output rows and empty experts' weight gradients are exactly zero).

Tolerances: float32 ``rtol=1e-5, atol=1e-4`` (outputs are O(5); both sides
accumulate in float32 or better). bfloat16 ``rtol=atol=2e-2``: the NumPy side
computes in float64 on the same bf16 inputs, so the gap is the final bf16
rounding (2^-9 relative) plus float32 accumulation order.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from helpers import numpy_reference as ref
from helpers.product_harness import products_and_vjps
from pallas_kernels import products, reference
from pallas_kernels.topology import make_topology

NUM_ROWS = 80
GROUP_SIZES = (5, 0, 70, 1)  # expert 1 empty; 4 rows unrouted (a padding bin remains)
K, N = 24, 40
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _case(block_size, dtype, transpose_rhs, seed=0):
    """Topology, operands and cotangents; rows outside every group hold garbage."""
    topo = make_topology(jnp.array(GROUP_SIZES), NUM_ROWS, block_size)
    _, valid = ref.layout(GROUP_SIZES, block_size, topo.padded_rows)
    rng = np.random.default_rng(seed)

    def rows(width):
        x = rng.standard_normal((topo.padded_rows, width))
        x[~valid] = rng.uniform(-1e3, 1e3, ((~valid).sum(), width))  # must be ignored
        return jnp.asarray(x, dtype)

    w_shape = (len(GROUP_SIZES), N, K) if transpose_rhs else (len(GROUP_SIZES), K, N)
    arrays = dict(
        x=rows(K),
        h=rows(K),
        b=rows(N),
        dy=rows(N),
        w=jnp.asarray(rng.standard_normal(w_shape), dtype),
        g=jnp.asarray(rng.standard_normal((len(GROUP_SIZES), K, N)), dtype),
    )
    return topo, valid, arrays


@functools.partial(jax.jit, static_argnames=("impl", "transpose_rhs"))
def _run(topo, a, *, impl, transpose_rhs):
    """Forward and VJPs of the three products: ``name -> (out, d lhs, d rhs)``."""
    out = products_and_vjps(topo, a, impl=impl, transpose_rhs=transpose_rhs)
    out["dstd_f32"] = products.dstd(a["h"], a["b"], topo, out_dtype=jnp.float32, impl=impl)
    return out


@functools.partial(jax.jit, static_argnames=("transpose_rhs",))
def _run_reference(topo, a, *, transpose_rhs):
    """The same from `pallas_kernels.reference` (dense einsums, autodiff)."""
    out = {}
    for name, lhs in (("sdd", a["x"]), ("dsd", a["h"])):
        f = lambda lhs, w: reference.grouped_matmul(lhs, w, topo, transpose_rhs)
        y, vjp = jax.vjp(f, lhs, a["w"])
        out[name] = (y, *vjp(a["dy"]))
    f = lambda lhs, rhs: reference.grouped_weight_grad(lhs, rhs, topo).astype(lhs.dtype)
    y, vjp = jax.vjp(f, a["h"], a["b"])
    out["dstd"] = (y, *vjp(a["g"]))
    return out


def _numpy_expected(arrays, block_size, transpose_rhs):
    """The same from the NumPy row loops (float64)."""
    a = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in arrays.items()}
    mm = functools.partial(ref.grouped_matmul, group_sizes=GROUP_SIZES, block_size=block_size)
    wg = functools.partial(ref.weight_grad, group_sizes=GROUP_SIZES, block_size=block_size)
    expected = {}
    for name, lhs in (("sdd", a["x"]), ("dsd", a["h"])):
        dw = wg(a["dy"], lhs) if transpose_rhs else wg(lhs, a["dy"])
        expected[name] = (
            mm(lhs, a["w"], transpose_rhs=transpose_rhs),
            mm(a["dy"], a["w"], transpose_rhs=not transpose_rhs),
            dw,
        )
    expected["dstd"] = (
        wg(a["h"], a["b"]),
        mm(a["b"], a["g"], transpose_rhs=True),
        mm(a["h"], a["g"]),
    )
    return expected


# Each impl sees every block size (1 = ragged) and both transpose_rhs.
CASES = [
    (1, False, jnp.float32),
    (32, True, jnp.float32),
    (64, False, jnp.float32),
    (128, True, jnp.float32),
    (1, True, jnp.bfloat16),
    (32, False, jnp.bfloat16),
]


@pytest.mark.parametrize("block_size,transpose_rhs,dtype", CASES)
def test_products_match_references(block_size, transpose_rhs, dtype):
    topo, valid, arrays = _case(block_size, dtype, transpose_rhs)
    expected = _numpy_expected(arrays, block_size, transpose_rhs)
    from_reference = _run_reference(topo, arrays, transpose_rhs=transpose_rhs)
    tol = TOL[dtype]
    for name in ("sdd", "dsd", "dstd"):
        chex.assert_trees_all_close(
            tuple(x.astype(jnp.float32) for x in from_reference[name]),
            expected[name],
            **tol,
            custom_message="reference.py",
        )
    for impl in ("xla", "ragged_dot"):
        got = _run(topo, arrays, impl=impl, transpose_rhs=transpose_rhs)
        for name in ("sdd", "dsd", "dstd"):
            # output, d lhs, d rhs: dtypes follow the operands.
            chex.assert_trees_all_equal_dtypes(got[name], tuple(arrays["x"] for _ in range(3)))
            chex.assert_trees_all_close(
                tuple(x.astype(jnp.float32) for x in got[name]),
                expected[name],
                **tol,
                custom_message=f"{impl} {name}",
            )
            chex.assert_trees_all_close(
                got[name],
                from_reference[name],
                **tol,
                custom_message=f"{impl} {name} vs reference.py",
            )
        chex.assert_trees_all_close(got["dstd_f32"], expected["dstd"][0], rtol=1e-5, atol=1e-4)
        assert got["dstd_f32"].dtype == jnp.float32
        # Padding contract: every [P, _] result is exactly zero on invalid rows ...
        for name, i in (("sdd", 0), ("sdd", 1), ("dsd", 0), ("dsd", 1), ("dstd", 1), ("dstd", 2)):
            assert not np.any(np.asarray(got[name][i])[~valid]), (impl, name, i)
        # ... and the empty expert's dstd outputs and weight gradients are exactly zero.
        for name, i in (("sdd", 2), ("dsd", 2), ("dstd", 0)):
            assert not np.any(np.asarray(got[name][i])[1]), (impl, name)
        assert not np.any(np.asarray(got["dstd_f32"])[1])
        # Ignored means ignored: inf / nan garbage changes nothing (0 * inf would be nan).
        poison = np.where(np.arange(topo.padded_rows) % 2, np.inf, np.nan)[:, None]
        poisoned = {
            k: jnp.where(valid[:, None], v, poison.astype(v.dtype)) if v.ndim == 2 else v
            for k, v in arrays.items()
        }
        chex.assert_trees_all_equal(
            _run(topo, poisoned, impl=impl, transpose_rhs=transpose_rhs), got
        )


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
def test_check_grads(impl):
    """Finite differences vs the VJPs of all three products at once (reverse
    mode only: the products are `custom_vjp`)."""
    topo, _, a = _case(32, jnp.float32, False, seed=1)

    @jax.jit
    def f(x, h, w, wt, b):
        return (
            products.sdd(x, w, topo, impl=impl),
            products.dsd(h, wt, topo, transpose_rhs=True, impl=impl),
            products.dstd(h, b, topo, impl=impl),
        )

    args = (a["x"], a["h"], a["w"], jnp.swapaxes(a["w"], 1, 2), a["b"])
    check_grads(f, args, order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=2e-3)


def test_impl_resolution_and_layout_block_size():
    assert products.resolve_impl("auto") == "xla"  # these tests run on CPU
    assert products.resolve_impl("ragged_dot") == "ragged_dot"
    assert products.layout_block_size("xla", 64) == 1
    assert products.layout_block_size("ragged_dot", 128) == 1
    assert products.layout_block_size("auto", 32) == 1


def test_accepts_numpy_operands():
    """Eager call and VJP with NumPy operands (the kernels index the weights
    with a traced expert id inside their loops)."""
    topo, _, a = _case(64, jnp.float32, False)
    x, w, dy = (np.asarray(a[k]) for k in ("x", "w", "dy"))
    y, vjp = jax.vjp(lambda x, w: products.sdd(x, w, topo, impl="xla"), x, w)
    want = _numpy_expected(a, 64, False)["sdd"]
    chex.assert_trees_all_close((y, *vjp(dy)), want, rtol=1e-5, atol=1e-4)
