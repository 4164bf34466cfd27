"""Every default and deep (block_k 32, 6 stages) Mosaic GPU tile config lowers
for CUDA (sm_90) on this GPU-less machine, for the products of the three
production layers of the benchmarks, to the Mosaic GPU custom call; lowering
runs Mosaic's layout, wgmma/TMA and shared-memory checks (pipeline, epilogue,
barriers and the group metadata when it is staged in SMEM), so a config over
the 227 KB budget fails here. A whole dMoE step lowers too."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks.shapes import PRODUCTION_SHAPES
from jmoe import DroplessMoE, MoEConfig
from pallas_kernels.mosaic import TileConfig, common, gmm, tgmm
from pallas_kernels.mosaic.config import (
    GMM_LARGE_GROUPS,
    GMM_LARGE_GROUPS_DEEP,
    MAX_STAGES,
    RESERVED_BYTES,
    SMEM_BUDGET,
    fit_stages,
    gmm_config,
    tgmm_config,
)
from pallas_kernels.mosaic.gmm import work_items
from pallas_kernels.mosaic.lowering import CUSTOM_CALL_TARGET, kernel_names, lower_for_cuda

BF16 = jnp.bfloat16
# The products of one layer: name -> (kind, transpose_rhs, k, n) in terms of (d_model, d_ff).
PRODUCTS = {
    "x@W1": ("gmm", False, "d", "f"),
    "h@W2": ("gmm", False, "f", "d"),
    "dh@W1T": ("gmm", True, "f", "d"),
    "dy@W2T": ("gmm", True, "d", "f"),
    "dW1=xT@dh": ("tgmm", None, "d", "f"),
    "dW2=hT@dy": ("tgmm", None, "f", "d"),
}


def _abstract(*shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lower_product(shape, product, out_dtype, deep):
    """Lowers one product of ``shape`` on abstract operands with the default
    (or ``deep``) tiles and explicit group starts, as the jmoe adapter calls
    the kernels (one abstract ``[E]`` int32 serves as sizes and starts);
    returns ``(lowered, config, metadata shape [fields, values] before packing)``."""
    kind, transpose_rhs, k_dim, n_dim = PRODUCTS[product]
    dims = {"d": shape.d_model, "f": shape.d_ff}
    m, k, n, num_experts = shape.rows, dims[k_dim], dims[n_dim], shape.num_experts
    sizes = _abstract(num_experts, dtype=jnp.int32)
    if kind == "gmm":
        config = gmm_config(m, n, num_experts, BF16, out_dtype, deep=deep)
        rhs = _abstract(num_experts, n, k) if transpose_rhs else _abstract(num_experts, k, n)
        fn = lambda a, b, g: gmm(
            a, b, g, group_starts=g, transpose_rhs=transpose_rhs, out_dtype=out_dtype, config=config
        )
        items = jax.eval_shape(
            lambda g: work_items(g, g, m, config.block_m, gaps=True), sizes
        ).shape
        return lower_for_cuda(fn, _abstract(m, k), rhs, sizes), config, items
    config = tgmm_config(k, n, BF16, out_dtype, deep=deep)
    fn = lambda a, b, g: tgmm(a, b, g, group_starts=g, out_dtype=out_dtype, config=config)
    return lower_for_cuda(fn, _abstract(m, k), _abstract(m, n), sizes), config, (2, num_experts)


def _lowering_cases():
    """(shape, product, deep): the defaults everywhere; the deep variant at
    DeepSeek (the longest work list) in the fast suite, elsewhere slow."""
    for shape_name in PRODUCTION_SHAPES:
        for product in PRODUCTS:
            for deep in (False, True):
                slow = deep and shape_name != "deepseek"
                yield pytest.param(
                    shape_name,
                    product,
                    deep,
                    id=f"{shape_name}-{product}-{'bk32x6' if deep else 'bk64x4'}",
                    marks=pytest.mark.slow if slow else (),
                )


@pytest.mark.parametrize("shape_name,product,deep", _lowering_cases())
def test_configs_lower_for_cuda(shape_name, product, deep):
    # Layer products return bf16; weight gradients of float32 master weights are float32.
    out_dtype = jnp.float32 if product.startswith("dW") else BF16
    lowered, config, items = _lower_product(PRODUCTION_SHAPES[shape_name], product, out_dtype, deep)
    assert CUSTOM_CALL_TARGET in lowered.as_text()
    expected = {"gmm": "jmoe_gmm_t" if PRODUCTS[product][1] else "jmoe_gmm", "tgmm": "jmoe_tgmm"}
    assert kernel_names(lowered) == [expected[PRODUCTS[product][0]]]
    assert config.smem_bytes(BF16, out_dtype) + RESERVED_BYTES <= SMEM_BUDGET
    assert (config.block_k, config.stages) == ((32, 6) if deep else (64, 4))
    packed = jax.eval_shape(common.pack_metadata, jax.ShapeDtypeStruct(items, jnp.int32)).shape
    if deep:  # the deep pipeline leaves room for the metadata at every shape
        assert common.metadata_fits(config, BF16, out_dtype, packed)


@pytest.mark.parametrize("kind", ["gmm", "tgmm"])
def test_float16_lowers(kind):
    shape = PRODUCTION_SHAPES["mixtral"]
    m, d, f = shape.rows, shape.d_model, shape.d_ff
    f16 = jnp.float16
    sizes = _abstract(shape.num_experts, dtype=jnp.int32)
    if kind == "gmm":
        lowered = lower_for_cuda(
            gmm, _abstract(m, d, dtype=f16), _abstract(shape.num_experts, d, f, dtype=f16), sizes
        )
    else:
        lowered = lower_for_cuda(
            functools.partial(tgmm, out_dtype=jnp.float32),
            _abstract(m, d, dtype=f16),
            _abstract(m, f, dtype=f16),
            sizes,
        )
    assert kernel_names(lowered) == [f"jmoe_{kind}"]


def test_small_group_shapes_get_narrow_tall_tiles():
    """DeepSeek-like layers (~128 rows per expert) use 128-row CTA tiles split by
    columns; Mixtral 256-row tiles split by rows: 128x128 per consumer warpgroup,
    four 48 KB stages plus the 32 KB tiled epilogue."""
    deepseek, mixtral = PRODUCTION_SHAPES["deepseek"], PRODUCTION_SHAPES["mixtral"]
    small = gmm_config(deepseek.rows, deepseek.d_ff, deepseek.num_experts, BF16, BF16)
    large = gmm_config(mixtral.rows, mixtral.d_ff, mixtral.num_experts, BF16, BF16)
    assert (small.block_m, small.block_n, small.split) == (128, 256, "n")
    assert (large.block_m, large.block_n, large.split) == (256, 128, "m")
    for config in (small, large, tgmm_config(deepseek.d_model, deepseek.d_ff, BF16, jnp.float32)):
        assert config.warpgroup_tile == (128, 128)
        assert config.stages == 4
        assert config.smem_bytes(BF16, BF16) == 4 * 48 * 1024 + 32 * 1024 <= SMEM_BUDGET


def test_stages_default_to_as_many_as_fit():
    """``stages=None``: as many as fit next to the 32 KB epilogue and the
    barriers (4 of 48 KB at block_k 64), at most MAX_STAGES; the deep configs
    take 6 of 24 KB; a tile whose two stages do not fit is refused."""
    large = fit_stages(GMM_LARGE_GROUPS, BF16)
    assert GMM_LARGE_GROUPS.stages is None and large.stages == 4
    deep = fit_stages(GMM_LARGE_GROUPS_DEEP, BF16)
    assert (deep.block_k, deep.stages) == (32, MAX_STAGES) == (32, 6)
    assert deep.smem_bytes(BF16, BF16) == 6 * 24 * 1024 + 32 * 1024
    small = fit_stages(TileConfig(block_m=128, block_n=64, block_k=64), BF16)
    assert small.stages == MAX_STAGES
    with pytest.raises(ValueError, match="SMEM budget"):
        fit_stages(TileConfig(block_m=256, block_n=128, block_k=128, epilogue_rows=128), BF16)
    with pytest.raises(ValueError, match="fit_stages"):
        GMM_LARGE_GROUPS.smem_bytes(BF16, BF16)
    with pytest.raises(ValueError, match="block_k must be 32, 64 or 128"):
        TileConfig(block_m=128, block_n=128, block_k=16)


def test_over_budget_config_fails_to_lower():
    """The shared-memory check really runs during lowering on this machine."""
    config = TileConfig(block_m=128, block_n=128, block_k=128, stages=4)  # 256 KB + 32 KB
    assert config.smem_bytes(BF16, BF16) > SMEM_BUDGET
    fn = lambda a, b, g: gmm(a, b, g, config=config)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower_for_cuda(
            fn, _abstract(1024, 512), _abstract(4, 512, 512), _abstract(4, dtype=jnp.int32)
        )


@pytest.mark.slow
def test_dropless_layer_step_lowers_to_mosaic_kernels():
    """Forward + backward of a SwiGLU dMoE layer with impl="mosaic": 3 forward
    gmm (x@W1, x@W3, act@W2), 3 backward gmm with transposed weights (dy@W2ᵀ,
    dh@W1ᵀ, du@W3ᵀ) and 3 tgmm, all Mosaic GPU custom calls, none interpreted."""
    cfg = MoEConfig(
        d_model=128, d_ff=256, num_experts=4, top_k=2, expert_type="glu", impl="mosaic", dtype=BF16
    )
    graphdef, params = nnx.split(DroplessMoE(cfg, rngs=nnx.Rngs(0)))

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x)
        return jnp.sum(y.astype(jnp.float32))

    # 63 tokens x top-2 = 126 rows: the kernels' wrappers pad them to 128.
    lowered = lower_for_cuda(jax.grad(loss, argnums=(0, 1)), params, _abstract(63, 128))
    assert (
        sorted(kernel_names(lowered)) == ["jmoe_gmm"] * 3 + ["jmoe_gmm_t"] * 3 + ["jmoe_tgmm"] * 3
    )
    assert "io_callback" not in lowered.as_text() and "callback" not in lowered.as_text()
