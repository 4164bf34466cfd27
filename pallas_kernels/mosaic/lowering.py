"""Lower the Mosaic GPU kernels for CUDA without a GPU and find them in the module.

Pallas Mosaic GPU lowers each kernel to a StableHLO custom call
``mosaic_gpu_v2`` whose ``mhlo.backend_config`` holds the kernel's Mosaic GPU
module as MLIR bytecode. Lowering runs Mosaic's own checks in Python (layout
inference, the wgmma / TMA / swizzle constraints, and the shared-memory budget,
227 KB when no device reports one); only PTX generation waits for a GPU. An
abstract H100 device (``jax.sharding.use_abstract_mesh``) makes the kernels
compile for the GPU, not the interpreter, on a CPU machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
from jax._src.lib.mlir import ir

from pallas_kernels.mosaic.common import H100_SMS

__all__ = ["CUSTOM_CALL_TARGET", "kernel_names", "lower_for_cuda"]

CUSTOM_CALL_TARGET = "mosaic_gpu_v2"
_KERNEL_SYMBOL = re.compile(rb"(jmoe_\w+?)_mosaic_gpu")


def lower_for_cuda(fn: Callable, *args) -> jax.stages.Lowered:
    """``jax.jit(fn)`` traced on ``args`` (arrays or ``jax.ShapeDtypeStruct``s)
    and lowered for CUDA, as on an H100."""
    device = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100", num_cores=H100_SMS, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), (jax.sharding.AxisType.Auto,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def kernel_names(lowered: jax.stages.Lowered) -> list[str]:
    """Kernel name of every ``mosaic_gpu_v2`` custom call in ``lowered``, in order."""
    names = []

    def visit(op):
        if (
            op.name == "stablehlo.custom_call"
            and ir.StringAttr(op.attributes["call_target_name"]).value == CUSTOM_CALL_TARGET
        ):
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            module = ir.StringAttr(config["module"]).value_bytes
            names.append(_KERNEL_SYMBOL.search(module).group(1).decode())
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    return names
