"""Tile configurations of the Mosaic GPU grouped GEMMs and their defaults.

One consumer warpgroup (128 threads) computes a ``block_m x block_n`` float32
accumulator in registers: ``block_m * block_n / 128`` registers per thread, so
at most 128x128 or 64x256 (128 registers). wgmma issues ``m64 n(block_n) k16``
instructions, so ``block_m`` is a multiple of 64 and the widest instruction
(``n256``) needs ``block_n = 256``.

Shared memory per CTA (227 KB usable of the 228 KB per H100 SM):
``stages * (block_m * block_k + block_k * block_n) * in_bytes`` for the
pipeline plus ``block_m * block_n * out_bytes`` for the epilogue tile.

The defaults were chosen for three layer shapes (`BENCHMARK_SHAPES`):

* Mixtral (T 8192, d 4096, ffn 14336, E 8, k 2): ~2048 rows per group;
* OLMoE (T 8192, d 2048, ffn 1024, E 64, k 8): ~1024 rows per group;
* DeepSeek-V3-like (T 4096, d 7168, ffn 2048, E 256, k 8): ~128 rows per group.

``gmm``: a row tile that straddles ``j`` group boundaries is computed ``j + 1``
times (once per group, see ``gmm.py``), about one extra tile per group. With
``block_m = 128`` that is +6% tiles for Mixtral and +12% for OLMoE, but +100%
for 128-row DeepSeek groups; there ``block_m = 64`` halves the waste and
``block_n = 256`` keeps the wgmma at its widest. Hence `GMM_LARGE_GROUPS`
(128x128) from `LARGE_GROUP_ROWS` rows per group on, `GMM_SMALL_GROUPS` (64x256)
below. ``block_k = 64`` is one 128-byte swizzle row of bf16; four stages keep
three TMA loads in flight while one wgmma runs (160-192 KB of SMEM).

``tgmm`` (weight gradients): a 128x128 output tile of ``[k, n]`` per expert,
contracting 64 rows per step, four stages, a float32 epilogue tile: 192 KB.
Its cost per expert does not depend on where group boundaries fall, so one
config serves all three shapes.

Every default lowers for sm_90 within the SMEM budget for the three shapes
(``tests/test_mosaic_lowering.py``); the timings that would refine them are
taken on a GPU by ``benchmarks/gpu_bench.py``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

__all__ = ["BENCHMARK_SHAPES", "GMM_LARGE_GROUPS", "GMM_SMALL_GROUPS", "LARGE_GROUP_ROWS",
           "SMEM_BUDGET", "TGMM_DEFAULT", "LayerShape", "TileConfig", "gmm_config",
           "tgmm_config"]

SMEM_BUDGET = 227 * 1024  # bytes a CTA may opt into on H100 / H200
MAX_ACC_ELEMENTS = 128 * 128  # 128 float32 registers per thread of one warpgroup


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiles of one kernel launch.

    Attributes:
      block_m: accumulator rows: lhs rows per tile (``gmm``) or lhs features
        per tile (``tgmm``, the ``k`` of ``[E, k, n]``); a multiple of 64.
      block_n: accumulator columns (output features); a multiple of 64, <= 256.
      block_k: contraction per pipeline step: features (``gmm``) or rows
        (``tgmm``, whose boundary masking loads tiles in the 64-row WGMMA
        register layout); 64 (one 128-byte swizzle row of 16-bit elements) or 128.
      stages: SMEM buffers of the TMA pipeline (>= 2: one wgmma stays in
        flight while the next stage is consumed).
      band: persistent-grid order: output tiles go in bands of ``band`` tile
        columns, row by row inside a band, so the CTAs running at once share
        lhs row tiles and weight column tiles in L2.
    """

    block_m: int
    block_n: int
    block_k: int
    stages: int
    band: int = 8

    def __post_init__(self):
        if self.block_m <= 0 or self.block_m % 64:
            raise ValueError(f"block_m must be a positive multiple of 64, got {self.block_m}")
        if self.block_n <= 0 or self.block_n % 64 or self.block_n > 256:
            raise ValueError(f"block_n must be 64, 128, 192 or 256, got {self.block_n}")
        if self.block_m * self.block_n > MAX_ACC_ELEMENTS:
            raise ValueError(f"block_m * block_n must be <= {MAX_ACC_ELEMENTS} (one warpgroup's "
                             f"registers), got {self.block_m}x{self.block_n}")
        if self.block_k not in (64, 128):
            raise ValueError(f"block_k must be 64 or 128, got {self.block_k}")
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.band < 1:
            raise ValueError(f"band must be >= 1, got {self.band}")

    def smem_bytes(self, in_dtype, out_dtype) -> int:
        """Shared memory of the pipeline buffers and the epilogue tile."""
        step = (self.block_m + self.block_n) * self.block_k * jnp.dtype(in_dtype).itemsize
        return self.stages * step + self.block_m * self.block_n * jnp.dtype(out_dtype).itemsize


class LayerShape(NamedTuple):
    """A MoE layer: ``tokens`` routed top-``top_k`` over ``num_experts`` experts."""

    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int


BENCHMARK_SHAPES = {
    "mixtral": LayerShape(8192, 4096, 14336, 8, 2),
    "olmoe": LayerShape(8192, 2048, 1024, 64, 8),
    "deepseek": LayerShape(4096, 7168, 2048, 256, 8),
}

LARGE_GROUP_ROWS = 1024
GMM_LARGE_GROUPS = TileConfig(block_m=128, block_n=128, block_k=64, stages=4)
GMM_SMALL_GROUPS = TileConfig(block_m=64, block_n=256, block_k=64, stages=4)
TGMM_DEFAULT = TileConfig(block_m=128, block_n=128, block_k=64, stages=4)


def _fit(config: TileConfig, in_dtype, out_dtype, *, m_extent: int, n_extent: int) -> TileConfig:
    """Shrinks tiles to the problem and stages to the SMEM budget."""
    config = dataclasses.replace(config, block_m=min(config.block_m, m_extent),
                                 block_n=min(config.block_n, n_extent))
    while config.smem_bytes(in_dtype, out_dtype) > SMEM_BUDGET and config.stages > 2:
        config = dataclasses.replace(config, stages=config.stages - 1)
    return config


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def gmm_config(m: int, n: int, num_groups: int, in_dtype, out_dtype) -> TileConfig:
    """Default tiles of ``gmm`` for ``m`` rows in ``num_groups`` groups, ``n`` outputs."""
    base = GMM_LARGE_GROUPS if m >= LARGE_GROUP_ROWS * num_groups else GMM_SMALL_GROUPS
    return _fit(base, in_dtype, out_dtype, m_extent=_round_up(m, 64), n_extent=n)


def tgmm_config(k: int, n: int, in_dtype, out_dtype) -> TileConfig:
    """Default tiles of ``tgmm`` for ``[E, k, n]`` weight gradients."""
    return _fit(TGMM_DEFAULT, in_dtype, out_dtype, m_extent=k, n_extent=n)
