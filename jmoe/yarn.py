"""YaRN RoPE scaling (arXiv 2309.00071) as Hugging Face transformers computes it
(``rope_type: "yarn"``, used by DeepSeek-V3): per-frequency interpolation
between the original and the ``factor``-stretched wavelengths, and the
attention temperature ``mscale``."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jmoe.config import require


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN parameters (``config.json``'s ``rope_parameters`` / ``rope_scaling``).

    Attributes:
      factor: context extension factor ``s``.
      original_max_position_embeddings: pre-extension context length.
      beta_fast, beta_slow: rotations bounding the interpolation ramp.
      mscale, mscale_all_dim: DeepSeek's temperature knobs: the rotated q and
        k are scaled by ``attention_factor`` (default
        ``mscale(s, mscale) / mscale(s, mscale_all_dim)``, or ``mscale(s)``
        without both), and DeepSeek-V3's softmax scale by
        ``mscale(s, mscale_all_dim)**2`` (`softmax_factor`).
      attention_factor: explicit scale of the rotated q and k (None: derived).
      truncate: round the ramp bounds to whole dims (transformers' default).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        require(self.factor >= 1, f"yarn factor must be >= 1, got {self.factor}")
        require(
            self.original_max_position_embeddings >= 1,
            f"yarn original_max_position_embeddings must be >= 1, "
            f"got {self.original_max_position_embeddings}",
        )

    @property
    def rope_factor(self) -> float:
        """Scale of the rotated queries and keys (transformers' ``attention_scaling``)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _mscale(self.factor, self.mscale) / _mscale(self.factor, self.mscale_all_dim)
        return _mscale(self.factor)

    @property
    def softmax_factor(self) -> float:
        """DeepSeek-V3's extra softmax scale ``mscale(s, mscale_all_dim)**2`` (1 without it)."""
        return _mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0

    def inv_freq(self, dim: int, base: float) -> np.ndarray:
        """``[dim / 2]`` float32 inverse wavelengths of a ``dim``-wide rotation."""
        pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)

        def correction_dim(rotations):
            length = self.original_max_position_embeddings
            return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # share of the original (extrapolated) frequency
        return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)
