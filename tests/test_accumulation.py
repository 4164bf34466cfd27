"""bfloat16 inputs, long reductions: every impl that claims float32
accumulation returns the exact sum rounded once to bfloat16.

The other bf16 tests sum a few values with tolerances of 1e-2 to 1e-1, which an
implementation that accumulates in bf16 also meets. Here each reduction is long
(hundreds of rows into one weight-gradient entry, d_ff = 512 into one product
output, k = 8 choices into one token) and the inputs are bf16-exact, so the
float64 NumPy value of the same sum is the exact answer, and the check is

    |got - exact| <= 2^-8 |exact| + n 2^-23 sum|terms|

(one round-to-nearest to bf16 is within half an ulp, at most 2^-8 of the value;
the second term is float32 accumulation error over ``n`` terms, far below the
first). Terms of both signs cancel, so a bf16 accumulator, whose error scales
with the partial sums rather than the result, misses it.

Each test also computes, in NumPy, that planted bug: the same sum through a
bf16 accumulator that adds exact float32 partial sums of consecutive chunks
(one chunk per 32-wide tile, as a kernel with a bf16 accumulator would; per
choice for the k-sums), and asserts it breaks the bound by at least 2x: the
tolerance separates the two.

Impls: ``permutation.unpermute`` (the k-sum), the products sdd / dsd (d_ff-long
contraction) and dstd (row sums) with impl ``xla``, ``ragged_dot`` and
``triton`` (interpret mode), ``mosaic`` (gpu-marked: compiled on a GPU by
``scripts/gpu_check.sh``; its interpret mode is too slow for these sizes on
CPU), and the fused CPU path `fused_expert_mlp` (its k-sum over a token's
expert outputs and its ``dw2`` row sums).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_reference as ref
from jmoe import permutation
from pallas_kernels import products
from pallas_kernels.backend import ExpertWeights, RowMap
from pallas_kernels.fused_mlp import fused_expert_mlp
from pallas_kernels.topology import make_topology

CHUNK = 32  # rows (or contraction columns) a planted bf16 accumulator adds at once


def _bf16(a) -> np.ndarray:
    """Round to nearest bfloat16, back as float64."""
    return np.asarray(jnp.asarray(np.asarray(a, np.float32), jnp.bfloat16), np.float64)


def _bound_ratio(got, exact, abs_sum, n: int) -> float:
    """Largest ``|got - exact|`` over the bound of the module docstring."""
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    bound = 2.0**-8 * np.abs(exact) + n * 2.0**-23 * abs_sum + 1e-30
    return float(np.max(np.abs(got - exact) / bound))


def _bf16_accumulated(partials) -> np.ndarray:
    """The planted bug: ``acc = bf16(acc + partial)`` over exact chunk partials."""
    acc = np.zeros_like(partials[0])
    for partial in partials:
        acc = _bf16(acc + partial)
    return acc


def _check(got, exact, abs_sum, n, partials):
    """``got`` meets the bound; the bf16-accumulating variant breaks it by 2x."""
    assert _bound_ratio(got, exact, abs_sum, n) <= 1.0
    assert _bound_ratio(_bf16_accumulated(partials), exact, abs_sum, n) > 2.0


def _normal_bf16(rng, *shape) -> np.ndarray:
    """bf16-exact standard normal values, as float64."""
    return _bf16(rng.standard_normal(shape))


# ------------------------------------------------------------------ unpermute: k = 8


def test_unpermute_sums_k8_choices_in_float32():
    """``unpermute`` with k = 8: catches a bf16 weighted sum (planted by hand
    in ``unpermute``: the einsum with bf16 weights and
    ``preferred_element_type=bf16`` misses the bound by ~1800x, and so does a
    loop adding the k choices in bf16)."""
    tokens, num_experts, top_k, width = 256, 16, 8, 32
    rng = np.random.default_rng(0)
    expert_ids = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]
    dispatch, topo = permutation.dropless_dispatch(
        jnp.asarray(expert_ids, jnp.int32), num_experts, 1
    )
    y = _normal_bf16(rng, topo.padded_rows, width)
    gates = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    got = permutation.unpermute(jnp.asarray(y, jnp.bfloat16), dispatch, jnp.asarray(gates))
    assert got.dtype == jnp.bfloat16
    rows = ref.dropless_rows(expert_ids, num_experts, 1).reshape(tokens, top_k)
    terms = [gates[:, j, None].astype(np.float64) * y[rows[:, j]] for j in range(top_k)]
    _check(got, sum(terms), sum(np.abs(t) for t in terms), top_k, terms)


# ------------------------------------------------------------------ products

GROUP_SIZES = (300, 0, 180, 20)  # rows per expert: hundreds into one dstd entry
NUM_ROWS, BLOCK = 512, 32
D_FF, WIDTH = 512, 32  # the sdd / dsd contraction is d_ff long
MOSAIC_WIDTH = 64  # mosaic needs feature sizes that are multiples of 64


@functools.partial(jax.jit, static_argnames="impl")
def _products(lhs, rhs, rows_a, rows_b, topo, *, impl):
    return (
        products.sdd(lhs, rhs, topo, impl=impl),
        products.dsd(lhs, rhs, topo, impl=impl),
        products.dstd(rows_a, rows_b, topo, impl=impl),
    )


@pytest.mark.parametrize(
    "impl", ["xla", "ragged_dot", "triton", pytest.param("mosaic", marks=pytest.mark.gpu)]
)
def test_products_accumulate_in_float32(impl):
    """sdd / dsd over a 512-long contraction and dstd over up to 300 rows per
    expert, bf16 in and out, against exact sums. Catches a kernel that keeps
    its accumulator in bf16 (the computed variant fails the bound by far)."""
    topo = make_topology(jnp.array(GROUP_SIZES), NUM_ROWS, BLOCK)
    _, valid = ref.layout(GROUP_SIZES, BLOCK, topo.padded_rows)
    rng = np.random.default_rng(1)
    width = MOSAIC_WIDTH if impl == "mosaic" else WIDTH
    rows = lambda width: _normal_bf16(rng, topo.padded_rows, width) * valid[:, None]
    lhs, rows_a, rows_b = rows(D_FF), rows(width), rows(width)
    rhs = _normal_bf16(rng, len(GROUP_SIZES), D_FF, width)
    as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    sdd, dsd, dstd = _products(
        as_bf16(lhs), as_bf16(rhs), as_bf16(rows_a), as_bf16(rows_b), topo, impl=impl
    )

    mm = functools.partial(ref.grouped_matmul, group_sizes=GROUP_SIZES, block_size=BLOCK)
    columns = [slice(c, c + CHUNK) for c in range(0, D_FF, CHUNK)]
    partials = [mm(lhs[:, c], rhs[:, c]) for c in columns]
    for got in (sdd, dsd):
        _check(got, mm(lhs, rhs), mm(np.abs(lhs), np.abs(rhs)), D_FF, partials)

    wg = functools.partial(ref.weight_grad, group_sizes=GROUP_SIZES, block_size=BLOCK)
    chunk_mask = lambda r: (np.arange(topo.padded_rows) // CHUNK == r)[:, None]
    partials = [
        wg(rows_a * chunk_mask(r), rows_b * chunk_mask(r)) for r in range(topo.padded_rows // CHUNK)
    ]
    _check(dstd, wg(rows_a, rows_b), wg(np.abs(rows_a), np.abs(rows_b)), max(GROUP_SIZES), partials)


# ------------------------------------------------------------------ the fused CPU path


@functools.partial(jax.jit, static_argnums=0)
def _fused_and_dw2(num_experts, x, w1, w2, expert_ids, gates, dy):
    """`fused_expert_mlp` with an identity activation: ``(y, dw2)``, bf16."""
    dispatch, topo = permutation.dropless_dispatch(expert_ids, num_experts, 1)
    row_weights = permutation.row_weights(gates, dispatch)
    rows = RowMap(dispatch.row_tokens, row_weights)
    fused = lambda w2: fused_expert_mlp(
        x, rows, topo, ExpertWeights(w1, None, w2), lambda gate, up: gate
    )
    y, vjp = jax.vjp(fused, w2)
    return y, vjp(dy)[0]


@pytest.mark.slow  # ~15 s of XLA compile for the 2048-row fused loop
def test_fused_mlp_sums_in_float32():
    """`fused_expert_mlp` (impl="xla" layer path), 256 tokens each routed to
    all 8 experts: the output's k-sum and ``dw2``'s 256-row sums.

    Inputs are small integers (x, w1, w2 in {-1, 0, 1}, identity activation),
    so every stored bf16 intermediate (gate, expert output) is exact and only
    the sums round; for ``dw2`` the router gates are powers of two, so the
    weighted ``dy`` is exact too. Catches a bf16 ``y`` or weight-gradient
    accumulator (planted by hand: a bf16 ``y`` in the forward loop misses the
    bound by ~700x)."""
    tokens, num_experts, d_model, d_ff = 256, 8, 8, 16
    rng = np.random.default_rng(2)
    small = lambda *shape: rng.integers(-1, 2, shape).astype(np.float64)
    x, w1, w2 = (
        small(tokens, d_model),
        small(num_experts, d_model, d_ff),
        small(num_experts, d_ff, d_model),
    )
    expert_ids = np.argsort(rng.random((tokens, num_experts)), axis=1)  # k = E = 8
    dy = _normal_bf16(rng, tokens, d_model)
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    run = lambda gates: _fused_and_dw2(
        num_experts,
        bf16(x),
        bf16(w1),
        bf16(w2),
        jnp.asarray(expert_ids, jnp.int32),
        jnp.asarray(gates, jnp.float32),
        bf16(dy),
    )

    gates = rng.uniform(0.1, 1.0, (tokens, num_experts)).astype(np.float32)
    y, _ = run(gates)
    assert y.dtype == jnp.bfloat16
    out = np.einsum("td,edf,efo->teo", x, w1, w2)  # [T, E, d] exact integers
    assert np.abs(out).max() < 256  # so bf16-exact
    terms = [
        gates[:, j, None].astype(np.float64) * out[np.arange(tokens), expert_ids[:, j]]
        for j in range(num_experts)
    ]
    _check(y, sum(terms), sum(np.abs(t) for t in terms), num_experts, terms)

    gates = 2.0 ** rng.integers(-2, 2, (tokens, num_experts))
    _, dw2 = run(gates)
    assert dw2.dtype == jnp.bfloat16
    hidden = np.einsum("td,edf->tef", x, w1)  # [T, E, d_ff]
    by_expert = np.empty((tokens, num_experts))
    by_expert[np.arange(tokens)[:, None], expert_ids] = gates
    scaled = by_expert[:, :, None] * dy[:, None, :]  # [T, E, d] exact in bf16
    dw2_of = lambda t: np.einsum("tef,ted->efd", hidden[t], scaled[t])
    abs_sum = np.einsum("tef,ted->efd", np.abs(hidden), np.abs(scaled))
    partials = [dw2_of(slice(c, c + CHUNK)) for c in range(0, tokens, CHUNK)]
    _check(dw2, dw2_of(slice(None)), abs_sum, tokens, partials)
