"""Tile configurations of the warp-specialized Mosaic GPU grouped GEMMs.

A CTA computes one ``block_m x block_n`` output tile with two consumer
warpgroups, each holding half of it as a float32 accumulator in registers:
split along rows (``split="m"``: ``block_m / 2 x block_n`` each) or columns
(``split="n"``: ``block_m x block_n / 2``). A warpgroup's half is at most
128x128 float32 (128 registers per thread of the 232 a consumer gets when the
producer warpgroup keeps 40), and its sides are multiples of 64 (wgmma
``m64``; 128-byte swizzled operand slices).

Shared memory per CTA (`SMEM_BUDGET`, 227 KB usable of the 228 KB per H100
SM): ``stages * (block_m + block_n) * block_k * in_bytes`` for the pipeline,
the tiled epilogue ``2 warpgroups x 2 slots x epilogue_rows x 128 B`` (32 KB
at the default 64 rows, whatever the output dtype), `RESERVED_BYTES` for the
mbarriers, and the kernels' group metadata when it fits in what is left
(``common.metadata_fits``; else it is read from GMEM). At 256x128 (or
128x256), 16-bit operands:

* ``block_k = 64`` (128-byte swizzle): a stage is 48 KB, 4 stages + epilogue
  = 224 KB; a fifth does not fit (240 KB of stages alone);
* ``block_k = 32`` (64-byte swizzle, the "deep" configs): a stage is 24 KB,
  6 stages + epilogue = 176 KB, leaving ~50 KB for the metadata.

The deep pipeline keeps fewer bytes in flight (144 KB of operands vs 192
KB) in more, smaller steps (two wgmma k-groups of 16 per step instead of
four, so twice the per-step barrier and issue overhead per FLOP) and leaves
room for the metadata. Which is faster is a GPU measurement
(``benchmarks/gpu_bench.py`` and ``gpu_check`` time both: impls ``mosaic``
and ``mosaic-bk32x6``); until then the defaults stay at ``block_k = 64``.
``stages=None`` means as many as fit next to the epilogue, at most
`MAX_STAGES` (`fit_stages`).

The defaults were chosen for three layer shapes (``benchmarks/shapes.py``,
``PRODUCTION_SHAPES``):

* Mixtral (T 8192, d 4096, ffn 14336, E 8, k 2): ~2048 rows per group;
* OLMoE (T 8192, d 2048, ffn 1024, E 64, k 8): ~1024 rows per group;
* DeepSeek-V3-like (T 4096, d 7168, ffn 2048, E 256, k 8): ~128 rows per group.

``gmm`` computes a row tile that meets ``j`` groups ``j`` times (one work item
per (row tile, group), see ``gmm.py``), about one extra row tile per group
boundary: with ``block_m = 256`` +13% tiles for Mixtral, +25% for OLMoE, but
about +200% for 128-row DeepSeek groups. There ``block_m = 128`` (and
``block_n = 256``, split by columns) keeps each warpgroup at 128x128 and the
waste at about +100%. Hence `GMM_LARGE_GROUPS` (256x128, split by rows) from
`LARGE_GROUP_ROWS` rows per group on, `GMM_SMALL_GROUPS` (128x256, split by
columns) below.

``tgmm`` (weight gradients): a 256x128 output tile of ``[k, n]`` per expert,
split by rows, contracting ``block_k`` rows per step. Its cost per expert
does not depend on where group boundaries fall, so one config serves all
shapes.

Every default and deep config lowers for sm_90 within the SMEM budget for the
three shapes (``tests/test_mosaic_lowering.py``); no timing has been taken on
a GPU yet.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = [
    "GMM_LARGE_GROUPS",
    "GMM_LARGE_GROUPS_DEEP",
    "GMM_SMALL_GROUPS",
    "GMM_SMALL_GROUPS_DEEP",
    "LARGE_GROUP_ROWS",
    "MAX_STAGES",
    "RESERVED_BYTES",
    "SMEM_BUDGET",
    "TGMM_DEEP",
    "TGMM_DEFAULT",
    "TileConfig",
    "fit_stages",
    "gmm_config",
    "tgmm_config",
]

SMEM_BUDGET = 227 * 1024  # bytes a CTA may opt into on H100 / H200
# SMEM the kernels keep for mbarriers (pipeline, metadata, tgmm's masking) and
# alignment; measured margin: 4 stages of 48 KB + 32 KB epilogue + 3 KB lower.
RESERVED_BYTES = 1024
MAX_STAGES = 6  # the depth issue 10 asks for; SMEM beyond it goes to metadata
MAX_ACC_ELEMENTS = 128 * 128  # 128 float32 registers per thread of one warpgroup


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiles of one kernel launch.

    Attributes:
      block_m: CTA tile rows: lhs rows per tile (``gmm``) or lhs features per
        tile (``tgmm``, the ``k`` of ``[E, k, n]``).
      block_n: CTA tile columns (output features).
      block_k: contraction per pipeline step: features (``gmm``) or rows
        (``tgmm``): 32, 64 or 128; the operand tiles whose minor dimension
        it is (gmm's lhs and transposed rhs) are swizzled by ``block_k``
        16-bit elements: 64 bytes at 32, 128 bytes from 64 on.
      stages: SMEM slots of the TMA pipeline (>= 2: the producer loads one
        slot while the consumers multiply another); ``None``: as many as fit
        (`fit_stages`).
      band: persistent-grid order: work goes in bands of ``band`` tile
        columns, row by row inside a band, so the CTAs running at once share
        lhs row tiles and weight column tiles in L2.
      split: how the two consumer warpgroups share the CTA tile: ``"m"``
        (each ``block_m / 2`` rows) or ``"n"`` (each ``block_n / 2`` columns).
      epilogue_rows: rows of an epilogue SMEM tile (128 bytes wide); a power
        of two dividing the warpgroup's rows.
    """

    block_m: int
    block_n: int
    block_k: int
    stages: int | None = None
    band: int = 8
    split: str = "m"
    epilogue_rows: int = 64

    def __post_init__(self):
        if self.split not in ("m", "n"):
            raise ValueError(f"split must be 'm' or 'n', got {self.split!r}")
        for name, size in (("block_m", self.block_m), ("block_n", self.block_n)):
            if size <= 0 or size % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {size}")
        wg_m, wg_n = self.warpgroup_tile
        if wg_m % 64 or wg_n % 64:
            raise ValueError(
                f"block_m x block_n = {self.block_m}x{self.block_n} split along "
                f"{self.split} gives {wg_m}x{wg_n} per warpgroup; both must be "
                "multiples of 64"
            )
        if wg_m * wg_n > MAX_ACC_ELEMENTS or wg_n > 256:
            raise ValueError(
                f"block_m x block_n = {self.block_m}x{self.block_n} gives "
                f"{wg_m}x{wg_n} per warpgroup; at most {MAX_ACC_ELEMENTS} float32 "
                "accumulators (128 registers per thread) and 256 columns"
            )
        if self.block_k not in (32, 64, 128):
            raise ValueError(f"block_k must be 32, 64 or 128, got {self.block_k}")
        if self.stages is not None and self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.band < 1:
            raise ValueError(f"band must be >= 1, got {self.band}")
        rows = self.epilogue_rows
        if rows < 8 or rows & (rows - 1) or wg_m % rows:
            raise ValueError(
                f"epilogue_rows must be a power of two >= 8 dividing the "
                f"warpgroup's {wg_m} rows, got {rows}"
            )

    @property
    def warpgroup_tile(self) -> tuple[int, int]:
        """``(rows, columns)`` of one consumer warpgroup's accumulator."""
        if self.split == "m":
            return self.block_m // 2, self.block_n
        return self.block_m, self.block_n // 2

    def stage_bytes(self, in_dtype) -> int:
        """Shared memory of one pipeline slot (an lhs and an rhs tile)."""
        return (self.block_m + self.block_n) * self.block_k * jnp.dtype(in_dtype).itemsize

    @property
    def epilogue_bytes(self) -> int:
        """The tiled epilogue: 2 consumers x 2 slots x ``epilogue_rows`` x 128 B
        (128 bytes wide in any output dtype)."""
        return 2 * 2 * self.epilogue_rows * 128

    def smem_bytes(self, in_dtype, out_dtype) -> int:
        """Shared memory of the pipeline slots and the tiled epilogue (without
        `RESERVED_BYTES` and metadata); ``stages`` must be set."""
        del out_dtype
        if self.stages is None:
            raise ValueError("stages is None: resolve it with config.fit_stages first")
        return self.stages * self.stage_bytes(in_dtype) + self.epilogue_bytes


LARGE_GROUP_ROWS = 1024
GMM_LARGE_GROUPS = TileConfig(block_m=256, block_n=128, block_k=64, split="m")
GMM_SMALL_GROUPS = TileConfig(block_m=128, block_n=256, block_k=64, split="n")
TGMM_DEFAULT = TileConfig(block_m=256, block_n=128, block_k=64, split="m")
# The deep pipeline: half the contraction per step, 6 stages (see the docstring).
GMM_LARGE_GROUPS_DEEP = dataclasses.replace(GMM_LARGE_GROUPS, block_k=32, stages=MAX_STAGES)
GMM_SMALL_GROUPS_DEEP = dataclasses.replace(GMM_SMALL_GROUPS, block_k=32, stages=MAX_STAGES)
TGMM_DEEP = dataclasses.replace(TGMM_DEFAULT, block_k=32, stages=MAX_STAGES)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def fit_stages(config: TileConfig, in_dtype) -> TileConfig:
    """``config`` with ``stages`` set: as given, or (``None``) as many as fit in
    `SMEM_BUDGET` next to the epilogue and `RESERVED_BYTES`, at most
    `MAX_STAGES`."""
    if config.stages is not None:
        return config
    room = SMEM_BUDGET - RESERVED_BYTES - config.epilogue_bytes
    stages = min(MAX_STAGES, room // config.stage_bytes(in_dtype))
    if stages < 2:
        raise ValueError(
            f"config: two {config.block_m}x{config.block_n}x{config.block_k} stages and the "
            f"epilogue exceed the {SMEM_BUDGET}-byte SMEM budget; use smaller tiles"
        )
    return dataclasses.replace(config, stages=stages)


def _fit(config: TileConfig, in_dtype, out_dtype, *, m_extent: int, n_extent: int) -> TileConfig:
    """Shrinks tiles to the problem (keeping each warpgroup's side a multiple
    of 64) and sets (or shrinks) stages to the SMEM budget."""
    split_m = config.split == "m"
    block_m = min(config.block_m, _round_up(m_extent, 128 if split_m else 64))
    block_n = min(config.block_n, _round_up(n_extent, 64 if split_m else 128))
    config = dataclasses.replace(
        config,
        block_m=block_m,
        block_n=block_n,
        epilogue_rows=min(config.epilogue_rows, block_m // 2 if split_m else block_m),
    )
    config = fit_stages(config, in_dtype)
    budget = SMEM_BUDGET - RESERVED_BYTES
    while config.smem_bytes(in_dtype, out_dtype) > budget and config.stages > 2:
        config = dataclasses.replace(config, stages=config.stages - 1)
    return config


def gmm_config(
    m: int, n: int, num_groups: int, in_dtype, out_dtype, *, deep: bool = False
) -> TileConfig:
    """Default tiles of ``gmm`` for ``m`` rows in ``num_groups`` groups, ``n``
    outputs (``deep``: the ``block_k = 32``, 6-stage variant)."""
    large = m >= LARGE_GROUP_ROWS * num_groups
    base = {
        (True, False): GMM_LARGE_GROUPS,
        (False, False): GMM_SMALL_GROUPS,
        (True, True): GMM_LARGE_GROUPS_DEEP,
        (False, True): GMM_SMALL_GROUPS_DEEP,
    }[large, deep]
    return _fit(base, in_dtype, out_dtype, m_extent=m, n_extent=n)


def tgmm_config(k: int, n: int, in_dtype, out_dtype, *, deep: bool = False) -> TileConfig:
    """Default tiles of ``tgmm`` for ``[E, k, n]`` weight gradients (``deep``:
    the ``block_k = 32``, 6-stage variant)."""
    return _fit(TGMM_DEEP if deep else TGMM_DEFAULT, in_dtype, out_dtype, m_extent=k, n_extent=n)
