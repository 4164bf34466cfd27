"""What the Mosaic GPU kernels share: operand rules, SMEM layouts, where they run.

Operand rules come from the TMA engine as Mosaic GPU drives it: every 2-D
tile lives in shared memory swizzled in 128-byte rows and tiled ``(8, 64)``
(16-bit elements), and the global arrays are viewed through the same tiling.
So the feature dimensions (``k``, ``n``) must be multiples of 64 and the row
count a multiple of 8; rows are padded up to 8 here (a copy, only when needed),
features are checked (every production MoE width is a multiple of 64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["KERNEL_DTYPES", "FEATURE_MULTIPLE", "H100_SMS", "ROW_MULTIPLE", "check_dtypes",
           "check_features", "default_interpret", "group_starts_or_cumsum", "interpret_params",
           "num_programs", "pad_rows", "rows_in", "swizzled"]

# wgmma takes these with float32 accumulation (float32 operands would need tf32).
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FEATURE_MULTIPLE = 64
ROW_MULTIPLE = 8
# Persistent grid when the device does not say: the SM count of an H100 SXM.
H100_SMS = 132
# Simulated SMs under the interpreter: > 1 so that every test exercises the
# persistent loop's striding, small because each one is interpreted in turn.
INTERPRET_PROGRAMS = 3


def _target_device():
    """The device being compiled for: an active abstract mesh's, else the default."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    return abstract if abstract is not None else jax.devices()[0]


def default_interpret() -> bool:
    """Interpret unless compiling for a GPU (the default device, or the abstract
    device of a ``jax.sharding.use_abstract_mesh`` used to lower for CUDA on CPU)."""
    return _target_device().platform != "gpu"


def interpret_params(interpret: bool):
    """``plgpu.kernel``'s ``interpret=``: GPU interpret mode (uninitialized memory
    reads as NaN, out-of-bounds non-TMA reads raise) or compiled."""
    return plgpu.InterpretGPUParams() if interpret else None


def num_programs(interpret: bool) -> int:
    """CTAs of the persistent grid: one per SM (or `INTERPRET_PROGRAMS`)."""
    if interpret:
        return INTERPRET_PROGRAMS
    device = _target_device()
    return getattr(device, "core_count", None) or getattr(device, "num_cores", None) or H100_SMS


def swizzled(minor: int, dtype) -> tuple:
    """SMEM transforms of a tile whose minor dimension holds ``minor`` elements:
    the widest swizzle (128 B for 64 16-bit elements) and its ``(8, ·)`` tiling."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def rows_in(row0, num_rows: int, start, end, shape) -> jax.Array:
    """``shape`` bool (WGMMA layout): rows ``row0 + i`` of a tile that lie in
    ``[start, end)``. Built from a per-row vector (a few registers per thread)
    broadcast along the columns, not a full-tile iota."""
    rows = plgpu.broadcasted_iota(jnp.int32, (num_rows,), 0,
                                  layout=plgpu.Layout.WGMMA.reduce(1)) + row0
    return lax.broadcast_in_dim((rows >= start) & (rows < end), shape, [0])


def check_dtypes(name: str, *arrays):
    if arrays[0].dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: operands must be bfloat16 or float16 (wgmma with float32 "
                         f"accumulation), got {arrays[0].dtype}")
    if any(a.dtype != arrays[0].dtype for a in arrays):
        raise ValueError(f"{name}: operand dtypes differ: {[str(a.dtype) for a in arrays]}")


def check_features(name: str, **sizes: int):
    for arg, size in sizes.items():
        if size <= 0 or size % FEATURE_MULTIPLE:
            raise ValueError(f"{name}: {arg}={size} must be a positive multiple of "
                             f"{FEATURE_MULTIPLE} (128-byte swizzled TMA tiles)")


def pad_rows(x: jax.Array) -> jax.Array:
    """``x [m, ·]`` with zero rows appended up to a multiple of `ROW_MULTIPLE`."""
    extra = -x.shape[0] % ROW_MULTIPLE
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def group_starts_or_cumsum(group_sizes: jax.Array, group_starts: jax.Array | None):
    """``(starts [E], sizes [E])`` int32; ``starts`` defaults to the ragged layout's
    exclusive cumulative sum of ``group_sizes``."""
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be a 1-D integer array, got {group_sizes.dtype}"
                         f"{list(group_sizes.shape)}")
    sizes = group_sizes.astype(jnp.int32)
    if group_starts is None:
        return jnp.cumsum(sizes) - sizes, sizes
    if group_starts.shape != group_sizes.shape:
        raise ValueError(f"group_starts must have the shape of group_sizes {group_sizes.shape}, "
                         f"got {group_starts.shape}")
    return group_starts.astype(jnp.int32), sizes
