"""Bad inputs raise ValueErrors that name the offending argument."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmoe import CapacityMoE, DenseMLP, DroplessMoE, MoEConfig
from pallas_kernels import products
from pallas_kernels.topology import make_topology

BASE = dict(d_model=8, d_ff=64, num_experts=4, top_k=2, block_size=32, impl="xla")


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(top_k=5), r"top_k must be <= num_experts=4, got 5"),
        (dict(top_k=0), r"top_k must be a positive int"),
        (dict(d_model=0), r"d_model must be a positive int"),
        (dict(d_ff=16.0), r"d_ff must be a positive int"),
        (dict(num_experts=-1), r"num_experts must be a positive int"),
        (dict(dtype=jnp.int32), r"dtype must be a floating dtype, got int32"),
        (dict(param_dtype=jnp.int8), r"param_dtype must be a floating dtype, got int8"),
        (dict(impl="triton", d_ff=48), r"impl='triton' needs d_ff .* block_size=32.*d_ff=48"),
        (dict(impl="triton", d_model=40, d_ff=64), r"impl='triton' needs .*d_model=40"),
        (
            dict(impl="mosaic", d_model=64, d_ff=96),
            r"impl='mosaic' needs d_ff and d_model to be multiples of 64 .*d_ff=96",
        ),
        (dict(impl="mosaic", d_model=32, d_ff=128), r"impl='mosaic' needs .*d_model=32"),
        (dict(score_function="relu"), r"score_function must be one of .*'relu'"),
        (dict(expert_type="moe"), r"expert_type must be one of .*'moe'"),
        (dict(impl="cuda"), r"impl must be one of .*'cuda'"),
        (dict(block_size=48), r"block_size must be one of .*48"),
        (dict(block_size=256), r"block_size must be one of .*256"),
        (dict(normalize_top_k=0.0), r"normalize_top_k must be None or a p > 0"),
        (dict(router_jitter_eps=1.0), r"router_jitter_eps must be in \[0, 1\)"),
        (dict(capacity_factor=-0.5), r"capacity_factor must be >= 0"),
        (dict(ep_capacity_factor=0.0), r"ep_capacity_factor must be None or > 0, got 0.0"),
        (dict(num_shared_experts=-1), r"num_shared_experts must be >= 0"),
        (dict(shared_d_ff=0), r"shared_d_ff must be None or positive"),
    ],
)
def test_bad_config(changes, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, **changes})


def test_triton_accepts_block_multiples():
    MoEConfig(**{**BASE, "impl": "triton", "d_model": 64, "d_ff": 128})


def test_mosaic_accepts_multiples_of_64_and_auto_any_size():
    MoEConfig(**{**BASE, "impl": "mosaic", "d_model": 64, "d_ff": 192})
    MoEConfig(**{**BASE, "impl": "auto", "d_model": 8, "d_ff": 24})


@pytest.mark.parametrize("layer", [DroplessMoE, CapacityMoE, DenseMLP])
def test_bad_layer_input(layer):
    model = nnx.eval_shape(lambda: layer(MoEConfig(**BASE), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_model=8\], got \(5, 7\)"):
        model(jnp.zeros((5, 7)))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_model=8\], got \(\)"):
        model(jnp.zeros(()))
    with pytest.raises(ValueError, match=r"x must be a floating-point array, got dtype int32"):
        model(jnp.zeros((5, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"x must be an array \[\.\.\., d_model\], got list"):
        model([[0.0] * 8])


def test_bad_impl_name():
    with pytest.raises(ValueError, match=r"impl must be one of .*'tpu'"):
        products.resolve_impl("tpu")
    with pytest.raises(ValueError, match=r"impl must be one of .*'tpu'"):
        products.sdd(
            jnp.zeros((32, 4)),
            jnp.zeros((2, 4, 3)),
            make_topology(jnp.array([1, 0]), 1, 32),
            impl="tpu",
        )


@pytest.mark.parametrize("block_size", [0, 3, 48, -32])
def test_bad_topology_block_size(block_size):
    with pytest.raises(ValueError, match=r"block_size must be a power of two >= 1"):
        make_topology(jnp.array([1, 2]), 3, block_size)


def test_bad_group_sizes():
    with pytest.raises(ValueError, match=r"group_sizes must be 1-D \[num_experts\]"):
        make_topology(jnp.ones((2, 2), jnp.int32), 4, 32)
    with pytest.raises(ValueError, match=r"group_sizes must be integer, got float32"):
        make_topology(jnp.ones((2,), jnp.float32), 4, 32)


# Topology with 2 experts, 10 rows, block 32: (10 + 2 * 31) // 32 = 2 block rows, 64 rows.
TOPO = make_topology(jnp.array([7, 3]), 10, 32)
P = TOPO.padded_rows


@pytest.mark.parametrize("product", [products.sdd, products.dsd])
def test_grouped_product_shape_mismatches(product):
    name = product.__name__
    lhs, rhs = jnp.zeros((P, 4)), jnp.zeros((2, 4, 3))
    product(lhs, rhs, TOPO, impl="xla")  # the good case runs
    with pytest.raises(
        ValueError, match=rf"{name}: lhs must be \[padded_rows=64, k\], got shape \(63, 4\)"
    ):
        product(jnp.zeros((P - 1, 4)), rhs, TOPO, impl="xla")
    with pytest.raises(ValueError, match=rf"{name}: lhs must be .*got shape \(64,\)"):
        product(jnp.zeros((P,)), rhs, TOPO, impl="xla")
    with pytest.raises(
        ValueError, match=rf"{name}: rhs must be \[num_experts=2, k, n\], got shape \(3, 4"
    ):
        product(lhs, jnp.zeros((3, 4, 3)), TOPO, impl="xla")
    with pytest.raises(ValueError, match=rf"{name}: contraction mismatch.*\(64, 4\).*\[E, k, n\]"):
        product(lhs, jnp.zeros((2, 5, 3)), TOPO, impl="xla")
    with pytest.raises(ValueError, match=rf"{name}: contraction mismatch.*transpose_rhs=True"):
        product(lhs, rhs, TOPO, transpose_rhs=True, impl="xla")
    with pytest.raises(ValueError, match=rf"{name}: lhs and rhs dtypes differ"):
        product(lhs.astype(jnp.bfloat16), rhs, TOPO, impl="xla")


def test_dstd_shape_mismatches():
    lhs, rhs = jnp.zeros((P, 4)), jnp.zeros((P, 3))
    products.dstd(lhs, rhs, TOPO, impl="xla")
    with pytest.raises(
        ValueError, match=r"dstd: lhs must be \[padded_rows=64, _\], got shape \(10, 4\)"
    ):
        products.dstd(jnp.zeros((10, 4)), rhs, TOPO, impl="xla")
    with pytest.raises(
        ValueError, match=r"dstd: rhs must be \[padded_rows=64, _\], got shape \(64, 3, 1\)"
    ):
        products.dstd(lhs, jnp.zeros((P, 3, 1)), TOPO, impl="xla")
    with pytest.raises(ValueError, match=r"dstd: lhs and rhs dtypes differ"):
        products.dstd(lhs, rhs.astype(np.float16), TOPO, impl="xla")
