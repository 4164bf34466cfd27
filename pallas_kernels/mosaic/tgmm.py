"""Transposed grouped GEMM ``out[e] = lhs[rows of e]ᵀ @ grad[rows of e]`` for sm_90.

The weight gradients of the grouped products: ``[m, k]``, ``[m, n]`` ->
``[E, k, n]``, contracting over each group's rows.

Work decomposition (persistent grid): work items are ``(group e, k tile,
n tile)``, ``E * cdiv(k, block_m) * cdiv(n, block_n)`` of them (a static
count), each owning one ``block_m x block_n`` output tile of ``out[e]``. Its
K loop walks the ``block_k``-row blocks that hold group ``e``'s rows
``[start_e, start_e + size_e)`` (a dynamic trip count read from GMEM group
metadata): a ``stages``-deep TMA pipeline streams ``[block_k, block_m]`` lhs
and ``[block_k, block_n]`` grad tiles into 128-byte-swizzled SMEM, and one
warpgroup issues wgmma with the lhs tile transposed in SMEM, accumulating in
float32 registers with one wgmma in flight.

Group boundaries: the first and last row blocks of a group also hold rows of
its neighbours (or padding / garbage past the last group). In those blocks
only, the warpgroup zeroes the foreign rows of *both* tiles in SMEM with a
select before the wgmma, so neither a neighbour's values nor NaN/Inf garbage
reaches the accumulator (``0 * NaN`` would). Empty groups skip the loop and
store exact zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic import common
from pallas_kernels.mosaic.config import TileConfig, tgmm_config

__all__ = ["tgmm"]


def _zero_foreign_rows(tile_smem, row0, start, end):
    """Zeroes the rows of ``tile_smem [block_k, ·]`` outside ``[start, end)``;
    its first row is global row ``row0``."""
    tile = plgpu.load(tile_smem, layout=plgpu.Layout.WGMMA)
    keep = common.rows_in(row0, tile.shape[0], start, end, tile.shape)
    tile_smem[...] = jnp.where(keep, tile, jnp.zeros_like(tile))


def _kernel(config: TileConfig, starts_ref, sizes_ref, lhs_ref, grad_ref, out_ref):
    """Kernel body. GMEM refs: ``starts``, ``sizes [E]``, ``lhs [m, k]``,
    ``grad [m, n]``, ``out [E, k, n]``."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    num_groups, k, n = out_ref.shape
    grid_k, grid_n = pl.cdiv(k, bm), pl.cdiv(n, bn)
    lhs_transforms = common.swizzled(bm, lhs_ref.dtype)
    grad_transforms = common.swizzled(bn, grad_ref.dtype)

    def contraction(start, end, ki, ni):
        """``lhs[start:end, tile ki]ᵀ @ grad[start:end, tile ni]``: float32 ``[bm, bn]``."""
        first_block = start // bk
        num_blocks = pl.cdiv(end, bk) - first_block
        specs = [
            plgpu.BlockSpec((bk, bm), lambda s: (first_block + s, ki), transforms=lhs_transforms,
                            delay_release=1),
            plgpu.BlockSpec((bk, bn), lambda s: (first_block + s, ni), transforms=grad_transforms,
                            delay_release=1),
        ]

        def acc_scope(acc_ref):
            def step(index, lhs_smem, grad_smem):
                row0 = (first_block + index[0]) * bk

                @pl.when((row0 < start) | (row0 + bk > end))
                def _():
                    _zero_foreign_rows(lhs_smem, row0, start, end)
                    _zero_foreign_rows(grad_smem, row0, start, end)
                    plgpu.commit_smem()  # visible to the wgmma (async proxy)

                plgpu.wgmma(acc_ref, lhs_smem.T, grad_smem)
                plgpu.wgmma_wait(1)  # the previous step's wgmma is done: its slot may refill

            @pl.when(end > start)  # empty groups keep the zero accumulator
            def _():
                plgpu.emit_pipeline(step, grid=(num_blocks,), in_specs=specs,
                                    max_concurrent_steps=config.stages)(lhs_ref, grad_ref)

            return acc_ref[...]

        return pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

    def tile_scope(out_smem):
        tiles_per_group = grid_k * grid_n

        @plgpu.nd_loop((num_groups * tiles_per_group,), collective_axes="sm")
        def _work_item(info):
            group = info.index[0] // tiles_per_group
            ki, ni = plgpu.planar_snake(info.index[0] % tiles_per_group, (grid_k, grid_n), 1,
                                        config.band)
            start = starts_ref[group]
            acc = contraction(start, start + sizes_ref[group], ki, ni)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile stored
            out_smem[...] = acc.astype(out_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem, out_ref.at[group, pl.ds(ki * bm, bm), pl.ds(ni * bn, bn)])

        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(tile_scope, plgpu.SMEM((bm, bn), out_ref.dtype,
                                         transforms=common.swizzled(bn, out_ref.dtype)))


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         group_starts: jax.Array | None = None, out_dtype=None,
         config: TileConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """Per-group ``lhs[rows]ᵀ @ grad[rows]``: the weight gradient of `gmm`.

    Args:
      lhs: ``[m, k]`` bfloat16 or float16.
      grad: ``[m, n]``, lhs's dtype.
      group_sizes: ``[E]`` integer rows per group (>= 0, summing to <= m).
      group_starts: ``[E]`` first row of each group; default: the ragged
        layout ``cumsum(group_sizes) - group_sizes``. Groups must be disjoint.
      out_dtype: result dtype (default lhs's); accumulation is float32.
      config: tiles (``block_m`` tiles ``k``, ``block_n`` tiles ``n``,
        ``block_k`` rows per step); default `config.tgmm_config`.
      interpret: run in GPU interpret mode; default: unless compiling for a GPU.

    Returns:
      ``[E, k, n]``; rows in no group are ignored and empty groups give exact
      zeros.
    """
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm: lhs must be [m, k] and grad [m, n], got {lhs.shape}, "
                         f"{grad.shape}")
    common.check_dtypes("tgmm", lhs, grad)
    (m, k), n = lhs.shape, grad.shape[1]
    common.check_features("tgmm", k=k, n=n)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    starts, sizes = common.group_starts_or_cumsum(group_sizes, group_starts)
    num_groups = sizes.shape[0]
    if m == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    config = config or tgmm_config(k, n, lhs.dtype, out_dtype)
    interpret = common.default_interpret() if interpret is None else interpret
    call = plgpu.kernel(
        functools.partial(_kernel, config),
        out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(common.num_programs(interpret),),
        grid_names=("sm",),
        interpret=common.interpret_params(interpret),
        kernel_name="jmoe_tgmm",
    )
    return call(starts, sizes, common.pad_rows(lhs), common.pad_rows(grad))
