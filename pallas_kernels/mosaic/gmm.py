"""Grouped GEMM ``out[rows of group e] = lhs[rows of group e] @ rhs[e]`` for sm_90.

Work decomposition (persistent grid): the output ``[m, n]`` is cut into
``block_m x block_n`` tiles, each written by exactly one work item with one
full-tile TMA store, so no two CTAs ever write the same rows. A row tile meets
``count >= 0`` groups (row ranges ``[start_e, start_e + size_e)``, from group
metadata in GMEM); the work item runs its K pipeline once per group that meets
it (weights ``rhs[e]``) and merges the rows of group ``e`` into the epilogue
tile with a select. Rows in no group (past the last group, or between groups
of a padded layout) come out exactly zero; input rows there are never used,
so even NaN garbage cannot leak (a select, not a multiply). A row tile inside
one group (the common case) takes a single pass and no select.

Per pass: a ``stages``-deep TMA pipeline (``plgpu.emit_pipeline``) streams
``[block_m, block_k]`` lhs and ``[block_k, block_n]`` (or transposed) rhs tiles
into 128-byte-swizzled SMEM; one warpgroup issues wgmma into a float32
register accumulator, keeping one wgmma in flight (``delay_release=1`` +
``wgmma_wait(1)``). The epilogue casts to ``out_dtype`` into a swizzled SMEM
tile and TMA-stores it; the store drains while the next tile's main loop
runs (it is awaited only before the epilogue tile is rewritten).

Edges: TMA zero-fills reads past the array (partial K, N and M tiles) and
clips stores to it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic import common
from pallas_kernels.mosaic.config import TileConfig, gmm_config

__all__ = ["gmm", "row_tile_groups"]


def row_tile_groups(starts: jax.Array, sizes: jax.Array, num_rows: int, block_m: int):
    """Which groups meet each ``block_m``-row tile of ``[0, num_rows)``.

    Groups must be ordered by start and disjoint (true of every jmoe layout).

    Returns:
      ``[3, cdiv(num_rows, block_m)] int32``: per row tile, the first group
      that may meet it, how many consecutive groups to visit (0: none; empty
      groups among them are skipped), and 1 if a single group covers the tile.
    """
    ends = starts + sizes
    tile_start = jnp.arange(pl.cdiv(num_rows, block_m), dtype=jnp.int32) * block_m
    tile_end = jnp.minimum(tile_start + block_m, num_rows)
    first = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
    last = jnp.searchsorted(starts, tile_end, side="left").astype(jnp.int32) - 1
    count = jnp.maximum(last - first + 1, 0)
    safe = jnp.minimum(first, starts.shape[0] - 1)
    covered = (count == 1) & (starts[safe] <= tile_start) & (ends[safe] >= tile_end)
    return jnp.stack([first, count, covered.astype(jnp.int32)])


def _kernel(config: TileConfig, transpose_rhs: bool,
            tiles_ref, starts_ref, sizes_ref, lhs_ref, rhs_ref, out_ref):
    """Kernel body. GMEM refs: ``tiles [3, row tiles]`` (`row_tile_groups`),
    ``starts``, ``sizes [E]``, ``lhs [m, k]``, ``rhs``, ``out [m, n]``."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    (m, n), k = out_ref.shape, lhs_ref.shape[1]
    grid_m, grid_n = pl.cdiv(m, bm), pl.cdiv(n, bn)
    lhs_transforms = common.swizzled(bk, lhs_ref.dtype)
    rhs_block = (bn, bk) if transpose_rhs else (bk, bn)
    rhs_transforms = common.swizzled(rhs_block[1], rhs_ref.dtype)

    def main_loop(group, t, j):
        """``lhs[row tile t] @ rhs[group][:, column tile j]``: float32 ``[bm, bn]``."""
        specs = [
            plgpu.BlockSpec((bm, bk), lambda s: (t, s), transforms=lhs_transforms,
                            delay_release=1),
            plgpu.BlockSpec(rhs_block, (lambda s: (j, s)) if transpose_rhs else (lambda s: (s, j)),
                            transforms=rhs_transforms, delay_release=1),
        ]

        def acc_scope(acc_ref):
            def step(_, lhs_smem, rhs_smem):
                plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.T if transpose_rhs else rhs_smem)
                plgpu.wgmma_wait(1)  # the previous step's wgmma is done: its slot may refill

            plgpu.emit_pipeline(step, grid=(pl.cdiv(k, bk),), in_specs=specs,
                                max_concurrent_steps=config.stages)(lhs_ref, rhs_ref.at[group])
            return acc_ref[...]

        return pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

    def tile_scope(out_smem):
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _work_item(info):
            t, j = plgpu.planar_snake(info.index[0], (grid_m, grid_n), 1, config.band)
            first, count, covered = tiles_ref[0, t], tiles_ref[1, t], tiles_ref[2, t] == 1

            @pl.when(jnp.logical_not(covered))
            def _zero():  # rows of no group stay zero; groups are merged in below
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[...] = jnp.zeros((bm, bn), out_smem.dtype)

            def per_group(i, carry):
                group = first + i
                start, size = starts_ref[group], sizes_ref[group]

                @pl.when(size > 0)
                def _():
                    acc = main_loop(group, t, j).astype(out_smem.dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile stored

                    @pl.when(covered)
                    def _():
                        out_smem[...] = acc

                    @pl.when(jnp.logical_not(covered))
                    def _():
                        mine = common.rows_in(t * bm, bm, start, start + size, (bm, bn))
                        out_smem[...] = jnp.where(mine, acc, out_smem[...])

                return carry

            lax.fori_loop(0, count, per_group, 0)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_ref.at[pl.ds(t * bm, bm), pl.ds(j * bn, bn)])

        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(tile_scope, plgpu.SMEM((bm, bn), out_ref.dtype,
                                         transforms=common.swizzled(bn, out_ref.dtype)))


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        group_starts: jax.Array | None = None, transpose_rhs: bool = False, out_dtype=None,
        config: TileConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """Grouped matmul: rows of group ``e`` of ``lhs`` times ``rhs[e]``.

    Args:
      lhs: ``[m, k]`` bfloat16 or float16.
      rhs: ``[E, k, n]``, or ``[E, n, k]`` with ``transpose_rhs``; lhs's dtype.
      group_sizes: ``[E]`` integer rows per group (>= 0, summing to <= m).
      group_starts: ``[E]`` first row of each group; default: the ragged
        layout ``cumsum(group_sizes) - group_sizes`` (as ``lax.ragged_dot``).
        Groups must be ordered by start and disjoint.
      out_dtype: result dtype (default lhs's); accumulation is float32.
      config: tiles; default `config.gmm_config`.
      interpret: run in GPU interpret mode; default: unless compiling for a GPU.

    Returns:
      ``[m, n]``: ``lhs[r] @ rhs[e]`` on the rows ``r`` of group ``e``, zero on
      rows in no group.
    """
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm: lhs must be [m, k] and rhs [E, k, n], got {lhs.shape}, {rhs.shape}")
    common.check_dtypes("gmm", lhs, rhs)
    m, k = lhs.shape
    num_groups, rhs_k, n = rhs.shape
    if transpose_rhs:
        rhs_k, n = n, rhs_k
    if rhs_k != k:
        raise ValueError(f"gmm: contraction mismatch: lhs {lhs.shape}, rhs {rhs.shape} "
                         f"(transpose_rhs={transpose_rhs})")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"gmm: group_sizes must be [E={num_groups}], got {group_sizes.shape}")
    common.check_features("gmm", k=k, n=n)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    starts, sizes = common.group_starts_or_cumsum(group_sizes, group_starts)
    config = config or gmm_config(m, n, num_groups, lhs.dtype, out_dtype)
    interpret = common.default_interpret() if interpret is None else interpret
    lhs_padded = common.pad_rows(lhs)
    padded_m = lhs_padded.shape[0]
    call = plgpu.kernel(
        functools.partial(_kernel, config, transpose_rhs),
        out_type=jax.ShapeDtypeStruct((padded_m, n), out_dtype),
        grid=(common.num_programs(interpret),),
        grid_names=("sm",),
        interpret=common.interpret_params(interpret),
        kernel_name="jmoe_gmm_t" if transpose_rhs else "jmoe_gmm",
    )
    tiles = row_tile_groups(starts, sizes, padded_m, config.block_m)
    return call(tiles, starts, sizes, lhs_padded, rhs)[:m]
