"""The dense MLP the MoE layers are compared with (and the shared expert)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jmoe.config import MoEConfig
from jmoe.experts import MLPWeights, dense_mlp
from jmoe.validation import check_input


class DenseMLP(nnx.Module):
    """Dense FFN with ``w1 [d_model, d_ff]``, ``w3`` (glu), ``w2 [d_ff, d_model]``.

    ``y, aux = layer(x)`` for ``x [..., d_model]``; ``aux`` has the MoE keys
    (zero losses, every token counted in one "expert", nothing dropped), so the
    three FFN kinds are interchangeable in a model.
    ``d_ff`` overrides ``config.d_ff`` (the shared expert uses it).
    """

    def __init__(self, config: MoEConfig, *, d_ff: int | None = None, rngs: nnx.Rngs) -> None:
        self.config = config
        self.mlp = MLPWeights(config, (), d_ff or config.d_ff, rngs=rngs)

    def forward(self, x: jax.Array) -> jax.Array:
        """``[..., d_model]`` -> ``[..., d_model]`` in ``config.dtype``."""
        dtype = self.config.dtype
        return dense_mlp(self.config, x.astype(dtype), self.mlp.weights(dtype))

    def __call__(self, x: ArrayLike) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x [..., d_model]`` (a floating array) -> ``(y [..., d_model], aux)``."""
        check_input(x, self.config)
        aux = {
            "load_balancing_loss": jnp.zeros((), jnp.float32),
            "router_z_loss": jnp.zeros((), jnp.float32),
            "sequence_aux_loss": jnp.zeros((), jnp.float32),
            "tokens_per_expert": jnp.full((1,), x.size // x.shape[-1], jnp.int32),
            "dropped_tokens": jnp.zeros((), jnp.int32),
        }
        return self.forward(x), aux
