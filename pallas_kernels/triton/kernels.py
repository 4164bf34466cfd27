"""Pallas (Triton backend) block-sparse kernels of the three MoE products.

Layout: ``P = topo.padded_rows`` rows sorted by expert, each expert's bin
padded to ``block_size`` rows (see ``pallas_kernels/topology.py``). Pallas GPU
has no data-dependent grid, so each grid is sized for the worst case
(``topo.num_block_rows`` block rows, all ``E`` experts); the int32 routing
metadata comes in as whole-array operands and each program reads its scalars.

Padding policy: every output element is written by exactly one program, and
programs with nothing to compute (padding block rows) store zeros rather than
leaving the output uninitialised, so no zero-fill pass or input/output alias
is needed. Input rows past ``group_sizes[e]`` inside a bin may hold garbage
(even NaN): ``grouped_matmul`` drops them with a select on its result rows
(row ``i`` of a product only reads row ``i`` of ``lhs``) and ``weight_grad``
masks them to zero in both operands before contracting over rows.

All products accumulate in float32 with ``lax.dot_general`` at default
precision (bf16 / fp16 tensor cores; TF32 for float32 inputs, as XLA's own
GPU matmuls) and cast once on store. When not targeting a GPU (e.g. on a CPU backend) the
same kernels run under ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.topology import Topology
from pallas_kernels.triton.config import GROUP_ROWS, TileConfig, tile_config

__all__ = ["grouped_matmul", "weight_grad"]


def _default_interpret() -> bool:
    """Interpret unless targeting a GPU: the default device's platform, or that of
    the abstract device of an active ``jax.sharding.use_abstract_mesh`` (how
    ``lowering.py`` targets CUDA from a CPU machine)."""
    return not plt.is_gpu_device()


def _dot(a, b, contract_a: int, contract_b: int) -> jax.Array:
    """2-D ``a`` x ``b`` contracting the given axes, accumulated in float32."""
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32
    )


def _compiler_params(tiles: TileConfig) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _grouped_order(index, num_rows: int, num_cols: int):
    """``(row, col)`` of the ``index``-th tile of a ``num_rows x num_cols`` tiling.

    Tiles go in groups of `GROUP_ROWS` rows, column by column inside a group,
    so the programs running at once share a few lhs row blocks and rhs column
    slabs in L2 instead of streaming all of ``rhs`` once per row block.
    """
    per_group = GROUP_ROWS * num_cols
    first_row = lax.div(index, per_group) * GROUP_ROWS  # index >= 0: truncation is floor
    rows_in_group = jnp.minimum(num_rows - first_row, GROUP_ROWS)
    local = lax.rem(index, per_group)
    return first_row + lax.rem(local, rows_in_group), lax.div(local, rows_in_group)


def _grouped_matmul_kernel(
    block_row_expert_ref,
    group_sizes_ref,
    block_offsets_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    block_size: int,
    tiles: TileConfig,
    num_col_tiles: int,
    transpose_rhs: bool,
):
    """One ``[block_size, tiles.cols]`` tile of ``out = lhs[rows_e] @ rhs[e]``.

    Refs: ``block_row_expert [R]``, ``group_sizes [E]``, ``block_offsets [E+1]``
    (int32), ``lhs [P, k]``, ``rhs [E, k, n]`` (``[E, n, k]`` transposed),
    ``out [P, n]``. Programs map to (block row, column tile) in `_grouped_order`.
    """
    num_experts = group_sizes_ref.shape[0]
    block_row, col_tile = _grouped_order(
        pl.program_id(0), block_row_expert_ref.shape[0], num_col_tiles
    )
    rows = pl.ds(block_row * block_size, block_size)
    cols = pl.ds(col_tile * tiles.cols, tiles.cols)
    expert = block_row_expert_ref[block_row]

    @pl.when(expert < num_experts)
    def _compute():
        def step(i, acc):
            depth = pl.ds(i * tiles.depth, tiles.depth)
            a = lhs_ref[rows, depth]
            if transpose_rhs:
                return acc + _dot(a, rhs_ref[expert, cols, depth], 1, 1)
            return acc + _dot(a, rhs_ref[expert, depth, cols], 1, 0)

        k = lhs_ref.shape[1]
        acc = lax.fori_loop(
            0, k // tiles.depth, step, jnp.zeros((block_size, tiles.cols), jnp.float32)
        )
        rank = (block_row - block_offsets_ref[expert]) * block_size + jnp.arange(block_size)
        valid = (rank < group_sizes_ref[expert])[:, None]
        plt.store(out_ref.at[rows, cols], jnp.where(valid, acc, 0.0).astype(out_ref.dtype))

    @pl.when(expert >= num_experts)
    def _padding_block_row():
        plt.store(out_ref.at[rows, cols], jnp.zeros((block_size, tiles.cols), out_ref.dtype))


def grouped_matmul(
    kind: str,
    lhs: jax.Array,
    rhs: jax.Array,
    topo: Topology,
    transpose_rhs: bool,
    *,
    interpret: bool | None = None,
) -> jax.Array:
    """SDD (``kind="sdd"``) or DSD (``kind="dsd"``): ``out[rows_e] = lhs[rows_e] @ rhs[e]``.

    Args:
      kind: ``"sdd"`` tiles the output by its nonzero ``block x block`` blocks;
        ``"dsd"`` by wider dense ``block x cols`` tiles (see ``config.py``).
      lhs: ``[P, k]``.
      rhs: ``[E, k, n]``, or ``[E, n, k]`` with ``transpose_rhs``.
      topo: the layout; ``P == topo.padded_rows``.
      interpret: run the Pallas interpreter; default: unless targeting a GPU.

    Returns:
      ``[P, n]`` in ``lhs.dtype``; zero in rows that hold no assignment.
    """
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles = tile_config(kind, topo.block_size, lhs.dtype, lhs.shape[1], n)
    num_col_tiles = n // tiles.cols
    kernel = functools.partial(
        _grouped_matmul_kernel,
        block_size=topo.block_size,
        tiles=tiles,
        num_col_tiles=num_col_tiles,
        transpose_rhs=transpose_rhs,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((topo.padded_rows, n), lhs.dtype),
        grid=(topo.num_block_rows * num_col_tiles,),
        compiler_params=_compiler_params(tiles),
        interpret=_default_interpret() if interpret is None else interpret,
        name=f"jmoe_{kind}{'_t' if transpose_rhs else ''}",
    )(topo.block_row_expert, topo.group_sizes, topo.expert_block_offsets, lhs, rhs)


def _weight_grad_kernel(
    group_sizes_ref,
    block_offsets_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    block_size: int,
    tiles: TileConfig,
    num_k_tiles: int,
    num_n_tiles: int,
):
    """One ``[tiles.rows, tiles.cols]`` tile of ``out[e] = lhs[rows_e]ᵀ @ rhs[rows_e]``.

    Refs: ``group_sizes [E]``, ``block_offsets [E+1]`` (int32), ``lhs [P, k]``,
    ``rhs [P, n]``, ``out [E, k, n]``. Program ``pid`` owns expert
    ``pid // (num_k_tiles * num_n_tiles)`` and, within it, the (k tile, n tile)
    of `_grouped_order`. The loop walks only the expert's ``group_sizes[e]``
    rows (the transposed, column-sorted view: its bin starts at block row
    ``block_offsets[e]``), so an empty expert stores exact zeros.
    """
    pid = pl.program_id(0)
    tiles_per_expert = num_k_tiles * num_n_tiles
    expert = lax.div(pid, tiles_per_expert)  # pid >= 0: truncation is floor
    k_tile, n_tile = _grouped_order(lax.rem(pid, tiles_per_expert), num_k_tiles, num_n_tiles)
    k_cols = pl.ds(k_tile * tiles.rows, tiles.rows)
    n_cols = pl.ds(n_tile * tiles.cols, tiles.cols)
    first_row = block_offsets_ref[expert] * block_size
    count = group_sizes_ref[expert]

    def step(i, acc):
        rows = pl.ds(first_row + i * tiles.depth, tiles.depth)
        valid = (i * tiles.depth + jnp.arange(tiles.depth) < count)[:, None]
        a = plt.load(
            lhs_ref.at[rows, k_cols],
            mask=jnp.broadcast_to(valid, (tiles.depth, tiles.rows)),
            other=0.0,
        )
        b = plt.load(
            rhs_ref.at[rows, n_cols],
            mask=jnp.broadcast_to(valid, (tiles.depth, tiles.cols)),
            other=0.0,
        )
        return acc + _dot(a, b, 0, 0)

    acc = lax.fori_loop(
        0,
        lax.div(count + tiles.depth - 1, tiles.depth),
        step,
        jnp.zeros((tiles.rows, tiles.cols), jnp.float32),
    )
    plt.store(out_ref.at[expert, k_cols, n_cols], acc.astype(out_ref.dtype))


def weight_grad(
    lhs: jax.Array, rhs: jax.Array, topo: Topology, out_dtype, *, interpret: bool | None = None
) -> jax.Array:
    """DSᵀD / DᵀS: ``out[e] = lhs[rows_e]ᵀ @ rhs[rows_e]``.

    Args:
      lhs: ``[P, k]``; rhs: ``[P, n]`` (same dtype); ``P == topo.padded_rows``.
      out_dtype: dtype of the result.
      interpret: run the Pallas interpreter; default: unless targeting a GPU.

    Returns:
      ``[E, k, n]`` in ``out_dtype``; exact zeros for experts with no rows.
    """
    k, n = lhs.shape[1], rhs.shape[1]
    tiles = tile_config("dstd", topo.block_size, lhs.dtype, k, n)
    num_k_tiles, num_n_tiles = k // tiles.rows, n // tiles.cols
    kernel = functools.partial(
        _weight_grad_kernel,
        block_size=topo.block_size,
        tiles=tiles,
        num_k_tiles=num_k_tiles,
        num_n_tiles=num_n_tiles,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((topo.num_experts, k, n), out_dtype),
        grid=(topo.num_experts * num_k_tiles * num_n_tiles,),
        compiler_params=_compiler_params(tiles),
        interpret=_default_interpret() if interpret is None else interpret,
        name="jmoe_dstd",
    )(topo.group_sizes, topo.expert_block_offsets, lhs, rhs)
