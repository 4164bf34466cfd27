"""The Hugging Face fixtures written by scripts/make_hf_fixtures.py (tests only)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmoe.transformer import MoETransformer, TransformerConfig

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hf"
MODEL_TYPES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3")


def expected(name: str) -> dict[str, np.ndarray]:
    """transformers' outputs for fixture ``name`` (``logits_tokens``, ``logits``,
    ``generate_prompt``, ``generated``)."""
    with np.load(FIXTURES / name / "expected.npz") as data:
        return dict(data)


def random_model(config: TransformerConfig, seed: int = 0) -> MoETransformer:
    """A model of ``config`` with numpy-random parameters (std 0.3, norm scales
    around 1): built without jax's initialisers, so it costs no compilation."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    leaves = []
    for path, variable in abstract.flat_state():
        value = rng.normal(0.0, 0.3, variable.shape) + (path[-1] == "scale")
        leaves.append((path, variable.replace(jnp.asarray(value, variable.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
