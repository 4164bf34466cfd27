"""Every Triton kernel config lowers for CUDA on this (GPU-less) machine to the
Triton custom call, with its configured launch; so does a whole dMoE step."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jmoe import DroplessMoE, MoEConfig
from pallas_kernels.topology import max_block_rows
from pallas_kernels.triton import config
from pallas_kernels.triton.lowering import (
    DEFAULT_K as K,
)
from pallas_kernels.triton.lowering import (
    DEFAULT_N as N,
)
from pallas_kernels.triton.lowering import (
    VARIANTS,
    lower_for_cuda,
    lower_variant,
    triton_calls,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)
TARGET = "__gpu$xla.gpu.triton"
EXPERTS, ROWS = 8, 2048


@pytest.mark.parametrize("dtype", config.DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("block_size", config.BLOCK_SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_default_config_lowers_to_triton_call(variant, block_size, dtype):
    lowered = lower_variant(variant, block_size, dtype, num_experts=EXPERTS, num_rows=ROWS)
    assert TARGET in lowered.as_text()
    [call] = triton_calls(lowered)
    kind, transpose_rhs = VARIANTS[variant]
    tiles = config.tile_config(kind, block_size, dtype, K, N)
    assert (call.num_warps, call.num_stages) == (tiles.num_warps, tiles.num_stages)
    assert call.name == f"jmoe_{kind}{'_t' if transpose_rhs else ''}"
    assert "tt.dot" in call.ttir and "tt.func" in call.ttir
    # 1-D worst-case grid: every (block row, column tile) or (expert, k tile, n tile).
    if kind == "dstd":
        programs = EXPERTS * (K // tiles.rows) * (N // tiles.cols)
    else:
        programs = max_block_rows(ROWS, EXPERTS, block_size) * (N // tiles.cols)
    assert call.grid == (programs, 1, 1)


def test_lowering_targets_sm80_too():
    [call] = triton_calls(lower_variant("sdd", 128, jnp.bfloat16, capability=80))
    assert call.num_warps == config.tile_config("sdd", 128, jnp.bfloat16, K, N).num_warps


def test_unknown_capability_is_refused():
    with pytest.raises(ValueError, match=r"capability must be one of \(80, 90\), got 75"):
        lower_for_cuda(jnp.sin, jnp.zeros(4), capability=75)


def test_dropless_layer_step_lowers_to_triton_calls():
    """Forward + backward (parameters and input) of a dMoE layer with impl="triton":
    the 2 forward and 4 backward products of a GeLU MLP are all Triton calls."""
    cfg = MoEConfig(
        d_model=128, d_ff=256, num_experts=4, top_k=2, impl="triton", dtype=jnp.bfloat16
    )
    graphdef, params = nnx.split(DroplessMoE(cfg, rngs=nnx.Rngs(0)))

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x)
        return jnp.sum(y.astype(jnp.float32))

    x = jnp.zeros((64, 128), jnp.bfloat16)
    lowered = lower_for_cuda(jax.grad(loss, argnums=(0, 1)), params, x)
    names = sorted(call.name for call in triton_calls(lowered))
    assert names == ["jmoe_dsd", "jmoe_dsd_t", "jmoe_dstd", "jmoe_dstd", "jmoe_sdd", "jmoe_sdd_t"]
