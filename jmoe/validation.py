"""Input checks shared by the layers: clear errors instead of XLA stack traces."""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

from jmoe.config import MoEConfig


def check_input(x: ArrayLike, config: MoEConfig, mask: ArrayLike | None = None) -> None:
    """Raises ValueError unless ``x`` is a floating ``[..., d_model]`` array and
    ``mask`` None or a bool array of shape ``x.shape[:-1]``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"x must be an array [..., d_model], got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != config.d_model:
        raise ValueError(f"x must have shape [..., d_model={config.d_model}], got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    if mask is not None and (
        getattr(mask, "shape", None) != x.shape[:-1] or getattr(mask, "dtype", None) != jnp.bool_
    ):
        raise ValueError(
            f"mask must be None or a bool array of shape {tuple(x.shape[:-1])} (x's leading "
            f"axes), got {getattr(mask, 'dtype', type(mask).__name__)}"
            f"{list(getattr(mask, 'shape', ()))}"
        )
