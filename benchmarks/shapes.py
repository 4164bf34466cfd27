"""The benchmark problems, in one place: every GPU benchmark and `gpu_check` read them here."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    """A MoE layer: ``tokens`` tokens of width ``d_model`` routed top-``top_k``
    over ``num_experts`` experts of hidden width ``d_ff``."""

    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    expert_type: str = "mlp"

    @property
    def rows(self) -> int:
        """Assignments (rows of the ragged layout): ``tokens * top_k``."""
        return self.tokens * self.top_k


# MegaBlocks' benchmark problems (T, H, F, E), top-1 as in the paper.
MEGABLOCKS_SHAPES = {
    "mb-xs": Shape(65536, 512, 2048, 64, 1),
    "mb-s": Shape(32768, 768, 3072, 64, 1),
    "mb-m": Shape(8192, 1024, 4096, 64, 1),
    "mb-e4": Shape(8192, 4096, 16384, 4, 1),
}
# The production layers of issue 10's goal (~2048, ~1024 and ~128 rows per expert).
PRODUCTION_SHAPES = {
    "mixtral": Shape(8192, 4096, 14336, 8, 2, "glu"),
    "olmoe": Shape(8192, 2048, 1024, 64, 8, "glu"),
    "deepseek": Shape(4096, 7168, 2048, 256, 8, "glu"),
}
SHAPES = {**MEGABLOCKS_SHAPES, **PRODUCTION_SHAPES}
# CPU checks of the scripts (interpret mode): features multiples of 128 (every kernel's rule).
SMOKE_SHAPES = {"smoke": Shape(64, 128, 128, 4, 2, "glu")}
