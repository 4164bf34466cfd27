"""Transposed grouped GEMM ``out[e] = lhs[rows of e]ᵀ @ grad[rows of e]`` for sm_90.

The weight gradients of the grouped products: ``[m, k]``, ``[m, n]`` ->
``[E, k, n]``, contracting over each group's rows.

Work (persistent, warp-specialized CTAs as in ``gmm.py``): work items are
``(group e, k tile, n tile)``, ``E * cdiv(k, block_m) * cdiv(n, block_n)`` of
them (a static count), each owning one ``block_m x block_n`` output tile of
``out[e]``. Its K loop walks the ``block_k``-row blocks that hold group
``e``'s rows ``[start_e, start_e + size_e)`` (a dynamic trip count): the
producer warpgroup streams ``[block_k, block_m]`` lhs and ``[block_k,
block_n]`` grad tiles into ``stages`` swizzled SMEM slots, the two
consumer warpgroups each issue wgmma on their half of the output tile with
the lhs tile transposed in SMEM, accumulating in float32 registers with one
wgmma per consumer at a time. The producer runs ahead into the next work item.

Group boundaries: the first and last row blocks of a group also hold rows of
its neighbours (or padding / garbage past the last group). In those blocks
only, consumer 0 zeroes the foreign rows of the lhs tile and consumer 1 those
of the grad tile in SMEM (a select, so neither a neighbour's values nor
NaN/Inf garbage reaches the accumulator: ``0 * NaN`` would), then both meet
at a barrier before their wgmma reads the tiles. Empty groups skip the loop
and store exact zeros. Epilogue: `common.store_rows`, full tiles.

Group bounds in SMEM: each CTA copies ``starts`` and ``sizes`` (8 bytes per
group, 2 KB at E = 256) into SMEM once before its loop when they fit next to
the pipeline (`common.metadata_fits`), else reads them from GMEM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic import common
from pallas_kernels.mosaic.config import TileConfig, fit_stages, tgmm_config

__all__ = ["tgmm"]


def _zero_foreign_rows(tile_smem, row0, start, end, swizzle: int):
    """Zeroes the rows of ``tile_smem [block_k, ·]`` (``swizzle``-byte
    swizzled) outside ``[start, end)``; its first row is global row ``row0``.
    Registers in the wgmma layout (64-row tiles), or at ``block_k = 32`` the
    SMEM copy layout (8-row tiles)."""
    tile = tile_smem[...]
    if tile.shape[0] % 64:
        layout = plgpu.Layout.SMEM_GMEM_COPY(tile.shape, tile.dtype, swizzle)
    else:
        layout = plgpu.Layout.WGMMA
    rows = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, tile.shape, 0), layout) + row0
    tile_smem[...] = jnp.where((rows >= start) & (rows < end), tile, jnp.zeros_like(tile))
    plgpu.commit_smem()  # visible to the wgmma (async proxy)


def _kernel(config: TileConfig, meta_in_smem: bool, bounds_ref, lhs_ref, grad_ref, out_ref):
    """Kernel body. GMEM refs: ``bounds`` (``[2, E]`` starts and sizes packed
    by `common.pack_metadata`; copied to SMEM if ``meta_in_smem``),
    ``lhs [m, k]``, ``grad [m, n]``, ``out [E, k, n]``."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    wg_m, wg_n = config.warpgroup_tile
    num_groups, k, n = out_ref.shape
    grid_k, grid_n = pl.cdiv(k, bm), pl.cdiv(n, bn)
    tiles_per_group = grid_k * grid_n

    # wgmma contracts over the tiles' rows in groups of the swizzle's width
    # and takes one swizzle for both operands: the one block_k allows.
    transforms = common.swizzled(bk, lhs_ref.dtype)
    swizzle = transforms[1].swizzle

    def in_specs(first_block, ki, ni):
        return [
            plgpu.BlockSpec((bk, bm), lambda s: (first_block + s, ki), transforms=transforms),
            plgpu.BlockSpec((bk, bn), lambda s: (first_block + s, ni), transforms=transforms),
        ]

    def _loop(bounds, allocations, out_smem, masked):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_groups * tiles_per_group,), collective_axes="sm")
        def _work_item(info):
            group = info.index[0] // tiles_per_group
            ki, ni = plgpu.planar_snake(
                info.index[0] % tiles_per_group, (grid_k, grid_n), 1, config.band
            )
            start = common.read_metadata(bounds, num_groups, 0, group)
            end = start + common.read_metadata(bounds, num_groups, 1, group)
            first_block = start // bk
            row0 = ki * bm + (wg * wg_m if config.split == "m" else 0)
            col0 = ni * bn + (wg * wg_n if config.split == "n" else 0)
            store = functools.partial(
                common.store_rows,
                out_smem,
                out_gmem=out_ref.at[group],
                row0=row0,
                col0=col0,
                lo=0,
                hi=k,
            )

            def mma(index, lhs_smem, grad_smem, acc_ref):
                block_row0 = (first_block + index[0]) * bk

                @pl.when((block_row0 < start) | (block_row0 + bk > end))
                def _():
                    mask = functools.partial(
                        _zero_foreign_rows, row0=block_row0, start=start, end=end, swizzle=swizzle
                    )
                    pl.when(wg == 0)(lambda: mask(lhs_smem))
                    pl.when(wg == 1)(lambda: mask(grad_smem))
                    plgpu.barrier_arrive(masked)
                    plgpu.barrier_wait(masked)

                if config.split == "m":
                    lhs_smem = lhs_smem.at[:, pl.ds(wg * wg_m, wg_m)]
                else:
                    grad_smem = grad_smem.at[:, pl.ds(wg * wg_n, wg_n)]
                plgpu.wgmma(acc_ref, lhs_smem.T, grad_smem)
                plgpu.wgmma_wait(0)  # this slot is released when the body returns
                return acc_ref

            def compute_context(eval_pipeline):
                def acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    store(acc_ref[...].astype(out_ref.dtype))

                pl.run_scoped(acc_scope, plgpu.ACC((wg_m, wg_n), jnp.float32))

            @pl.when(end > start)
            def _():
                common.pipeline(
                    mma,
                    steps=pl.cdiv(end, bk) - first_block,
                    in_specs=in_specs(first_block, ki, ni),
                    stages=config.stages,
                    compute_context=compute_context,
                )(lhs_ref, grad_ref, allocations=allocations)

            @pl.when((end <= start) & (wg < common.COMPUTE_WGS))  # empty group: exact zeros
            def _():
                store(jnp.zeros((wg_m, wg_n), out_ref.dtype))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def _scope(masked):
        pl.run_scoped(
            lambda allocations, out_smem: common.with_metadata(
                functools.partial(_loop, allocations=allocations, out_smem=out_smem, masked=masked),
                bounds_ref,
                in_smem=meta_in_smem,
            ),
            allocations=common.pipeline_allocations(
                in_specs(0, 0, 0), config.stages, lhs_ref, grad_ref
            ),
            out_smem=common.epilogue_smem(config.epilogue_rows, out_ref.dtype),
            collective_axes="wg",
        )

    pl.run_scoped(_scope, plgpu.Barrier(num_arrivals=common.COMPUTE_WGS), collective_axes="wg")


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    group_starts: jax.Array | None = None,
    out_dtype=None,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-group ``lhs[rows]ᵀ @ grad[rows]``: the weight gradient of `gmm`.

    Args:
      lhs: ``[m, k]`` bfloat16 or float16.
      grad: ``[m, n]``, lhs's dtype.
      group_sizes: ``[E]`` integer rows per group (>= 0, summing to <= m).
      group_starts: ``[E]`` first row of each group; default: the ragged
        layout ``cumsum(group_sizes) - group_sizes``. Groups must be disjoint.
      out_dtype: result dtype (default lhs's); accumulation is float32.
      config: tiles (``block_m`` tiles ``k``, ``block_n`` tiles ``n``,
        ``block_k`` rows per step); default `config.tgmm_config`;
        ``stages=None``: as many as fit (`config.fit_stages`).
      interpret: run in GPU interpret mode; default: unless compiling for a GPU.

    Returns:
      ``[E, k, n]``; rows in no group are ignored and empty groups give exact
      zeros.
    """
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"tgmm: lhs must be [m, k] and grad [m, n], got {lhs.shape}, {grad.shape}")
    common.check_dtypes("tgmm", lhs, grad)
    (m, k), n = lhs.shape, grad.shape[1]
    common.check_features("tgmm", k=k, n=n)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    starts, sizes = common.group_starts_or_cumsum(group_sizes, group_starts)
    num_groups = sizes.shape[0]
    if m == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    config = fit_stages(config or tgmm_config(k, n, lhs.dtype, out_dtype), lhs.dtype)
    bounds = common.pack_metadata(jnp.stack([starts, sizes]))
    call = common.launch(
        functools.partial(
            _kernel, config, common.metadata_fits(config, lhs.dtype, out_dtype, bounds.shape)
        ),
        jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        name="jmoe_tgmm",
        interpret=interpret,
    )
    return call(bounds, common.pad_rows(lhs), common.pad_rows(grad))
