"""Compile the kernels' Triton IR to PTX and cubin with the ``triton`` wheel, GPU-free.

``triton.compile`` with an explicit ``GPUTarget`` needs no CUDA driver; its
last stage runs the wheel's own ``ptxas``. Starting from a ``.ttir`` file it
skips the TTIR-stage passes, so `compile_call` runs them first (the wheel's
``make_ttir``: inline, canonicalise, combine ``acc + dot`` into the dot, CSE,
...), as XLA's Triton pipeline does. Registers and spills come from
``ptxas -v`` on the PTX Triton emitted (``CompiledKernel.n_regs``/``n_spills``
would need a driver to load the cubin); shared memory from the compiled
kernel's metadata (Triton allocates it dynamically, so ptxas does not see it).
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import tempfile
from typing import NamedTuple

from pallas_kernels.triton.lowering import TritonCall, lower_variant, triton_calls

__all__ = ["Resources", "compile_call", "compile_variant"]


class Resources(NamedTuple):
    """What one compiled kernel uses per CTA / thread."""

    registers: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    tensor_core_op: str  # "wgmma", "mma" or "none": the dot's PTX instruction

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def _ptxas_resources(ptx: str, capability: int, directory: pathlib.Path) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    source = directory / "kernel.ptx"
    source.write_text(ptx)
    log = subprocess.run(
        [
            get_ptxas(capability).path,
            "-v",
            f"--gpu-name={sm_arch_from_capability(capability)}",
            str(source),
            "-o",
            str(directory / "kernel.cubin"),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(registers[1]), int(spills[1]), int(spills[2])


def compile_call(call: TritonCall, capability: int) -> Resources:
    """Compiles ``call``'s TTIR for ``sm_<capability>`` (80 or 90) to PTX and cubin.

    Raises whatever ``triton.compile`` or ``ptxas`` raise on a compile error.
    """
    import triton
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": call.num_warps, "num_stages": call.num_stages}
    backend = make_backend(target)
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        raw = directory / f"{call.name}.raw.ttir"
        raw.write_text(call.ttir)
        context = triton_ir.context()
        triton_ir.load_dialects(context)
        backend.load_dialects(context)
        module = triton_ir.parse_mlir_module(str(raw), context)
        module.context = context
        backend.make_ttir(module, {}, backend.parse_options(options), capability)
        ttir = directory / f"{call.name}.ttir"
        ttir.write_text(str(module))
        kernel = triton.compile(str(ttir), target=target, options=options)
        ptx = kernel.asm["ptx"]
        registers, spill_stores, spill_loads = _ptxas_resources(ptx, capability, directory)
    op = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    return Resources(registers, kernel.metadata.shared, spill_stores, spill_loads, op)


def compile_variant(
    variant: str, block_size: int, dtype, capability: int
) -> tuple[TritonCall, Resources]:
    """Lowers one ``lowering.VARIANTS`` kernel in its default config and compiles it."""
    [call] = triton_calls(lower_variant(variant, block_size, dtype, capability=capability))
    return call, compile_call(call, capability)
