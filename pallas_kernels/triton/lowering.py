"""Lower the Triton kernels for CUDA without a GPU and pull out their Triton IR.

Pallas' Triton backend lowers each ``pallas_call`` to a StableHLO custom call
``__gpu$xla.gpu.triton`` whose ``mhlo.backend_config`` dictionary holds the
kernel ``name``, ``num_warps``, ``num_stages``, ``grid_x/y/z`` and ``ir``: the
Triton-dialect (TTIR) module serialised as MLIR *bytecode* by jaxlib's MLIR
(``jax/_src/pallas/triton/pallas_call_registration.py``). XLA compiles that
module at runtime. Lowering needs a GPU kind to target; on a CPU machine an
abstract device supplies one (``jax.sharding.use_abstract_mesh``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import triton as jax_triton
from jax._src.lib.mlir import ir
from jax.experimental.pallas import triton as plt

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
# Compute capability -> a device kind jax's GPU table maps to it.
DEVICE_KINDS = {80: "NVIDIA A100", 90: "NVIDIA H100"}
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


def lower_for_cuda(fn: Callable, *args, capability: int = 90) -> jax.stages.Lowered:
    """``jax.jit(fn)`` traced on ``args`` and lowered for CUDA sm_``capability``."""
    device = jax.sharding.AbstractDevice(
        device_kind=DEVICE_KINDS[capability], num_cores=None, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


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


@functools.cache
def _triton_context() -> ir.Context:
    context = jax_mlir.make_ir_context()
    jax_triton.dialect.register_dialect(context)
    return context


def _int(attr: ir.Attribute) -> int:
    return ir.IntegerAttr(attr).value


def triton_calls(lowered: jax.stages.Lowered) -> list[TritonCall]:
    """Every Triton custom call in ``lowered``, its TTIR bytecode printed as text.

    Text, not the bytecode, is what crosses to the ``triton`` wheel: its MLIR
    reads jaxlib's bytecode attributes differently, but parses the text.
    """
    calls = []

    def visit(op):
        if (
            op.name == "stablehlo.custom_call"
            and ir.StringAttr(op.attributes["call_target_name"]).value
            == plt.CUSTOM_CALL_TARGET_NAME
        ):
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            with _triton_context():
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
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    return calls
