"""jmoe: dropless Mixture-of-Experts layers for JAX (Flax NNX)."""

from jmoe.config import MoEConfig
from jmoe.dense import DenseMLP
from jmoe.decoding import generate
from jmoe.moe import CapacityMoE, DroplessMoE

__all__ = ["CapacityMoE", "DenseMLP", "DroplessMoE", "MoEConfig", "generate"]
