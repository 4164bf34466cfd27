"""The Triton block-sparse kernels (Pallas interpreter on CPU) against the dense
references, through the differentiable products, and inside a whole dMoE layer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import DroplessMoE, MoEConfig
from pallas_kernels import products, reference
from pallas_kernels.topology import make_topology
from pallas_kernels.triton import BACKEND, config
from pallas_kernels.triton.kernels import grouped_matmul, weight_grad

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}
NUM_EXPERTS = 4


def _topology(block_size, group_sizes, slack=4):
    """Layout of ``group_sizes`` with ``slack`` spare assignments (so padding block rows exist)."""
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    return make_topology(group_sizes, int(group_sizes.sum()) + slack, block_size)


def _mixed_topology(block_size):
    """Empty experts, a multi-block expert with a partial last block, a one-row expert."""
    return _topology(block_size, [0, block_size + 3, 1, 0])


EDGE_TOPOLOGIES = {
    "one_expert_all_rows": [0, 0, 50, 0],
    "many_block_rows": [300, 0, 17, 1],  # 13 block rows: a full and a partial tile group
    "one_row": [0, 1, 0, 0],
    "full_blocks": [32, 0, 0, 64],
    "no_rows": [0, 0, 0, 0],
}


def _with_garbage(x, topo, key, fill=None):
    """``x`` with its rows outside every group overwritten (random, or ``fill``)."""
    valid = np.asarray(topo.row_is_valid())[:, None]
    garbage = (100 * jax.random.normal(key, x.shape)).astype(x.dtype) if fill is None else fill
    return jnp.where(valid, x, garbage)


def _operands(topo, variant, dtype, k=64, n=96, seed=0):
    """``(lhs [P, k], rhs)``, garbage in the padding rows of ``[P, _]`` operands.

    ``rhs``: ``[P, n]`` for dstd, else ``[E, k, n]`` (``[E, n, k]`` for ``*_t``).
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    lhs = _with_garbage(
        jax.random.normal(keys[0], (topo.padded_rows, k)).astype(dtype), topo, keys[1]
    )
    if variant == "dstd":
        rhs = jax.random.normal(keys[2], (topo.padded_rows, n)).astype(dtype)
        return lhs, _with_garbage(rhs, topo, keys[3])
    shape = (NUM_EXPERTS, n, k) if variant.endswith("_t") else (NUM_EXPERTS, k, n)
    return lhs, jax.random.normal(keys[2], shape).astype(dtype)


def _run(variant, lhs, rhs, topo):
    """The kernel of ``variant`` (``sdd``, ``sdd_t``, ``dsd``, ``dsd_t``, ``dstd``)."""
    if variant == "dstd":
        return weight_grad(lhs, rhs, topo, jnp.float32)
    return grouped_matmul(variant[:3], lhs, rhs, topo, variant.endswith("_t"))


def _expected(variant, lhs, rhs, topo):
    if variant == "dstd":
        return reference.grouped_weight_grad(lhs, rhs, topo)
    return reference.grouped_matmul(lhs, rhs, topo, transpose_rhs=variant.endswith("_t"))


def _check(variant, out, expected, topo, dtype):
    chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
    out32, expected32 = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected32).max()))
    np.testing.assert_allclose(
        out32, expected32, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale
    )
    if variant == "dstd":  # experts with no rows: exact zeros
        empty = np.asarray(topo.group_sizes) == 0
        np.testing.assert_array_equal(out32[empty], 0.0)
    else:  # rows holding no assignment: exact zeros
        np.testing.assert_array_equal(out32[~np.asarray(topo.row_is_valid())], 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("block_size", config.BLOCK_SIZES)
@pytest.mark.parametrize("variant", ["sdd", "sdd_t", "dsd", "dsd_t", "dstd"])
def test_kernel_matches_reference(variant, block_size, dtype):
    topo = _mixed_topology(block_size)
    lhs, rhs = _operands(topo, variant, dtype)
    _check(variant, _run(variant, lhs, rhs, topo), _expected(variant, lhs, rhs, topo), topo, dtype)


@pytest.mark.parametrize("topology", EDGE_TOPOLOGIES)
@pytest.mark.parametrize("variant", ["sdd", "sdd_t", "dsd", "dsd_t", "dstd"])
def test_kernel_edge_topologies(variant, topology):
    topo = _topology(32, EDGE_TOPOLOGIES[topology])
    # k = 9 * 16: dstd's 16-wide k tiles form a full and a partial tile group.
    lhs, rhs = _operands(topo, variant, jnp.float32, k=144, n=96, seed=1)
    _check(
        variant,
        _run(variant, lhs, rhs, topo),
        _expected(variant, lhs, rhs, topo),
        topo,
        jnp.float32,
    )


@pytest.mark.parametrize("variant", ["sdd", "dsd_t", "dstd"])
def test_nan_padding_rows_are_ignored(variant):
    """NaN (not merely random) padding rows: a kernel that multiplies them by 0 fails."""
    topo = _mixed_topology(32)
    lhs, rhs = _operands(topo, variant, jnp.float32, seed=2)
    expected = _expected(variant, lhs, rhs, topo)
    lhs = _with_garbage(lhs, topo, None, fill=jnp.nan)
    if variant == "dstd":
        rhs = _with_garbage(rhs, topo, None, fill=jnp.nan)
    _check(variant, _run(variant, lhs, rhs, topo), expected, topo, jnp.float32)


def test_dstd_out_dtype():
    topo = _mixed_topology(32)
    lhs, rhs = _operands(topo, "dstd", jnp.bfloat16)
    out = BACKEND.dstd(lhs, rhs, topo, jnp.bfloat16)
    chex.assert_type(out, jnp.bfloat16)
    _check(
        "dstd",
        out,
        reference.grouped_weight_grad(lhs, rhs, topo).astype(jnp.bfloat16),
        topo,
        jnp.bfloat16,
    )


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("product", ["sdd", "dsd"])
def test_product_gradients_match_reference_autodiff(product, transpose_rhs):
    """``products.*(impl="triton")`` VJPs (built from the three kernels) vs jnp autodiff."""
    topo = _mixed_topology(32)
    variant = product + ("_t" if transpose_rhs else "")
    lhs, rhs = _operands(topo, variant, jnp.float32, seed=3)
    cotangent = jax.random.normal(jax.random.PRNGKey(4), (topo.padded_rows, 96))
    fn = getattr(products, product)
    out, vjp = jax.vjp(
        lambda a, b: fn(a, b, topo, transpose_rhs=transpose_rhs, impl="triton"), lhs, rhs
    )
    expected, vjp_ref = jax.vjp(
        lambda a, b: reference.grouped_matmul(a, b, topo, transpose_rhs), lhs, rhs
    )
    _check(variant, out, expected, topo, jnp.float32)
    for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-3)


def test_dstd_gradients_match_reference_autodiff():
    topo = _mixed_topology(32)
    lhs, rhs = _operands(topo, "dstd", jnp.float32, seed=5)
    cotangent = jax.random.normal(jax.random.PRNGKey(6), (NUM_EXPERTS, 64, 96))
    _, vjp = jax.vjp(lambda a, b: products.dstd(a, b, topo, impl="triton"), lhs, rhs)
    _, vjp_ref = jax.vjp(lambda a, b: reference.grouped_weight_grad(a, b, topo), lhs, rhs)
    for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("expert_type", ["mlp", "glu"])
def test_dropless_layer_matches_xla(expert_type):
    """A whole dMoE layer, forward and backward (parameters and input), with
    impl="triton" vs impl="xla"."""
    cfg = MoEConfig(
        d_model=64,
        d_ff=64,
        num_experts=4,
        top_k=2,
        block_size=32,
        expert_type=expert_type,
        impl="triton",
    )
    graphdef, params = nnx.split(DroplessMoE(cfg, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 20, 64))

    def loss(params, x, impl):
        model = nnx.merge(graphdef, params)
        model.config = cfg.replace(impl=impl)
        y, aux = model(x)
        return jnp.sum(y * jnp.cos(y)) + aux["load_balancing_loss"], y

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (loss_triton, y_triton), g_triton = grad(params, x, "triton")
    (loss_xla, y_xla), g_xla = grad(params, x, "xla")
    chex.assert_trees_all_close(y_triton, y_xla, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(loss_triton, loss_xla, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_triton, g_xla, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(g_triton[0]["experts"]["w1"].get_value()).sum()) > 0


@pytest.mark.parametrize(
    "k, n, dtype, message",
    [
        (40, 64, jnp.float32, "k must be a positive multiple of 16"),
        (64, 8, jnp.float32, "n must be a positive multiple of 16"),
        (64, 64, jnp.int32, "dtype must be one of"),
    ],
)
def test_unsupported_operands_raise(k, n, dtype, message):
    topo = _mixed_topology(32)
    lhs = jnp.zeros((topo.padded_rows, k), dtype)
    with pytest.raises(ValueError, match=message):
        products.sdd(lhs, jnp.zeros((NUM_EXPERTS, k, n), dtype), topo, impl="triton")


def test_unsupported_block_size_raises():
    topo = _topology(16, [3, 0, 0, 0])
    with pytest.raises(ValueError, match="block_size must be one of"):
        products.dstd(
            jnp.zeros((topo.padded_rows, 32)),
            jnp.zeros((topo.padded_rows, 32)),
            topo,
            impl="triton",
        )
