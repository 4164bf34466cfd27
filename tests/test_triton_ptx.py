"""The Triton IR of every default kernel config compiles with the ``triton`` wheel
to PTX and cubin for A100 (sm_80) and H100 (sm_90), on tensor cores, without
register spills. No GPU needed."""

import jax.numpy as jnp
import pytest

pytest.importorskip("triton")

from benchmarks import triton_ptx_report  # noqa: E402
from pallas_kernels.triton import config  # noqa: E402
from pallas_kernels.triton.lowering import DEFAULT_K, DEFAULT_N, VARIANTS  # noqa: E402
from pallas_kernels.triton.ptx import compile_variant  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)
# float16 shares bfloat16's tiles; its sweep runs with -m slow.
DTYPES = [jnp.bfloat16, jnp.float32, pytest.param(jnp.float16, marks=pytest.mark.slow)]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("block_size", config.BLOCK_SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_default_config_compiles_without_spills(variant, block_size, dtype, capability):
    call, res = compile_variant(variant, block_size, dtype, capability)
    assert not res.spills, f"{call.name} spills: {res}"
    assert 0 < res.registers <= 255
    smem_limit = {80: 163 * 1024, 90: 227 * 1024}[capability]
    assert 0 < res.shared_bytes <= smem_limit
    # The dot runs on tensor cores; Hopper's wgmma needs >= 64-row tiles.
    tiles = config.tile_config(VARIANTS[variant][0], block_size, dtype, DEFAULT_K, DEFAULT_N)
    expected = "wgmma" if capability == 90 and tiles.rows >= 64 else "mma"
    assert res.tensor_core_op == expected


def test_report_script_prints_a_row_per_config(capsys):
    status = triton_ptx_report.main(
        [
            "--capabilities",
            "90",
            "--block-sizes",
            "64",
            "--dtypes",
            "bfloat16",
            "--variants",
            "sdd",
            "dstd",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and lines[-1] == "no register spills"
    rows = [line.split(" | ") for line in lines[2:-1]]
    assert [(row[0].strip(), row[3].strip()) for row in rows] == [("sdd", "90"), ("dstd", "90")]
