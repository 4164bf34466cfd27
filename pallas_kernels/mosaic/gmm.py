"""Grouped GEMM ``out[rows of group e] = lhs[rows of group e] @ rhs[e]`` for sm_90.

Work list (built on device by `work_items`, no host sync): the rows
``[0, m)`` are cut into segments, each group's row range and the ranges that
belong to no group (between groups of a padded layout, past the last group).
A work item is one (row tile, segment) pair that meets: a row tile inside
one group is one item; a tile straddling ``j`` segments is ``j`` items, each
computing the whole tile with its segment's weights and storing only its
segment's rows (a partial store). Items of rows in no group skip the K loop
and store zeros, so those rows come out exactly zero whatever the input
holds there (NaN rows of lhs only reach accumulator rows that are never
stored: a row of ``lhs @ rhs`` depends on that row alone). The list has a
static length ``cdiv(m, block_m) + E`` (ragged layout) or ``+ 2E``
(explicit ``group_starts``, gaps possible); unused entries are no-ops.

Persistent, warp-specialized CTAs: one CTA per SM strides over (work item,
column tile) pairs in banded order (``plgpu.planar_snake``). Per CTA, a
producer warpgroup with `common.PRODUCER_REGISTERS` registers issues the TMA
loads of ``[block_m, block_k]`` lhs and ``[block_k, block_n]`` (or transposed)
rhs tiles into ``stages`` swizzled SMEM slots (`common.swizzled`); two consumer
warpgroups each issue wgmma on their half of the CTA tile (``split``) into a
float32 register accumulator (the other consumer's wgmma keeps the tensor
cores busy while one waits for its own). The producer runs ahead
across work items: while the consumers run an item's epilogue, it is already
loading the next item's first stages (``plgpu.emit_pipeline_warp_specialized``
with allocations shared by the whole loop). Epilogue: `common.store_rows`,
64-row double-buffered SMEM tiles per consumer and TMA stores of the item's
rows only.

Work list in SMEM: each CTA copies the packed list into SMEM once, before
its loop (one TMA; every warpgroup waits for it), when it fits next to the
pipeline (`common.metadata_fits`: with the deep 6-stage tiles always at
the benchmark shapes, with the default 4 stages of 48 KB only lists up to
2 KB, e.g. Mixtral's); otherwise the items are read from GMEM.

Edges: TMA zero-fills reads past the array (partial K, N and M tiles); the
epilogue never stores past ``m`` or ``n``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic import common
from pallas_kernels.mosaic.config import TileConfig, fit_stages, gmm_config

__all__ = ["gmm", "work_items", "ZERO_ITEM", "NO_ITEM"]

ZERO_ITEM = -1  # the group field of an item whose rows belong to no group
NO_ITEM = -2  # the group field of an unused list entry


def work_items(
    starts: jax.Array, sizes: jax.Array, num_rows: int, block_m: int, *, gaps: bool
) -> jax.Array:
    """The (row tile, segment) work list of ``gmm`` over rows ``[0, num_rows)``.

    Groups must be ordered by start and disjoint (true of every jmoe layout).

    Args:
      starts, sizes: ``[E] int32`` group row ranges.
      gaps: whether rows between groups may exist (explicit ``group_starts``);
        without, only rows past the last group belong to no group.

    Returns:
      ``[4, cdiv(num_rows, block_m) + E (+ E with gaps)] int32``, per item:
      row tile ``t``, group (or `ZERO_ITEM`, `NO_ITEM`), and the item's rows
      ``[lo, hi)`` inside tile ``t``. Items are in row order.
    """
    num_groups = starts.shape[0]
    ends = starts + sizes
    tail = ends[-1]  # groups are ordered: the last one ends last
    if gaps:
        prev_end = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
        seg_lo = jnp.concatenate([jnp.stack([prev_end, starts], 1).reshape(-1), tail[None]])
        seg_hi = jnp.concatenate(
            [jnp.stack([starts, ends], 1).reshape(-1), jnp.full((1,), num_rows, jnp.int32)]
        )
        seg_group = jnp.concatenate(
            [
                jnp.stack(
                    [
                        jnp.full((num_groups,), ZERO_ITEM, jnp.int32),
                        jnp.arange(num_groups, dtype=jnp.int32),
                    ],
                    1,
                ).reshape(-1),
                jnp.full((1,), ZERO_ITEM, jnp.int32),
            ]
        )
    else:
        seg_lo = jnp.concatenate([starts, tail[None]])
        seg_hi = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
        seg_group = jnp.concatenate(
            [jnp.arange(num_groups, dtype=jnp.int32), jnp.full((1,), ZERO_ITEM, jnp.int32)]
        )
    first_tile = seg_lo // block_m
    tiles = jnp.where(seg_hi > seg_lo, (seg_hi - 1) // block_m - first_tile + 1, 0)
    items_end = jnp.cumsum(tiles)
    num_items = pl.cdiv(num_rows, block_m) + num_groups * (2 if gaps else 1)
    item = jnp.arange(num_items, dtype=jnp.int32)
    segment = jnp.searchsorted(items_end, item, side="right").astype(jnp.int32)
    used = segment < seg_lo.shape[0]
    segment = jnp.minimum(segment, seg_lo.shape[0] - 1)
    tile = first_tile[segment] + item - (items_end[segment] - tiles[segment])
    lo = jnp.maximum(seg_lo[segment], tile * block_m)
    hi = jnp.minimum(seg_hi[segment], tile * block_m + block_m)
    return jnp.stack(
        [
            jnp.where(used, tile, 0),
            jnp.where(used, seg_group[segment], NO_ITEM),
            jnp.where(used, lo, 0),
            jnp.where(used, hi, 0),
        ]
    )


def _kernel(
    config: TileConfig,
    transpose_rhs: bool,
    num_items: int,
    meta_in_smem: bool,
    items_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
):
    """Kernel body. GMEM refs: ``items`` (`work_items`' ``[4, num_items]``
    packed by `common.pack_metadata`; copied to SMEM if ``meta_in_smem``),
    ``lhs [m, k]``, ``rhs``, ``out [m, n]``."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    wg_m, wg_n = config.warpgroup_tile
    (_, n), k = out_ref.shape, lhs_ref.shape[1]
    grid_n = pl.cdiv(n, bn)
    rhs_block = (bn, bk) if transpose_rhs else (bk, bn)

    # wgmma takes one swizzle for both operands: the one block_k allows.
    transforms = common.swizzled(bk, lhs_ref.dtype)

    def in_specs(t, j):
        return [
            plgpu.BlockSpec((bm, bk), lambda s: (t, s), transforms=transforms),
            plgpu.BlockSpec(
                rhs_block,
                (lambda s: (j, s)) if transpose_rhs else (lambda s: (s, j)),
                transforms=transforms,
            ),
        ]

    def mma(wg, _, lhs_smem, rhs_smem, acc_ref):
        if config.split == "m":
            lhs_smem = lhs_smem.at[pl.ds(wg * wg_m, wg_m)]
        elif transpose_rhs:
            rhs_smem = rhs_smem.at[pl.ds(wg * wg_n, wg_n)]
        else:
            rhs_smem = rhs_smem.at[:, pl.ds(wg * wg_n, wg_n)]
        plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.T if transpose_rhs else rhs_smem)
        plgpu.wgmma_wait(0)  # this slot is released when the body returns
        return acc_ref

    def work_loop(items, allocations, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_items * grid_n,), collective_axes="sm")
        def _work_item(info):
            item, j = plgpu.planar_snake(info.index[0], (num_items, grid_n), 1, config.band)
            t, group, lo, hi = (
                common.read_metadata(items, num_items, field, item) for field in range(4)
            )
            row0 = t * bm + (wg * wg_m if config.split == "m" else 0)
            col0 = j * bn + (wg * wg_n if config.split == "n" else 0)
            store = functools.partial(
                common.store_rows, out_smem, out_gmem=out_ref, row0=row0, col0=col0, lo=lo, hi=hi
            )

            def compute_context(eval_pipeline):
                def acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    store(acc_ref[...].astype(out_ref.dtype))

                pl.run_scoped(acc_scope, plgpu.ACC((wg_m, wg_n), jnp.float32))

            @pl.when(group >= 0)
            def _():
                common.pipeline(
                    functools.partial(mma, wg),
                    steps=pl.cdiv(k, bk),
                    in_specs=in_specs(t, j),
                    stages=config.stages,
                    compute_context=compute_context,
                )(lhs_ref, rhs_ref.at[group], allocations=allocations)

            @pl.when((group == ZERO_ITEM) & (wg < common.COMPUTE_WGS))
            def _():
                store(jnp.zeros((wg_m, wg_n), out_ref.dtype))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @functools.partial(
        pl.run_scoped,
        allocations=common.pipeline_allocations(
            in_specs(0, 0), config.stages, lhs_ref, rhs_ref.at[0]
        ),
        out_smem=common.epilogue_smem(config.epilogue_rows, out_ref.dtype),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        common.with_metadata(
            functools.partial(work_loop, allocations=allocations, out_smem=out_smem),
            items_ref,
            in_smem=meta_in_smem,
        )


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_starts: jax.Array | None = None,
    transpose_rhs: bool = False,
    out_dtype=None,
    config: TileConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul: rows of group ``e`` of ``lhs`` times ``rhs[e]``.

    Args:
      lhs: ``[m, k]`` bfloat16 or float16.
      rhs: ``[E, k, n]``, or ``[E, n, k]`` with ``transpose_rhs``; lhs's dtype.
      group_sizes: ``[E]`` integer rows per group (>= 0, summing to <= m).
      group_starts: ``[E]`` first row of each group; default: the ragged
        layout ``cumsum(group_sizes) - group_sizes`` (as ``lax.ragged_dot``).
        Groups must be ordered by start and disjoint.
      out_dtype: result dtype (default lhs's); accumulation is float32.
      config: tiles; default `config.gmm_config`; ``stages=None``: as many
        as fit (`config.fit_stages`).
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
        raise ValueError(
            f"gmm: contraction mismatch: lhs {lhs.shape}, rhs {rhs.shape} "
            f"(transpose_rhs={transpose_rhs})"
        )
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"gmm: group_sizes must be [E={num_groups}], got {group_sizes.shape}")
    common.check_features("gmm", k=k, n=n)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    starts, sizes = common.group_starts_or_cumsum(group_sizes, group_starts)
    config = fit_stages(config or gmm_config(m, n, num_groups, lhs.dtype, out_dtype), lhs.dtype)
    steps = pl.cdiv(k, config.block_k)  # no more slots than K steps (but the pipeline's 2)
    config = dataclasses.replace(config, stages=max(2, min(config.stages, steps)))
    lhs_padded = common.pad_rows(lhs)
    items = work_items(
        starts, sizes, lhs_padded.shape[0], config.block_m, gaps=group_starts is not None
    )
    packed = common.pack_metadata(items)
    call = common.launch(
        functools.partial(
            _kernel,
            config,
            transpose_rhs,
            items.shape[1],
            common.metadata_fits(config, lhs.dtype, out_dtype, packed.shape),
        ),
        jax.ShapeDtypeStruct((lhs_padded.shape[0], n), out_dtype),
        name="jmoe_gmm_t" if transpose_rhs else "jmoe_gmm",
        interpret=interpret,
    )
    return call(packed, lhs_padded, rhs)[:m]
