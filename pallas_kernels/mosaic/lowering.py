"""Lower the Mosaic GPU kernels for CUDA without a GPU and find them in the module.

Pallas Mosaic GPU lowers each kernel to a StableHLO custom call
``mosaic_gpu_v2`` whose ``mhlo.backend_config`` holds the kernel's Mosaic GPU
module as MLIR bytecode. Lowering runs Mosaic's own checks in Python (layout
inference, the wgmma / TMA / swizzle constraints, and the shared-memory budget,
227 KB when no device reports one); only PTX generation waits for a GPU.
`lower_for_cuda` (from ``pallas_kernels.cuda_lowering``; its default target is
an H100) makes the kernels compile for the GPU, not the interpreter, on a CPU
machine.
"""

from __future__ import annotations

import re

import jax

from pallas_kernels.cuda_lowering import custom_call_configs, ir, lower_for_cuda

__all__ = ["CUSTOM_CALL_TARGET", "kernel_names", "lower_for_cuda"]

CUSTOM_CALL_TARGET = "mosaic_gpu_v2"
_KERNEL_SYMBOL = re.compile(rb"(jmoe_\w+?)_mosaic_gpu")


def kernel_names(lowered: jax.stages.Lowered) -> list[str]:
    """Kernel name of every ``mosaic_gpu_v2`` custom call in ``lowered``, in order."""
    return [
        _KERNEL_SYMBOL.search(ir.StringAttr(config["module"]).value_bytes).group(1).decode()
        for config in custom_call_configs(lowered, CUSTOM_CALL_TARGET)
    ]
