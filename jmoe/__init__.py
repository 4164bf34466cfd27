"""jmoe: dropless Mixture-of-Experts layers for JAX (Flax NNX)."""

from jmoe.config import MoEConfig
from jmoe.decoding import generate
from jmoe.dense import DenseMLP
from jmoe.moe import CapacityMoE, DroplessMoE
from jmoe.router import ExpertBias, update_expert_bias

__all__ = [
    "CapacityMoE",
    "DenseMLP",
    "DroplessMoE",
    "ExpertBias",
    "MoEConfig",
    "generate",
    "update_expert_bias",
]
