"""Expert parallelism for the dropless MoE: meshes, state shardings, the shard_map FFN."""

from jmoe.parallel.expert_parallel import expert_parallel_ffn
from jmoe.parallel.mesh import (
    DATA,
    EXPERT,
    FSDP,
    context_mesh,
    make_mesh,
    make_named_mesh,
    param_spec,
    state_shardings,
)
from jmoe.parallel.placement import ExpertSharding

__all__ = [
    "DATA",
    "EXPERT",
    "FSDP",
    "ExpertSharding",
    "context_mesh",
    "expert_parallel_ffn",
    "make_mesh",
    "make_named_mesh",
    "param_spec",
    "state_shardings",
]
