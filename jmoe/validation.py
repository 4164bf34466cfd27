"""Input checks shared by the layers: clear errors instead of XLA stack traces."""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

from jmoe.config import MoEConfig


def check_input(x: ArrayLike, config: MoEConfig) -> None:
    """Raises ValueError unless ``x`` is a floating ``[..., d_model]`` array."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"x must be an array [..., d_model], got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != config.d_model:
        raise ValueError(f"x must have shape [..., d_model={config.d_model}], got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
