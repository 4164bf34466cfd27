"""Registers, shared memory and spills of every Triton kernel config, without a GPU.

Each kernel variant is lowered for CUDA through Pallas (its TTIR is the
custom call's payload), compiled with the ``triton`` wheel for sm_80 (A100)
and sm_90 (H100) to PTX and cubin, and measured with the wheel's ``ptxas -v``
(see ``pallas_kernels/triton/ptx.py``). Exits non-zero if any config spills.

    python -m benchmarks.triton_ptx_report [--capabilities 80 90] [--block-sizes 32 64 128]
        [--dtypes bfloat16 float16 float32] [--variants sdd sdd_t dsd dsd_t dstd]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import jax.numpy as jnp

from pallas_kernels.triton import config
from pallas_kernels.triton.lowering import DEFAULT_K, DEFAULT_N, VARIANTS
from pallas_kernels.triton.ptx import compile_variant

# (header, width) of the table's columns.
COLUMNS = (
    ("kernel", 6),
    ("block", 5),
    ("dtype", 8),
    ("sm", 2),
    ("tile r x c x d", 14),
    ("warps", 5),
    ("stages", 6),
    ("regs", 4),
    ("smem KiB", 8),
    ("spill st/ld B", 13),
    ("mma", 5),
)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument(
        "--block-sizes",
        type=int,
        nargs="+",
        default=list(config.BLOCK_SIZES),
        choices=config.BLOCK_SIZES,
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["bfloat16", "float16", "float32"],
        choices=[d.name for d in config.DTYPES],
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    return parser.parse_args(argv)


def report(capabilities, block_sizes, dtypes, variants):
    """Yields one table row (strings, as `COLUMNS`) and whether it spills, per config."""
    for capability in capabilities:
        for block_size in block_sizes:
            for dtype in dtypes:
                for variant in variants:
                    call, res = compile_variant(variant, block_size, jnp.dtype(dtype), capability)
                    kind = VARIANTS[variant][0]
                    tiles = config.tile_config(kind, block_size, dtype, DEFAULT_K, DEFAULT_N)
                    row = (
                        variant,
                        block_size,
                        dtype,
                        capability,
                        f"{tiles.rows}x{tiles.cols}x{tiles.depth}",
                        call.num_warps,
                        call.num_stages,
                        res.registers,
                        f"{res.shared_bytes / 1024:g}",
                        f"{res.spill_stores}/{res.spill_loads}",
                        res.tensor_core_op,
                    )
                    yield tuple(map(str, row)), res.spills


def main(argv=None) -> int:
    args = _parse(argv)
    warnings.filterwarnings("ignore", "The Pallas Triton backend is deprecated", DeprecationWarning)
    line = lambda cells: " | ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS)).rstrip()
    print(line([header for header, _ in COLUMNS]))
    print(line(["-" * width for _, width in COLUMNS]))
    spilled = 0
    for row, spills in report(args.capabilities, args.block_sizes, args.dtypes, args.variants):
        spilled += spills
        print(line(row), flush=True)
    print(f"{spilled} config(s) spill registers" if spilled else "no register spills")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
