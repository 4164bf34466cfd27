"""Tile configurations of the Triton block-sparse kernels: one small table.

Every kernel computes an fp32 accumulator tile of ``rows x cols`` and walks
the contraction in steps of ``depth``:

* ``sdd``: one program per nonzero ``block x block`` output block
  (``rows = cols = block_size``), ``depth`` over ``k``.
* ``dsd``: one program per dense ``block x cols`` output tile, ``depth`` over ``k``.
* ``dstd``: one program per ``rows x cols`` tile of ``out[e]`` (a ``k`` tile by an
  ``n`` tile), ``depth`` over the expert's token rows.

Table values are caps: a tile shrinks to the largest power of two dividing the
feature size it spans (``k`` or ``n``, both multiples of 16), so no feature
dimension needs a mask. 32-bit inputs halve ``depth`` to keep the shared
memory of ``num_stages`` pipelined stages under A100's 164 KiB and H100's 228 KiB
(``stages * (rows + cols) * depth * itemsize``: at most 128 KiB).

====  =====  ===========  ============  ============  =====  ======
kind  block  rows x cols  depth 16-bit  depth 32-bit  warps  stages
====  =====  ===========  ============  ============  =====  ======
sdd   128    128 x 128    64            32            8      3
sdd   64     64 x 64      32            32            4      4
sdd   32     32 x 32      64            32            2      3
dsd   128    128 x 128    64            32            8      3
dsd   64     64 x 128     64            32            4      3
dsd   32     32 x 128     64            32            4      3
dstd  128    128 x 128    64            32            8      3
dstd  64     128 x 128    64            32            8      3
dstd  32     128 x 128    32            32            8      4
====  =====  ===========  ============  ============  =====  ======

128 x 128 fp32 accumulators take 8 warps: with 4, sm_80 needs all 255
registers and spills; ``dstd`` at block 32 spills on sm_80 with 3 stages.
``benchmarks/triton_ptx_report.py`` prints what each entry compiles to
(registers, shared memory, spills) for sm_80 and sm_90.

``dstd``'s ``depth`` (rows per step) never exceeds the block size, so a step
never leaves the expert's bin.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

__all__ = ["BLOCK_SIZES", "DTYPES", "GROUP_ROWS", "KINDS", "TileConfig", "tile_config"]

BLOCK_SIZES = (32, 64, 128)
# Programs visit output tiles in groups of this many tile rows, column by column
# (Triton's grouped ordering), for L2 reuse of lhs row blocks and rhs slabs.
GROUP_ROWS = 8
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KINDS = ("sdd", "dsd", "dstd")


class TileConfig(NamedTuple):
    """Tile sizes (powers of two) and Triton launch parameters of one kernel call."""

    rows: int
    cols: int
    depth: int
    num_warps: int
    num_stages: int


# (kind, block_size) -> (rows cap, cols cap, 16-bit depth, 32-bit depth, warps, stages).
_TABLE = {
    ("sdd", 128): (128, 128, 64, 32, 8, 3),
    ("sdd", 64): (64, 64, 32, 32, 4, 4),
    ("sdd", 32): (32, 32, 64, 32, 2, 3),
    ("dsd", 128): (128, 128, 64, 32, 8, 3),
    ("dsd", 64): (64, 128, 64, 32, 4, 3),
    ("dsd", 32): (32, 128, 64, 32, 4, 3),
    ("dstd", 128): (128, 128, 64, 32, 8, 3),
    ("dstd", 64): (128, 128, 64, 32, 8, 3),
    ("dstd", 32): (128, 128, 32, 32, 8, 4),
}


def _pow2_divisor(size: int, cap: int) -> int:
    """Largest power of two that divides ``size`` and is at most ``cap``."""
    return min(size & -size, cap)


def tile_config(kind: str, block_size: int, dtype, k: int, n: int) -> TileConfig:
    """The tiles of ``kind`` for a ``[P, k]``-by-``k x n`` product (``dstd``: ``[E, k, n]`` out).

    Raises ValueError naming the argument when ``kind``, ``block_size``,
    ``dtype``, ``k`` or ``n`` is unsupported (``k`` and ``n`` must be
    multiples of 16, the smallest Triton dot).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size must be one of {BLOCK_SIZES} for impl='triton', got {block_size}"
        )
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype must be one of {[str(d) for d in DTYPES]} for impl='triton', got {dtype}"
        )
    for name, size in (("k", k), ("n", n)):
        if size < 16 or size % 16:
            raise ValueError(
                f"{kind}: {name} must be a positive multiple of 16 for impl='triton', got {size}"
            )
    rows, cols, depth16, depth32, warps, stages = _TABLE[kind, block_size]
    depth = depth32 if dtype.itemsize == 4 else depth16
    if kind == "dstd":  # out tile spans k x n; depth walks token rows
        return TileConfig(_pow2_divisor(k, rows), _pow2_divisor(n, cols), depth, warps, stages)
    return TileConfig(rows, _pow2_divisor(n, cols), _pow2_divisor(k, depth), warps, stages)
