"""Lower for CUDA on a machine without a GPU, and read the kernels' custom calls back.

`lower_for_cuda` traces ``jax.jit(fn)`` under an abstract GPU device
(``jax.sharding.use_abstract_mesh``): the kernels see a GPU target, so they compile
for it instead of falling back to their interpreters, and ``lower`` with
``lowering_platforms=("cuda",)`` needs no CUDA backend. `custom_call_configs` lists
the ``mhlo.backend_config`` of every custom call to one target in the lowered module
(where Pallas puts a kernel's name, launch and serialised IR).

`triton_ir_context` is an MLIR context that can parse the Triton kernels' TTIR bytecode.

The one private jax import of the kernels, confined to this module: the Triton dialect
(``jax._src.lib.triton``, jaxlib's ``triton.dialect`` as jax's own Pallas Triton
lowering imports it). Decoding a kernel's TTIR needs that dialect registered in an MLIR
context, and jax 0.11.2 has no public API for it. Everything else here is public: the MLIR
bindings are ``jax.extend.mlir.ir``, jax's MLIR context class and upstream dialects are
in ``jax.extend.lowering``. The kernel backends' lowering modules take ``ir`` and these
helpers from here, so a jax upgrade that moves the dialect breaks one import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax._src.lib import triton as jax_triton  # private: see the module docstring
from jax.extend.lowering import JaxIrContext, upstream_dialects
from jax.extend.mlir import ir

__all__ = [
    "DEVICE_KINDS",
    "custom_call_configs",
    "ir",
    "lower_for_cuda",
    "triton_ir_context",
]

# Compute capability -> a device kind jax's GPU table maps to it.
DEVICE_KINDS = {80: "NVIDIA A100", 90: "NVIDIA H100"}


def lower_for_cuda(fn: Callable, *args, capability: int = 90) -> jax.stages.Lowered:
    """``jax.jit(fn)`` traced on ``args`` (arrays or ``jax.ShapeDtypeStruct``s) and
    lowered for CUDA sm_``capability`` (`DEVICE_KINDS`: an A100 or an H100).

    The abstract device reports no SM count; kernels that size a persistent grid by
    it use their own default (the Mosaic kernels: an H100's 132 SMs).
    """
    if capability not in DEVICE_KINDS:
        raise ValueError(f"capability must be one of {tuple(DEVICE_KINDS)}, got {capability!r}")
    device = jax.sharding.AbstractDevice(
        device_kind=DEVICE_KINDS[capability], num_cores=None, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def custom_call_configs(lowered: jax.stages.Lowered, target: str) -> list[ir.DictAttr]:
    """The ``mhlo.backend_config`` dictionary of every ``stablehlo.custom_call`` to
    ``target`` in ``lowered``'s StableHLO, in program order."""
    configs = []

    def visit(op):
        if (
            op.name == "stablehlo.custom_call"
            and ir.StringAttr(op.attributes["call_target_name"]).value == target
        ):
            configs.append(ir.DictAttr(op.attributes["mhlo.backend_config"]))
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    return configs


@functools.cache
def triton_ir_context() -> ir.Context:
    """An MLIR context with the upstream dialects (``arith``, ``scf``, ...) and Triton's
    (``tt``): what ``ir.Module.parse`` needs to read a Triton kernel's TTIR bytecode."""
    context = JaxIrContext()
    context.append_dialect_registry(upstream_dialects)
    context.load_all_available_dialects()
    jax_triton.dialect.register_dialect(context)
    return context
