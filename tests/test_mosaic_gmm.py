"""The Mosaic GPU grouped GEMMs, run in GPU interpret mode on CPU, against
``jax.lax.ragged_dot`` and float64 NumPy row loops; through the differentiable
products against impl="xla" and ``pallas_kernels.reference``; and inside a
whole dMoE layer against impl="xla".

Tolerances. Kernel tests compare ``out_dtype=float32`` results: the kernel
accumulates the exact products of bf16/f16 inputs in float32, as ragged_dot
does (NumPy in float64), so only summation order differs: ``rtol=1e-5,
atol=1e-4`` for outputs of size O(10). With bf16 outputs one final rounding
(2^-9 relative) is added: ``rtol=atol=1e-2``. Product and layer tests compare
two bf16 pipelines that accumulate in float32 in different orders, so rounded
bf16 intermediates may differ by an ulp: relative (norm) error < 1e-2.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # races state (no API)
from jax.experimental.pallas import mosaic_gpu as plgpu

from helpers import numpy_reference as ref
from helpers.jaxpr_tools import all_eqns
from helpers.product_harness import products_and_vjps
from jmoe import DroplessMoE, MoEConfig
from pallas_kernels import products, reference
from pallas_kernels.mosaic import BACKEND, TileConfig, common, gmm, tgmm
from pallas_kernels.mosaic.config import GMM_LARGE_GROUPS, TGMM_DEFAULT
from pallas_kernels.mosaic.gmm import NO_ITEM, ZERO_ITEM, work_items
from pallas_kernels.topology import make_topology

# Small tiles so that tiny problems span several row, column, K and epilogue
# tiles: 64x64 per consumer warpgroup, the CTA tile split by rows or columns.
SPLIT_M = TileConfig(
    block_m=128, block_n=64, block_k=64, stages=2, band=2, split="m", epilogue_rows=32
)
SPLIT_N = TileConfig(
    block_m=64, block_n=128, block_k=64, stages=3, band=2, split="n", epilogue_rows=16
)
# The deep pipeline (block_k 32: 64-byte swizzle, 6 stages) on small tiles.
DEEP = TileConfig(
    block_m=128, block_n=64, block_k=32, stages=6, band=2, split="m", epilogue_rows=32
)
GMM_TILES = SPLIT_M
TGMM_TILES = dataclasses.replace(SPLIT_M, stages=3)
F32_TOL = dict(rtol=1e-5, atol=1e-4)
# name -> (m, group sizes); k = 128, n = 128 unless the test says otherwise.
CASES = {
    "random_with_tail": (200, [37, 0, 64, 5, 70, 4]),  # 20 rows past the last group
    "one_group_all_rows": (200, [0, 0, 200, 0]),
    "all_empty": (64, [0, 0, 0, 0]),
    "many_groups_per_tile": (64, [1, 2, 0, 3, 5, 7, 0, 11]),  # 8 groups in one row tile
    "rows_not_multiple_of_8": (203, [100, 3, 0, 99]),  # padded to 208 rows inside
    "one_row": (1, [0, 1, 0]),
}
# Cases run by the fast suite (interpret mode takes seconds per kernel call);
# the others are marked slow.
FAST_CASES = (
    ("random_with_tail", "rhs-m"),
    ("many_groups_per_tile", "rhs_t-n"),
    ("random_with_tail", "m"),
    ("many_groups_per_tile", "n"),
)


def _cases(variants):
    """``(case, variant)`` params: `FAST_CASES`, and (slow) each case once, the variants
    taken in turn, so every case and every variant runs."""
    chosen = {(case, variants[i % len(variants)]) for i, case in enumerate(CASES)}
    return [
        pytest.param(
            case,
            variant,
            id=f"{case}-{variant}",
            marks=() if (case, variant) in FAST_CASES else pytest.mark.slow,
        )
        for case in CASES
        for variant in variants
        if (case, variant) in chosen or (case, variant) in FAST_CASES
    ]


def _operands(m, sizes, k, n, dtype, *, transpose_rhs=False, seed=0):
    """``(lhs [m, k], second operand, valid [m])``; rows past the groups hold NaN/Inf.

    The second operand is ``rhs [E, k, n]`` (``[E, n, k]`` transposed) for gmm,
    ``grad [m, n]`` for tgmm (``transpose_rhs=None``).
    """
    rng = np.random.default_rng(seed)
    valid = np.arange(m) < sum(sizes)
    lhs = rng.standard_normal((m, k))
    lhs[~valid] = np.nan
    if transpose_rhs is None:
        other = rng.standard_normal((m, n))
        other[~valid] = np.inf
    else:
        other = rng.standard_normal((len(sizes), n, k) if transpose_rhs else (len(sizes), k, n))
    return jnp.asarray(lhs, dtype), jnp.asarray(other, dtype), valid


def _numpy(x):
    return np.asarray(x.astype(jnp.float32), np.float64)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("case,variant", _cases(["rhs-m", "rhs_t-n", "rhs_t-m"]))
def test_gmm_matches_ragged_dot_and_numpy(case, variant):
    """``variant``: plain or transposed weights, CTA tile split by rows or
    columns (plain weights on column-split tiles: the default-tile tests)."""
    weights, split = variant.split("-")
    transpose_rhs = weights == "rhs_t"
    m, sizes = CASES[case]
    lhs, rhs, valid = _operands(m, sizes, 128, 128, jnp.bfloat16, transpose_rhs=transpose_rhs)
    group_sizes = jnp.array(sizes, jnp.int32)
    out = jax.jit(
        functools.partial(
            gmm,
            transpose_rhs=transpose_rhs,
            out_dtype=jnp.float32,
            config=SPLIT_M if split == "m" else SPLIT_N,
        )
    )(lhs, rhs, group_sizes)
    chex.assert_shape(out, (m, 128))
    assert out.dtype == jnp.float32
    assert not np.any(np.asarray(out)[~valid]), "rows in no group must be exactly zero"
    expected = ref.grouped_matmul(
        _numpy(jnp.where(valid[:, None], lhs, 0)),
        _numpy(rhs),
        sizes,
        block_size=1,
        transpose_rhs=transpose_rhs,
    )
    chex.assert_trees_all_close(np.asarray(out, np.float64), expected, **F32_TOL)
    weights = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    ragged = jax.lax.ragged_dot(
        jnp.where(valid[:, None], lhs, 0), weights, group_sizes, preferred_element_type=jnp.float32
    )
    chex.assert_trees_all_close(out, ragged, **F32_TOL)


@pytest.mark.parametrize("case,split", _cases(["m", "n"]))
def test_tgmm_matches_ragged_dot_general_and_numpy(case, split):
    m, sizes = CASES[case]
    lhs, grad, valid = _operands(m, sizes, 128, 192, jnp.bfloat16, transpose_rhs=None)
    group_sizes = jnp.array(sizes, jnp.int32)
    config = TGMM_TILES if split == "m" else SPLIT_N
    out = jax.jit(functools.partial(tgmm, out_dtype=jnp.float32, config=config))(
        lhs, grad, group_sizes
    )
    chex.assert_shape(out, (len(sizes), 128, 192))
    for e, size in enumerate(sizes):
        if size == 0:
            assert not np.any(np.asarray(out[e])), f"empty group {e} must give exact zeros"
    masked = [jnp.where(valid[:, None], x, 0) for x in (lhs, grad)]
    expected = ref.weight_grad(*map(_numpy, masked), sizes, block_size=1)
    chex.assert_trees_all_close(np.asarray(out, np.float64), expected, **F32_TOL)
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    ragged = jax.lax.ragged_dot_general(
        *masked, group_sizes, dims, preferred_element_type=jnp.float32
    )
    chex.assert_trees_all_close(out, ragged, **F32_TOL)


@pytest.mark.parametrize("gaps", [False, True], ids=["ragged", "gaps"])
def test_work_items_cover_every_row_once(gaps):
    """The gmm work list: every row lies in exactly one used item, whose group
    is the row's group (or ZERO_ITEM), inside the item's row tile; items are
    in row order and each (tile, segment) pair meets, within the static bound."""
    rng = np.random.default_rng(7)
    block_m, num_rows = 64, 200
    for _ in range(20):
        sizes = rng.integers(0, 40, 6) * (rng.random(6) < 0.8)
        skips = rng.integers(0, 9, 6) if gaps else np.zeros(6, int)
        starts = np.cumsum(skips + np.concatenate([[0], sizes[:-1]]))
        if starts[-1] + sizes[-1] > num_rows:
            continue
        items = np.asarray(
            work_items(
                jnp.asarray(starts, jnp.int32),
                jnp.asarray(sizes, jnp.int32),
                num_rows,
                block_m,
                gaps=gaps,
            )
        )
        assert items.shape == (4, -(-num_rows // block_m) + 6 * (2 if gaps else 1))
        owner = np.full(num_rows, ZERO_ITEM)
        for e, (s, z) in enumerate(zip(starts, sizes)):
            owner[s : s + z] = e
        seen = np.zeros(num_rows, int)
        used = items[:, items[1] != NO_ITEM]
        assert np.all(np.diff(used[2]) >= 0), "items in row order"
        for tile, group, lo, hi in used.T:
            assert tile * block_m <= lo < hi <= min(tile * block_m + block_m, num_rows)
            assert np.all(owner[lo:hi] == group)
            seen[lo:hi] += 1
        np.testing.assert_array_equal(seen, 1)


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)], ids=["bf16", "f16"]
)
def test_low_precision_outputs_and_default_tiles(dtype):
    """Default tile configs, outputs in the input dtype: one final rounding."""
    m, sizes = CASES["random_with_tail"]
    lhs, rhs, valid = _operands(m, sizes, 128, 128, dtype, seed=1)
    group_sizes = jnp.array(sizes, jnp.int32)
    out = gmm(lhs, rhs, group_sizes)
    assert out.dtype == dtype
    expected = ref.grouped_matmul(
        _numpy(jnp.where(valid[:, None], lhs, 0)), _numpy(rhs), sizes, block_size=1
    )
    chex.assert_trees_all_close(_numpy(out), expected, rtol=1e-2, atol=1e-2)
    grad = jnp.where(valid[:, None], jax.random.normal(jax.random.key(2), (m, 64)), 0)
    dw = tgmm(jnp.where(valid[:, None], lhs, 0), grad.astype(dtype), group_sizes)
    assert dw.dtype == dtype
    chex.assert_trees_all_close(
        _numpy(dw),
        ref.weight_grad(
            _numpy(jnp.where(valid[:, None], lhs, 0)),
            _numpy(grad.astype(dtype)),
            sizes,
            block_size=1,
        ),
        rtol=1e-2,
        atol=1e-2,
    )


def test_explicit_group_starts_leave_gaps_zero():
    """Groups with gaps between them (a padded layout): gap rows are ignored / zero."""
    starts, sizes = [0, 72, 80, 160], [70, 0, 33, 9]  # gaps [70, 80), [113, 160), [169, 176)
    m = 176
    valid = np.zeros(m, bool)
    for s, z in zip(starts, sizes):
        valid[s : s + z] = True
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(np.where(valid[:, None], rng.standard_normal((m, 64)), np.nan), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((4, 64, 64)), jnp.bfloat16)
    grad = jnp.asarray(np.where(valid[:, None], rng.standard_normal((m, 64)), np.inf), jnp.bfloat16)
    kw = dict(group_starts=jnp.array(starts), out_dtype=jnp.float32)
    out = gmm(lhs, rhs, jnp.array(sizes), config=GMM_TILES, **kw)
    dw = tgmm(lhs, grad, jnp.array(sizes), config=TGMM_TILES, **kw)
    lhs_f, grad_f, rhs_f = (np.nan_to_num(_numpy(x), posinf=0) for x in (lhs, grad, rhs))
    expected = np.zeros((m, 64))
    expected_dw = np.zeros((4, 64, 64))
    for e, (s, z) in enumerate(zip(starts, sizes)):
        expected[s : s + z] = lhs_f[s : s + z] @ rhs_f[e]
        expected_dw[e] = lhs_f[s : s + z].T @ grad_f[s : s + z]
    assert not np.any(np.asarray(out)[~valid])
    chex.assert_trees_all_close(np.asarray(out, np.float64), expected, **F32_TOL)
    chex.assert_trees_all_close(np.asarray(dw, np.float64), expected_dw, **F32_TOL)


@pytest.mark.parametrize("split", ["m", pytest.param("n", marks=pytest.mark.slow)])
def test_interpreter_finds_no_races(split):
    """The interpreter's happens-before race detector (TMA copies, SMEM reads and
    writes, barriers) on boundary-heavy problems: e.g. rewriting an epilogue
    slot before its TMA stores have read it, a consumer's wgmma reading a tgmm
    boundary tile before the other consumer has masked it, or the producer
    refilling a slot a consumer still reads are reported."""
    m, sizes = CASES["many_groups_per_tile"]
    lhs, rhs, _ = _operands(m, sizes, 128, 128, jnp.bfloat16)
    grad = jnp.ones((m, 64), jnp.bfloat16)
    gmm_tiles, tgmm_tiles = (GMM_TILES, TGMM_TILES) if split == "m" else (SPLIT_N, SPLIT_N)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        jax.block_until_ready(gmm(lhs, rhs, jnp.array(sizes), config=gmm_tiles))
        assert not interpret_pallas_call.get_races().races_found
        jax.block_until_ready(tgmm(lhs, grad, jnp.array(sizes), config=tgmm_tiles))
        assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("kind", ["gmm", "tgmm"])
def test_deep_pipeline_matches_numpy_without_races(kind):
    """block_k = 32 (64-byte swizzled operands, tgmm's boundary masking in the
    8-row SMEM copy layout) with 6 stages, more K steps than stages, a row tile
    shared by 8 groups and NaN/Inf rows past them, under the race detector."""
    m, sizes = CASES["many_groups_per_tile"]
    k, n = 256, 128  # 8 K steps of 32 (gmm); tgmm: up to 2 row blocks per group
    transpose_rhs = None if kind == "tgmm" else True
    lhs, other, valid = _operands(m, sizes, k, n, jnp.bfloat16, transpose_rhs=transpose_rhs)
    masked = _numpy(jnp.where(valid[:, None], lhs, 0))
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        if kind == "gmm":
            out = gmm(
                lhs, other, jnp.array(sizes), transpose_rhs=True, out_dtype=jnp.float32, config=DEEP
            )
            want = ref.grouped_matmul(
                masked, _numpy(other), sizes, block_size=1, transpose_rhs=True
            )
        else:
            out = tgmm(lhs, other, jnp.array(sizes), out_dtype=jnp.float32, config=DEEP)
            grad = _numpy(jnp.where(valid[:, None], other, 0))
            want = ref.weight_grad(masked, grad, sizes, block_size=1)
        jax.block_until_ready(out)
        assert not interpret_pallas_call.get_races().races_found
    chex.assert_trees_all_close(np.asarray(out, np.float64), want, **F32_TOL)


@pytest.mark.slow
def test_metadata_read_from_gmem_when_it_does_not_fit(monkeypatch):
    """The GMEM fallback of the group metadata (taken when the work list does
    not fit next to the pipeline) computes the same results."""
    monkeypatch.setattr(common, "metadata_fits", lambda *_: False)
    m, sizes = CASES["random_with_tail"]
    lhs, rhs, valid = _operands(m, sizes, 128, 128, jnp.bfloat16)
    grad = jnp.where(valid[:, None], jax.random.normal(jax.random.key(4), (m, 64)), 0)
    masked = _numpy(jnp.where(valid[:, None], lhs, 0))
    out = gmm(lhs, rhs, jnp.array(sizes), out_dtype=jnp.float32, config=GMM_TILES)
    dw = tgmm(lhs, grad.astype(jnp.bfloat16), jnp.array(sizes), out_dtype=jnp.float32)
    chex.assert_trees_all_close(
        np.asarray(out, np.float64),
        ref.grouped_matmul(masked, _numpy(rhs), sizes, block_size=1),
        **F32_TOL,
    )
    chex.assert_trees_all_close(
        np.asarray(dw, np.float64),
        ref.weight_grad(masked, _numpy(grad.astype(jnp.bfloat16)), sizes, block_size=1),
        **F32_TOL,
    )


def test_invalid_operands_raise():
    lhs = jnp.zeros((64, 128), jnp.bfloat16)
    sizes = jnp.array([32, 32])
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        gmm(lhs.astype(jnp.float32), jnp.zeros((2, 128, 64)), sizes)
    with pytest.raises(ValueError, match="dtypes differ"):
        tgmm(lhs, jnp.zeros((64, 64), jnp.float16), sizes)
    with pytest.raises(ValueError, match="n=96 must be a positive multiple of 64"):
        gmm(lhs, jnp.zeros((2, 128, 96), jnp.bfloat16), sizes)
    with pytest.raises(ValueError, match="contraction mismatch"):
        gmm(lhs, jnp.zeros((2, 128, 64), jnp.bfloat16), sizes, transpose_rhs=True)
    with pytest.raises(ValueError, match=r"group_sizes must be \[E=2\]"):
        gmm(lhs, jnp.zeros((2, 128, 64), jnp.bfloat16), jnp.array([64]))
    with pytest.raises(ValueError, match="block_m"):  # 128x256 per warpgroup: 256 registers
        TileConfig(block_m=256, block_n=256, block_k=64, stages=3)
    with pytest.raises(ValueError, match="multiples of 64"):  # 32 rows per warpgroup
        TileConfig(block_m=64, block_n=128, block_k=64, stages=3, split="m")
    with pytest.raises(ValueError, match="split"):
        TileConfig(block_m=128, block_n=128, block_k=64, stages=3, split="k")
    with pytest.raises(ValueError, match="epilogue_rows"):
        TileConfig(block_m=128, block_n=128, block_k=64, stages=3, epilogue_rows=48)


# --------------------------------------------------------------------------- products


def _mosaic_kernels(fn, *args) -> list[str]:
    """Names of the Mosaic GPU kernels ``fn(*args)`` launches (from its jaxpr)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.params["name"] for e in all_eqns(jaxpr) if e.primitive.name == "mpmd_map"]


_products_and_vjps = jax.jit(products_and_vjps, static_argnames=("impl", "transpose_rhs"))


@pytest.mark.parametrize(
    "block_size,transpose_rhs",
    [
        (1, False),
        pytest.param(1, True, marks=pytest.mark.slow),
        pytest.param(16, False, marks=pytest.mark.slow),
    ],
)
def test_products_and_gradients_match_xla(block_size, transpose_rhs):
    """Block size 1 is the layout jmoe hands impl="mosaic"; 16 a hand-built padded
    one (rows between groups are ignored / zero). Rows outside groups hold garbage."""
    assert products.layout_block_size("mosaic", 128) == BACKEND.layout_block_size(64) == 1
    sizes, k, n = [45, 0, 70, 9], 64, 128
    topo = make_topology(jnp.array(sizes), 130, block_size)
    valid = np.asarray(topo.row_is_valid())
    rng = np.random.default_rng(4)

    def rows(width):
        x = rng.standard_normal((topo.padded_rows, width))
        x[~valid] = rng.uniform(-1e3, 1e3, ((~valid).sum(), width))
        return jnp.asarray(x, jnp.bfloat16)

    w_shape = (4, n, k) if transpose_rhs else (4, k, n)
    a = dict(
        x=rows(k),
        h=rows(k),
        b=rows(n),
        dy=rows(n),
        w=jnp.asarray(rng.standard_normal(w_shape) / 8, jnp.bfloat16),
        g=jnp.asarray(rng.standard_normal((4, k, n)) / 8, jnp.bfloat16),
    )
    got = _products_and_vjps(topo, a, impl="mosaic", transpose_rhs=transpose_rhs)
    want = _products_and_vjps(topo, a, impl="xla", transpose_rhs=transpose_rhs)
    for name in got:
        for i, (g, w) in enumerate(zip(got[name], want[name])):
            assert g.dtype == w.dtype == jnp.bfloat16, (name, i)
            assert _rel_err(_numpy(g), _numpy(w)) < 1e-2, (name, i)
    # Independent of impl="xla": the dense reference products, and the contract.
    y_ref = reference.grouped_matmul(a["x"], a["w"], topo, transpose_rhs)
    assert _rel_err(_numpy(got["sdd"][0]), _numpy(y_ref)) < 1e-2
    dw_ref = reference.grouped_weight_grad(a["h"], a["b"], topo)
    assert _rel_err(_numpy(got["dstd"][0]), np.asarray(dw_ref)) < 1e-2
    for name, index in (("sdd", 0), ("sdd", 1), ("dsd", 0), ("dsd", 1), ("dstd", 1), ("dstd", 2)):
        assert not np.any(_numpy(got[name][index])[~valid]), (name, index)
    for name, index in (("sdd", 2), ("dsd", 2), ("dstd", 0)):
        assert not np.any(_numpy(got[name][index])[1]), f"{name}: empty expert not zero"
    kernels = _mosaic_kernels(
        functools.partial(_products_and_vjps, impl="mosaic", transpose_rhs=transpose_rhs), topo, a
    )
    assert sorted(set(kernels)) == ["jmoe_gmm", "jmoe_gmm_t", "jmoe_tgmm"]


def test_float32_products_fall_back_to_xla():
    """wgmma would need tf32 for float32: impl="mosaic" computes float32 with the
    impl="xla" kernels instead (bit-identical results, no Mosaic kernel).

    The bitwise equality is a regression guard (both sides run the same xla
    function; it catches the fallback being dropped or changed); what checks
    the values is the comparison with the float64 NumPy loops below."""
    topo = make_topology(jnp.array([10, 0, 20, 2]), 40, 1)
    x = jax.random.normal(jax.random.key(0), (topo.padded_rows, 64))
    w = jax.random.normal(jax.random.key(1), (4, 64, 64))
    fn = lambda impl: (
        lambda x, w: (products.sdd(x, w, topo, impl=impl), products.dstd(x, x, topo, impl=impl))
    )
    got = jax.jit(fn("mosaic"))(x, w)
    chex.assert_trees_all_equal(got, jax.jit(fn("xla"))(x, w))
    assert _mosaic_kernels(fn("mosaic"), x, w) == []
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    sizes = (10, 0, 20, 2)
    chex.assert_trees_all_close(
        got,
        (ref.grouped_matmul(x64, w64, sizes, 1), ref.weight_grad(x64, x64, sizes, 1)),
        rtol=1e-5,
        atol=1e-4,
    )


# --------------------------------------------------------------------------- layer


def _layer_step(impl, x):
    """``(y, grads of (params, x), Mosaic kernels launched)`` of a bf16 GeLU dMoE
    layer with ``impl`` (tests/test_mosaic_lowering.py lowers the SwiGLU one)."""
    cfg = MoEConfig(
        d_model=64,
        d_ff=128,
        num_experts=4,
        top_k=2,
        expert_type="mlp",
        impl=impl,
        dtype=jnp.bfloat16,
    )
    graphdef, params = nnx.split(DroplessMoE(cfg, rngs=nnx.Rngs(0)))

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux["load_balancing_loss"], y

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), grads = jax.jit(step)(params, x)
    return y, grads, _mosaic_kernels(step, params, x)


@pytest.mark.slow
def test_dropless_layer_forward_backward_matches_xla():
    """21 tokens x top-2 = 42 rows (not a multiple of 8: the row-padding path).
    Kernels: forward x@W1, act@W2; backward dy@W2ᵀ, dh@W1ᵀ and two tgmm."""
    x = jax.random.normal(jax.random.key(5), (3, 7, 64))
    y, grads, kernels = _layer_step("mosaic", x)
    y_xla, grads_xla, no_kernels = _layer_step("xla", x)
    assert sorted(kernels) == ["jmoe_gmm"] * 2 + ["jmoe_gmm_t"] * 2 + ["jmoe_tgmm"] * 2
    assert no_kernels == []
    assert _rel_err(_numpy(y), _numpy(y_xla)) < 1e-2
    for path, g, g_xla in zip(
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree.leaves(grads),
        jax.tree.leaves(grads_xla),
    ):
        assert np.all(np.isfinite(_numpy(g))), path[0]
        assert _rel_err(_numpy(g), _numpy(g_xla)) < 1e-2, path[0]


@pytest.mark.slow
def test_production_tiles_match_numpy():
    """The 256x128 production tiles (128x128 per consumer warpgroup, 4 stages,
    two 64-row epilogue tiles per consumer) in interpret mode, with a group
    boundary inside a row tile, an empty group and NaN/Inf rows past the groups."""
    sizes, m, k, n = [300, 0, 190, 10], 520, 256, 256
    lhs, rhs, valid = _operands(m, sizes, k, n, jnp.bfloat16, seed=9)
    grad = jnp.asarray(
        np.where(valid[:, None], np.random.default_rng(9).standard_normal((m, n)), np.inf),
        jnp.bfloat16,
    )
    out = gmm(lhs, rhs, jnp.array(sizes), out_dtype=jnp.float32, config=GMM_LARGE_GROUPS)
    dw = tgmm(lhs, grad, jnp.array(sizes), out_dtype=jnp.float32, config=TGMM_DEFAULT)
    masked = [_numpy(jnp.where(valid[:, None], x, 0)) for x in (lhs, grad)]
    chex.assert_trees_all_close(
        np.asarray(out, np.float64),
        ref.grouped_matmul(masked[0], _numpy(rhs), sizes, block_size=1),
        **F32_TOL,
    )
    chex.assert_trees_all_close(
        np.asarray(dw, np.float64), ref.weight_grad(*masked, sizes, block_size=1), **F32_TOL
    )
    assert not np.any(np.asarray(dw[1])), "empty group must give exact zeros"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))  # even: rhs [E, k, n]; odd: transposed
def test_random_sweep_default_tiles(seed):
    """Larger random problems with the default tiles (many groups per tile, long K)."""
    rng = np.random.default_rng(seed)
    num_groups, m, k, n = 8, 1000, 256, 384
    cuts = np.sort(rng.integers(0, m - 17, num_groups - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [m - 17]])).tolist()
    lhs, rhs, valid = _operands(
        m, sizes, k, n, jnp.bfloat16, transpose_rhs=bool(seed % 2), seed=seed
    )
    out = gmm(lhs, rhs, jnp.array(sizes), transpose_rhs=bool(seed % 2), out_dtype=jnp.float32)
    chex.assert_trees_all_close(
        np.asarray(out, np.float64),
        ref.grouped_matmul(
            _numpy(jnp.where(valid[:, None], lhs, 0)),
            _numpy(rhs),
            sizes,
            block_size=1,
            transpose_rhs=bool(seed % 2),
        ),
        **F32_TOL,
    )
    grad = jnp.where(valid[:, None], jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16), 0)
    dw = tgmm(jnp.where(valid[:, None], lhs, 0), grad, jnp.array(sizes), out_dtype=jnp.float32)
    chex.assert_trees_all_close(
        np.asarray(dw, np.float64),
        ref.weight_grad(
            _numpy(jnp.where(valid[:, None], lhs, 0)), _numpy(grad), sizes, block_size=1
        ),
        **F32_TOL,
    )
