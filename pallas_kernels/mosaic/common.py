"""What the Mosaic GPU kernels share: operand rules, SMEM layouts, the
warp-specialized launch, the tiled epilogue, where they run.

Operand rules come from the TMA engine as Mosaic GPU drives it: every 2-D
tile lives in shared memory swizzled by its minor dimension (128-byte rows
tiled ``(8, 64)`` for 64 or more 16-bit elements, 64-byte rows tiled
``(8, 32)`` at ``block_k = 32``; `swizzled`), and the global arrays are
viewed through the same tiling.
So the feature dimensions (``k``, ``n``) must be multiples of 64 and the row
count a multiple of 8; rows are padded up to 8 here (a copy, only when needed),
features are checked (every production MoE width is a multiple of 64).

Launch: `NUM_THREADS` warpgroups per CTA (axis ``"wg"``): `COMPUTE_WGS`
consumer warpgroups (indices 0, 1) that issue wgmma and run the epilogue, and
one producer warpgroup (index 2) that only issues TMA loads and keeps
`PRODUCER_REGISTERS` registers per thread, giving the rest to the consumers.

Group metadata (`pack_metadata`, `with_metadata`): the small int32 arrays the
work loop reads per item (gmm's work list, tgmm's group bounds), packed
row-major into ``[rows, META_COLS]``, copied into SMEM once per CTA by one
TMA when they fit next to the pipeline (`metadata_fits`), else read from
GMEM; `read_metadata` reads a value either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.config import RESERVED_BYTES, SMEM_BUDGET, TileConfig

__all__ = [
    "COMPUTE_WGS",
    "KERNEL_DTYPES",
    "FEATURE_MULTIPLE",
    "H100_SMS",
    "ROW_MULTIPLE",
    "check_dtypes",
    "check_features",
    "default_interpret",
    "group_starts_or_cumsum",
    "epilogue_cols",
    "epilogue_smem",
    "launch",
    "metadata_fits",
    "num_programs",
    "pack_metadata",
    "pad_rows",
    "pipeline",
    "pipeline_allocations",
    "read_metadata",
    "store_rows",
    "swizzled",
    "with_metadata",
]

# wgmma takes these with float32 accumulation (float32 operands would need tf32).
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FEATURE_MULTIPLE = 64
ROW_MULTIPLE = 8
# Persistent grid when the device does not say: the SM count of an H100 SXM.
H100_SMS = 132
# Simulated SMs under the interpreter: > 1 so that every test exercises the
# persistent loop's striding, small because each one is interpreted in turn.
INTERPRET_PROGRAMS = 2
COMPUTE_WGS = 2
NUM_THREADS = COMPUTE_WGS + 1
PRODUCER_REGISTERS = 40  # TMA issue only: addresses and loop counters
PRODUCER_WG = COMPUTE_WGS
META_COLS = 64  # int32 per row of packed metadata: one 256-byte TMA box row
META_MAX_ROWS = 256  # a TMA box has at most 256 rows


def _target_device():
    """The device being compiled for: an active abstract mesh's, else the default."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    return abstract if abstract is not None else jax.devices()[0]


def default_interpret() -> bool:
    """Interpret unless compiling for a GPU (the default device, or the abstract
    device of a ``jax.sharding.use_abstract_mesh`` used to lower for CUDA on CPU)."""
    return _target_device().platform != "gpu"


def num_programs(interpret: bool) -> int:
    """CTAs of the persistent grid: one per SM (or `INTERPRET_PROGRAMS`)."""
    if interpret:
        return INTERPRET_PROGRAMS
    device = _target_device()
    return getattr(device, "core_count", None) or getattr(device, "num_cores", None) or H100_SMS


def launch(body, out_type, *, name: str, interpret: bool | None):
    """``plgpu.kernel`` of a persistent warp-specialized kernel: one CTA per SM
    (grid axis ``"sm"``), `NUM_THREADS` warpgroups (axis ``"wg"``), warpgroup
    lowering semantics; GPU interpret mode unless compiling for a GPU."""
    interpret = default_interpret() if interpret is None else interpret
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(num_programs(interpret),),
        grid_names=("sm",),
        num_threads=NUM_THREADS,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name,
    )


def pipeline(body, *, steps, in_specs, stages: int, compute_context=None):
    """The warp-specialized TMA -> SMEM pipeline: the producer warpgroup keeps
    ``stages`` slots of ``in_specs`` tiles in flight, both consumer warpgroups
    run ``body`` on each and release a slot when ``body`` returns (no
    ``delay_release``: JAX 0.11.2's warp-specialized pipeline never releases
    the last delayed slots, so the next work item's loads would race)."""
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(steps,),
        memory_registers=PRODUCER_REGISTERS,
        in_specs=in_specs,
        wg_axis="wg",
        num_compute_wgs=COMPUTE_WGS,
        max_concurrent_steps=stages,
        compute_context=compute_context,
    )


def pipeline_allocations(in_specs, stages: int, *refs):
    """SMEM slots and barriers of `pipeline`, allocated once for the whole
    persistent loop so that work items do not re-allocate (and resynchronise)."""
    ignore = lambda *_, **__: None
    return pipeline(
        ignore, steps=stages, in_specs=in_specs, stages=stages, compute_context=ignore
    ).get_allocations(*refs)


def swizzled(minor: int, dtype) -> tuple:
    """SMEM transforms for ``minor`` elements (a tile's minor dimension, or a
    wgmma's contraction per step): the widest swizzle that many bytes allow
    (128 B for 64 or more 16-bit elements, 64 B for 32) and its ``(8,
    swizzle / itemsize)`` tiling. wgmma needs the same swizzle on both
    operands."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def epilogue_cols(dtype) -> int:
    """Columns of an epilogue tile: one 128-byte row of ``dtype``."""
    return 128 // jnp.dtype(dtype).itemsize


def epilogue_smem(rows: int, dtype):
    """Double-buffered epilogue tiles of every consumer warpgroup:
    ``[COMPUTE_WGS, 2, rows, epilogue_cols]``. Unswizzled, so a partial store
    may start at any row."""
    return plgpu.SMEM((COMPUTE_WGS, 2, rows, epilogue_cols(dtype)), dtype)


def _wait_reads_but(pending):
    """Waits until at most ``pending`` (traced, 0..7: the stores of one
    epilogue tile) TMA stores of this warpgroup still read SMEM; Mosaic GPU's
    ``wait_smem_to_gmem`` takes a static count."""
    for count in range(8):
        pl.when(pending == count)(
            functools.partial(plgpu.wait_smem_to_gmem, count, wait_read_only=True)
        )


def store_rows(out_smem, acc, out_gmem, row0, col0, lo, hi):
    """Tiled, double-buffered epilogue of one consumer warpgroup.

    ``acc [rows, cols]`` (registers, output dtype) goes to ``out_gmem``
    ``[total_rows, total_cols]`` at ``(row0 + i, col0 + c)`` through
    ``epilogue_rows x 128-byte`` SMEM tiles (`epilogue_smem`). Only rows in
    ``[lo, hi)`` and columns below ``total_cols`` are stored. A tile's rows go
    out in at most ``log2(epilogue_rows) + 1`` TMA stores of power-of-two
    heights (a static descriptor each, the binary digits of the row count), so
    a full tile is one store. A slot is rewritten once the stores of the tile
    before it are the only ones that may still read SMEM: one tile's stores
    overlap the next tile's copy out of registers.
    """
    wg = lax.axis_index("wg")
    rows, cols = acc.shape
    tile_rows, tile_cols = out_smem.shape[2:]
    total_cols = out_gmem.shape[1]
    pending = None  # stores issued for the previous tile (the other slot)
    for index, (r0, c0) in enumerate(
        (r, c) for r in range(0, rows, tile_rows) for c in range(0, cols, tile_cols)
    ):
        slot = out_smem.at[wg, index % 2]
        if pending is None:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous work item's
        else:
            _wait_reads_but(pending)
        slot[...] = acc[r0 : r0 + tile_rows, c0 : c0 + tile_cols]
        plgpu.commit_smem()
        top = row0 + r0
        first = jnp.clip(lo - top, 0, tile_rows)
        count = jnp.clip(hi - top, 0, tile_rows) - first
        count = jnp.where(col0 + c0 < total_cols, count, 0)
        pending = jnp.int32(0)
        for bit in reversed(range(tile_rows.bit_length())):
            height = 1 << bit

            @pl.when(count & height != 0)
            def _(first=first, height=height, slot=slot, top=top, c0=c0):
                plgpu.copy_smem_to_gmem(
                    slot.at[pl.ds(first, height)],
                    out_gmem.at[pl.ds(top + first, height), pl.ds(col0 + c0, tile_cols)],
                )

            first = first + (count & height)
            pending = pending + jnp.minimum(count & height, 1)


def check_dtypes(name: str, *arrays):
    if arrays[0].dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"{name}: operands must be bfloat16 or float16 (wgmma with float32 "
            f"accumulation), got {arrays[0].dtype}"
        )
    if any(a.dtype != arrays[0].dtype for a in arrays):
        raise ValueError(f"{name}: operand dtypes differ: {[str(a.dtype) for a in arrays]}")


def check_features(name: str, **sizes: int):
    for arg, size in sizes.items():
        if size <= 0 or size % FEATURE_MULTIPLE:
            raise ValueError(
                f"{name}: {arg}={size} must be a positive multiple of "
                f"{FEATURE_MULTIPLE} (128-byte swizzled TMA tiles)"
            )


def pad_rows(x: jax.Array) -> jax.Array:
    """``x [m, ·]`` with zero rows appended up to a multiple of `ROW_MULTIPLE`."""
    extra = -x.shape[0] % ROW_MULTIPLE
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def group_starts_or_cumsum(group_sizes: jax.Array, group_starts: jax.Array | None):
    """``(starts [E], sizes [E])`` int32; ``starts`` defaults to the ragged layout's
    exclusive cumulative sum of ``group_sizes``."""
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be a 1-D integer array, got {group_sizes.dtype}"
            f"{list(group_sizes.shape)}"
        )
    sizes = group_sizes.astype(jnp.int32)
    if group_starts is None:
        return jnp.cumsum(sizes) - sizes, sizes
    if group_starts.shape != group_sizes.shape:
        raise ValueError(
            f"group_starts must have the shape of group_sizes {group_sizes.shape}, "
            f"got {group_starts.shape}"
        )
    return group_starts.astype(jnp.int32), sizes


def pack_metadata(fields: jax.Array) -> jax.Array:
    """``[F, N] int32`` -> ``[rows, META_COLS]``: row-major, zero padded to a
    multiple of 8 rows (value ``(f, i)`` at flat index ``f * N + i``)."""
    flat = fields.astype(jnp.int32).reshape(-1)
    rows = -(-flat.shape[0] // (8 * META_COLS)) * 8
    return jnp.pad(flat, (0, rows * META_COLS - flat.shape[0])).reshape(rows, META_COLS)


def metadata_fits(config: TileConfig, in_dtype, out_dtype, packed_shape) -> bool:
    """Whether packed metadata of ``packed_shape`` fits in SMEM next to
    ``config``'s pipeline (``stages`` set), epilogue and `RESERVED_BYTES`,
    in one TMA box."""
    rows, cols = packed_shape
    used = config.smem_bytes(in_dtype, out_dtype) + RESERVED_BYTES
    return rows <= META_MAX_ROWS and used + rows * cols * 4 <= SMEM_BUDGET


def read_metadata(meta_ref, num_values: int, field, index):
    """Value ``(field, index)`` of metadata packed by `pack_metadata` from
    ``[F, num_values]``; ``meta_ref`` in SMEM or GMEM."""
    flat = field * num_values + index
    return meta_ref[flat // META_COLS, flat % META_COLS]


def with_metadata(body, packed_gmem, *, in_smem: bool):
    """Runs ``body(meta_ref)`` in every warpgroup: ``meta_ref`` is a copy of
    ``packed_gmem`` in SMEM (one TMA issued by the producer warpgroup, which
    every warpgroup waits for before ``body``), or ``packed_gmem`` itself."""
    if not in_smem:
        return body(packed_gmem)

    def scope(meta_smem, loaded):
        @pl.when(lax.axis_index("wg") == PRODUCER_WG)
        def _():
            plgpu.copy_gmem_to_smem(packed_gmem, meta_smem, loaded)

        plgpu.barrier_wait(loaded)
        body(meta_smem)

    pl.run_scoped(
        scope,
        plgpu.SMEM(packed_gmem.shape, jnp.int32),
        plgpu.Barrier(num_arrivals=1),
        collective_axes="wg",
    )
