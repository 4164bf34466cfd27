"""Lower the Triton kernels for CUDA without a GPU and pull out their Triton IR.

Pallas' Triton backend lowers each ``pallas_call`` to a StableHLO custom call
``__gpu$xla.gpu.triton`` whose ``mhlo.backend_config`` dictionary holds the
kernel ``name``, ``num_warps``, ``num_stages``, ``grid_x/y/z`` and ``ir``: the
Triton-dialect (TTIR) module serialised as MLIR *bytecode* by jaxlib's MLIR
(jax's Pallas Triton ``pallas_call_registration``). XLA compiles that
module at runtime. `lower_for_cuda` (from ``pallas_kernels.cuda_lowering``)
lowers for an A100 or H100 on a CPU machine.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plt

from pallas_kernels.cuda_lowering import (
    DEVICE_KINDS,
    custom_call_configs,
    ir,
    lower_for_cuda,
    triton_ir_context,
)
from pallas_kernels.topology import make_topology
from pallas_kernels.triton.kernels import grouped_matmul, weight_grad

__all__ = [
    "DEFAULT_K",
    "DEFAULT_N",
    "DEVICE_KINDS",
    "VARIANTS",
    "TritonCall",
    "lower_for_cuda",
    "lower_variant",
    "triton_calls",
]

# Feature sizes `lower_variant` uses unless told (register use does not depend on them).
DEFAULT_K, DEFAULT_N = 512, 1024
# The five kernel variants the products launch: name -> (kind, transpose_rhs).
VARIANTS = {
    "sdd": ("sdd", False),
    "sdd_t": ("sdd", True),
    "dsd": ("dsd", False),
    "dsd_t": ("dsd", True),
    "dstd": ("dstd", False),
}


class TritonCall(NamedTuple):
    """One ``__gpu$xla.gpu.triton`` custom call: its launch and its TTIR as text."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def lower_variant(
    variant: str,
    block_size: int,
    dtype,
    *,
    k: int = DEFAULT_K,
    n: int = DEFAULT_N,
    num_experts: int = 8,
    num_rows: int = 2048,
    capability: int = 90,
) -> jax.stages.Lowered:
    """Lowers one `VARIANTS` kernel on a ``num_rows``-assignment layout.

    Operands: ``lhs [P, k]``; ``rhs [E, k, n]`` (``[E, n, k]`` transposed) or,
    for ``dstd``, ``[P, n]`` with an ``[E, k, n]`` result, all in ``dtype``.
    """
    kind, transpose_rhs = VARIANTS[variant]
    topo = make_topology(jnp.zeros((num_experts,), jnp.int32), num_rows, block_size)
    lhs = jax.ShapeDtypeStruct((topo.padded_rows, k), dtype)
    if kind == "dstd":
        rhs = jax.ShapeDtypeStruct((topo.padded_rows, n), dtype)
        fn = lambda a, b, t: weight_grad(a, b, t, dtype, interpret=False)
    else:
        rhs = jax.ShapeDtypeStruct(
            (num_experts, n, k) if transpose_rhs else (num_experts, k, n), dtype
        )
        fn = lambda a, b, t: grouped_matmul(kind, a, b, t, transpose_rhs, interpret=False)
    return lower_for_cuda(fn, lhs, rhs, topo, capability=capability)


def _int(attr: ir.Attribute) -> int:
    return ir.IntegerAttr(attr).value


def triton_calls(lowered: jax.stages.Lowered) -> list[TritonCall]:
    """Every Triton custom call in ``lowered``, its TTIR bytecode printed as text.

    Text, not the bytecode, is what crosses to the ``triton`` wheel: its MLIR
    reads jaxlib's bytecode attributes differently, but parses the text.
    """
    calls = []
    for config in custom_call_configs(lowered, plt.CUSTOM_CALL_TARGET_NAME):
        with triton_ir_context():
            module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
            ttir = module.operation.get_asm(enable_debug_info=False)
        calls.append(
            TritonCall(
                name=ir.StringAttr(config["name"]).value,
                ttir=ttir,
                num_warps=_int(config["num_warps"]),
                num_stages=_int(config["num_stages"]),
                grid=tuple(_int(config[f"grid_{axis}"]) for axis in "xyz"),
            )
        )
    return calls
