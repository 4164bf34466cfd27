"""GPU benchmark: every product kernel and the whole dMoE layer, next to dense bf16 GEMMs.

    python -m benchmarks.gpu_bench         # all shapes; triton, mosaic (+ variants), ragged_dot
    python -m benchmarks.gpu_bench --impls mosaic --shapes mixtral olmoe
    python -m benchmarks.gpu_bench --smoke # tiny shapes, impl xla: checks the script on CPU

For each shape and impl it prints, in one run, TFLOP/s of useful work for

* the products: ``sdd`` (``x @ W1``), ``dsd`` (``h @ W2``), ``dsd``ᵀ (``dx =
  dh @ W1ᵀ``) and ``dstd`` (``dW1 = xᵀ dh``), each next to one dense bf16 GEMM
  of the same useful FLOPs (``[T k, K] @ [K, N]``), as ``% dense``;
* the whole `DroplessMoE` layer forward + backward, next to a `DenseMLP` with
  hidden width ``k * d_ff`` (the same useful FLOPs).

Mosaic tile variants (`MOSAIC_VARIANTS`, e.g. ``mosaic-bk32x6``: ``block_k``
32 with 6 stages, next to ``mosaic``'s default ``block_k`` 64 with 4) time
the same products on the same routing by calling the kernels with the
variant's tiles; the layer row is ``mosaic``'s only (a layer cannot be handed
tiles). The first GPU run decides the default (``docs/kernels_mosaic.md``).

Routing is random (each assignment picks a uniform random expert), so groups
are unequal and not multiples of the block size. Results are written as JSON
to ``--out`` (default ``benchmarks/results/``) with the device, jax version and
date. A (shape, impl) pair that fails (e.g. a kernel that does not support a
shape) is reported and skipped, so one run always covers everything else.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.shapes import SHAPES, SMOKE_SHAPES, Shape
from benchmarks.timing import median_seconds
from jmoe import DenseMLP, DroplessMoE, MoEConfig, permutation
from pallas_kernels import products
from pallas_kernels.products import layout_block_size

# impl label -> whether it is the deep (block_k 32, 6 stages) mosaic tile variant.
MOSAIC_VARIANTS = {"mosaic-bk32x6": True}


def random_indices(shape: Shape, seed: int = 0) -> jax.Array:
    """``[tokens, k]`` distinct uniform-random experts per token."""
    rng = np.random.default_rng(seed)
    keys = rng.random((shape.tokens, shape.num_experts))
    return jnp.asarray(np.argsort(keys, axis=1)[:, : shape.top_k], jnp.int32)


@functools.cache
def dense_seconds(m: int, k: int, n: int, dtype, repeats: int) -> float:
    """One ``[m, k] @ [k, n]`` GEMM in ``dtype`` (timed once per process and size)."""
    a = jax.random.normal(jax.random.key(1), (m, k), dtype)
    b = jax.random.normal(jax.random.key(2), (k, n), dtype)
    return median_seconds(jax.jit(lambda a, b: a @ b), a, b, repeats=repeats)


def mosaic_variant(deep: bool):
    """``(sdd, dsd, dstd)`` of the products' signatures on the Mosaic kernels
    with the default or ``deep`` tiles (forward only, as timed here)."""
    from pallas_kernels import mosaic  # loads Mosaic GPU only when asked
    from pallas_kernels.mosaic.config import gmm_config, tgmm_config

    def grouped(lhs, rhs, topo, transpose_rhs=False):
        n = rhs.shape[1 if transpose_rhs else 2]
        config = gmm_config(lhs.shape[0], n, rhs.shape[0], lhs.dtype, lhs.dtype, deep=deep)
        return mosaic.gmm(
            lhs,
            rhs,
            topo.group_sizes,
            group_starts=topo.bin_starts,
            transpose_rhs=transpose_rhs,
            config=config,
        )

    def weight_grad(lhs, grad, topo):
        config = tgmm_config(lhs.shape[1], grad.shape[1], lhs.dtype, lhs.dtype, deep=deep)
        return mosaic.tgmm(lhs, grad, topo.group_sizes, group_starts=topo.bin_starts, config=config)

    return grouped, grouped, weight_grad


def _product_fns(impl: str):
    """``(sdd, dsd, dstd)`` of ``impl`` (a `products` impl or a `MOSAIC_VARIANTS` label)."""
    if impl in MOSAIC_VARIANTS:
        return mosaic_variant(MOSAIC_VARIANTS[impl])
    return tuple(
        functools.partial(fn, impl=impl) for fn in (products.sdd, products.dsd, products.dstd)
    )


def bench_products(shape: Shape, impl: str, dtype, repeats: int):
    """Rows ``(name, seconds, dense_seconds, useful_flops)`` for the four products."""
    sdd, dsd, dstd = _product_fns(impl)
    block = layout_block_size("mosaic" if impl in MOSAIC_VARIANTS else impl, 128)
    dispatch, topo = permutation.dropless_dispatch(random_indices(shape), shape.num_experts, block)
    rows_total = shape.tokens * shape.top_k
    x = permutation.permute(
        jax.random.normal(jax.random.key(0), (shape.tokens, shape.d_model), dtype), dispatch
    )
    h = jax.random.normal(jax.random.key(3), (topo.padded_rows, shape.d_ff), dtype)
    w1 = jax.random.normal(
        jax.random.key(4), (shape.num_experts, shape.d_model, shape.d_ff), dtype
    ) / float(np.sqrt(shape.d_model))
    w2 = jax.random.normal(
        jax.random.key(5), (shape.num_experts, shape.d_ff, shape.d_model), dtype
    ) / float(np.sqrt(shape.d_ff))
    d, f = shape.d_model, shape.d_ff
    cases = [
        ("sdd x@W1", lambda x, h: sdd(x, w1, topo), (rows_total, d, f)),
        ("dsd h@W2", lambda x, h: dsd(h, w2, topo), (rows_total, f, d)),
        ("dsd dh@W1T", lambda x, h: dsd(h, w1, topo, transpose_rhs=True), (rows_total, f, d)),
        ("dstd xT@dh", lambda x, h: dstd(x, h, topo), (d, rows_total, f)),
    ]
    rows = []
    for name, fn, (m, k, n) in cases:
        seconds = median_seconds(jax.jit(fn), x, h, repeats=repeats)
        dense = dense_seconds(m, k, n, dtype, repeats)
        rows.append((name, seconds, dense, 2.0 * m * k * n))
    return rows


def fwd_bwd(layer, x):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(x, params):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y.astype(jnp.float32)) + aux["load_balancing_loss"]

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def bench_layer(shape: Shape, impl: str, dtype, repeats: int):
    """``(seconds, dense_seconds, useful_flops)`` of the layer's forward + backward."""
    config = MoEConfig(
        d_model=shape.d_model,
        d_ff=shape.d_ff,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        expert_type=shape.expert_type,
        dtype=dtype,
        param_dtype=dtype,
        impl=impl,
    )
    x = jax.random.normal(jax.random.key(0), (shape.tokens, shape.d_model), dtype)
    moe, moe_params = fwd_bwd(DroplessMoE(config, rngs=nnx.Rngs(0)), x)
    dense, dense_params = fwd_bwd(
        DenseMLP(config, d_ff=shape.top_k * shape.d_ff, rngs=nnx.Rngs(0)), x
    )
    matmuls = 3 if shape.expert_type == "glu" else 2
    useful = 3 * matmuls * 2.0 * shape.tokens * shape.top_k * shape.d_model * shape.d_ff
    return (
        median_seconds(moe, x, moe_params, repeats=repeats),
        median_seconds(dense, x, dense_params, repeats=repeats),
        useful,
    )


def _fmt_row(shape_name, impl, name, seconds, dense, flops):
    return {
        "shape": shape_name,
        "impl": impl,
        "op": name,
        "ms": seconds * 1e3,
        "tflops": flops / seconds / 1e12,
        "dense_tflops": flops / dense / 1e12,
        "pct_dense": 100.0 * dense / seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=[*products.IMPLS[1:], *MOSAIC_VARIANTS],
        default=["triton", "mosaic", *MOSAIC_VARIANTS, "ragged_dot"],
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes with impl xla (a CPU check of this script)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else {k: SHAPES[k] for k in args.shapes}
    impls = ["xla"] if args.smoke else args.impls
    repeats = 1 if args.smoke else args.repeats
    dtype = jnp.bfloat16

    device = jax.devices()[0]
    header = (
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}, bf16, median of {repeats}"
    )
    print(header)
    print(f"{'shape':<10}{'impl':<15}{'op':<14}{'ms':>9}{'TFLOP/s':>9}{'dense':>9}{'% dense':>9}")
    results = []
    for shape_name, shape in shapes.items():
        for impl in impls:
            try:
                rows = bench_products(shape, impl, dtype, repeats)
                if impl not in MOSAIC_VARIANTS:
                    rows.append(("layer fwd+bwd", *bench_layer(shape, impl, dtype, repeats)))
            except Exception as error:  # noqa: BLE001 - report and go on with the rest
                message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                print(f"{shape_name:<10}{impl:<15}FAILED {message}")
                results.append({"shape": shape_name, "impl": impl, "error": message})
                continue
            for name, seconds, dense, flops in rows:
                row = _fmt_row(shape_name, impl, name, seconds, dense, flops)
                results.append(row)
                print(
                    f"{shape_name:<10}{impl:<15}{name:<14}{row['ms']:>9.2f}"
                    f"{row['tflops']:>9.1f}{row['dense_tflops']:>9.1f}{row['pct_dense']:>8.0f}%"
                )

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_bench_{device.platform}_{datetime.date.today().isoformat()}"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"header": header, "rows": results}, indent=1)
    )
    print(f"wrote {args.out / stem}.json")


if __name__ == "__main__":
    main()
