"""Expert parallelism for the dropless MoE: meshes, state shardings, the shard_map FFN."""

from jmoe.parallel.expert_parallel import expert_parallel_ffn
from jmoe.parallel.mesh import DATA, EXPERT, context_mesh, make_mesh, param_spec, state_shardings
from jmoe.parallel.placement import ExpertSharding

__all__ = [
    "DATA",
    "EXPERT",
    "ExpertSharding",
    "context_mesh",
    "expert_parallel_ffn",
    "make_mesh",
    "param_spec",
    "state_shardings",
]
