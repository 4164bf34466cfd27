"""The measured rows of `benchmarks.gpu_check`: one process per step, one row per (shape, impl, op).

    python -m benchmarks.gpu_kernels kernels --shapes olmoe [--impls ...] [--smoke]
    python -m benchmarks.gpu_kernels layer --shapes olmoe deepseek mixtral
    python -m benchmarks.gpu_kernels extra --shapes olmoe deepseek mixtral

Rows go to ``$JMOE_GPU_CHECK_ROWS`` (`benchmarks.gpu_rows`) as each is measured; a
failure is caught and recorded per (shape, impl, op), so it costs only that row.

* ``kernels``: ``gmm`` (``x [m, d] @ w[e] [d, f]``, jmoe's ``sdd``) and ``tgmm``
  (``x[rows]ᵀ dy[rows] -> [E, d, f]``, jmoe's ``dstd``) for `KERNEL_IMPLS`;
* ``layer``: the `DroplessMoE` forward + backward (``impl="auto"``) next to a
  `DenseMLP` of hidden width ``top_k * d_ff`` (the same useful FLOPs);
* ``extra``: the same two ops for `EXTRA_IMPLS` (those importable here).

Each op is timed next to one dense bfloat16 GEMM of the same useful FLOPs
(`TIMING_METHOD`), and checked against `expert_dots` (per-expert dense dots in
float32: never the dense-expanded weight-gradient ``ragged_dot``). ``lax.ragged_dot``
rows also record how XLA lowered it (`lowering`); its weight-gradient form runs only
where XLA's dense expansion (``[E, m, d]``) fits in `EXPANSION_LIMIT_BYTES`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import gpu_bench
from benchmarks.gpu_rows import RowWriter
from benchmarks.peers import available_peers
from benchmarks.shapes import SHAPES, SMOKE_SHAPES, Shape
from benchmarks.timing import interleaved_median_seconds
from jmoe import DenseMLP, DroplessMoE, MoEConfig, permutation
from pallas_kernels import products

DTYPE = jnp.bfloat16
KERNEL_IMPLS = ("mosaic", *gpu_bench.MOSAIC_VARIANTS, "ragged_dot_mgpu", "lax.ragged_dot")
EXTRA_IMPLS = ("triton", "tokamax")
OPS = ("gmm", "tgmm")
# XLA's weight-gradient ragged_dot allocates [E, m, d]; beyond this it is not run.
EXPANSION_LIMIT_BYTES = 4 << 30
RAGGED_DOT_FUSION_FLAG = "xla_gpu_experimental_use_ragged_dot_fusion"
TIMING_METHOD = (
    "interleaved: each sample is the mean of {calls} back-to-back calls after one "
    "untimed call, the kernel's and the equal-FLOPs dense bfloat16 GEMM's samples "
    "alternate; median of {samples} samples each"
)


def _layout_block(impl: str) -> int:
    """Row alignment of the layout ``impl`` computes on (1: the ragged layout)."""
    return products.layout_block_size(impl, 128) if impl == "triton" else 1


def _impl_fns(impl: str):
    """``(gmm(x, w, topo), tgmm(x, dy, topo) or None)`` of ``impl``."""
    if impl in ("mosaic", *gpu_bench.MOSAIC_VARIANTS):
        sdd, _, dstd = gpu_bench.mosaic_variant(gpu_bench.MOSAIC_VARIANTS.get(impl, False))
        return sdd, dstd
    if impl == "triton":
        return (
            lambda x, w, topo: products.sdd(x, w, topo, impl="triton"),
            lambda x, dy, topo: products.dstd(x, dy, topo, impl="triton"),
        )
    if impl == "lax.ragged_dot":
        gmm = lambda x, w, topo: jax.lax.ragged_dot(x, w, topo.group_sizes)
        tgmm = lambda x, dy, topo: _ragged_dot_weight_grad(x, dy, topo.group_sizes)
        return gmm, tgmm
    peer = available_peers()[impl]
    tgmm = peer.tgmm and (lambda x, dy, topo: peer.tgmm(x, dy, topo.group_sizes))
    return (lambda x, w, topo: peer.gmm(x, w, topo.group_sizes)), tgmm


def _ragged_dot_weight_grad(x, dy, group_sizes):
    """The weight gradient of ``lax.ragged_dot`` (its ragged-contracting form)."""
    num_groups = group_sizes.shape[0]
    w = jnp.zeros((num_groups, x.shape[1], dy.shape[1]), x.dtype)
    _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(x, w, group_sizes), w)
    return vjp(dy)[0]


class Problem:
    """Random operands of ``shape`` on the layout of ``block``-row bins (1: ragged),
    random top-k routing, and the per-expert row indices of the references."""

    def __init__(self, shape: Shape, block: int):
        indices = gpu_bench.random_indices(shape)
        _, self.topo = permutation.dropless_dispatch(indices, shape.num_experts, block)
        rows, d, f = self.topo.padded_rows, shape.d_model, shape.d_ff
        keys = jax.random.split(jax.random.key(0), 3)
        self.x = jax.random.normal(keys[0], (rows, d), DTYPE)
        self.dy = jax.random.normal(keys[1], (rows, f), DTYPE)
        self.w = (jax.random.normal(keys[2], (shape.num_experts, d, f)) / np.sqrt(d)).astype(DTYPE)
        sizes = np.asarray(self.topo.group_sizes)
        starts = np.asarray(self.topo.bin_starts)
        width = max(8, -(-int(sizes.max()) // 8) * 8)
        offsets = np.arange(width)[None, :]
        self.valid = jnp.asarray(offsets < sizes[:, None])  # [E, Z]
        self.index = jnp.asarray(np.where(offsets < sizes[:, None], starts[:, None] + offsets, 0))
        self.useful_flops = 2.0 * shape.rows * d * f
        self.expansion_bytes = shape.num_experts * shape.rows * d * jnp.dtype(DTYPE).itemsize

    def grouped(self, rows: jax.Array) -> jax.Array:
        """``[rows, n] -> [E, Z, n]``: each expert's rows, zero past its group."""
        return jnp.where(self.valid[..., None], rows[self.index], 0).astype(jnp.float32)

    def expert_dots(self, op: str) -> jax.Array:
        """The reference: ``gmm`` as ``[E, Z, f]`` (each expert's output rows) or ``tgmm``
        ``[E, d, f]``, by per-expert dense float32 dots (memory ``E * Z * d``)."""
        x = self.grouped(self.x)
        if op == "gmm":
            return jnp.einsum("ezd,edf->ezf", x, self.w.astype(jnp.float32))
        return jnp.einsum("ezd,ezf->edf", x, self.grouped(self.dy))

    def compare(self, op: str, got: jax.Array) -> float:
        """Max error of ``got`` relative to the largest magnitude of `expert_dots`
        (one jitted program: no difference array beside the reference)."""

        def error(got):
            want = self.expert_dots(op)
            got = self.grouped(got) if op == "gmm" else got.astype(jnp.float32)
            return jnp.abs(got - want).max() / jnp.maximum(jnp.abs(want).max(), 1e-6)

        return float(jax.jit(error)(got))

    def args(self, op: str) -> tuple:
        return (self.x, self.w) if op == "gmm" else (self.x, self.dy)

    def dense_args(self, op: str, shape: Shape) -> tuple:
        """Operands of the dense GEMM with the same useful FLOPs as ``op``."""
        m, d, f = shape.rows, shape.d_model, shape.d_ff
        a, b = ((m, d), (d, f)) if op == "gmm" else ((d, m), (m, f))
        keys = jax.random.split(jax.random.key(1))
        return jax.random.normal(keys[0], a, DTYPE), jax.random.normal(keys[1], b, DTYPE)


_dense = jax.jit(lambda a, b: a @ b)


def lowering(fn, *args) -> dict:
    """How XLA compiled ``fn``: the ragged-dot fusion flag as set in ``XLA_FLAGS``
    (``"default"`` when not set) and the custom calls of the optimized HLO."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    flag = re.search(rf"--{RAGGED_DOT_FUSION_FLAG}=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return {
        "flag": f"{RAGGED_DOT_FUSION_FLAG}={flag.group(1) if flag else 'default'}",
        "custom_calls": calls,
        "cudnn": any("cudnn" in call.lower() for call in calls),
    }


def time_against_dense(fn, args, dense_args, samples: int, calls: int) -> tuple[dict, object]:
    """``fn(*args)`` timed interleaved with the dense GEMM: ``({seconds, dense_seconds,
    first_call_s}, the first call's result)`` (the first call includes compilation)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    got = interleaved_median_seconds(
        {"kernel": (fn, args), "dense": dense_args}, samples, calls_per_sample=calls
    )
    return {"seconds": got["kernel"], "dense_seconds": got["dense"], "first_call_s": first}, out


def _row_fields(timed: dict, flops: float) -> dict:
    return {
        "ms": timed["seconds"] * 1e3,
        "dense_ms": timed["dense_seconds"] * 1e3,
        "tflops": flops / timed["seconds"] / 1e12,
        "fraction_of_dense": timed["dense_seconds"] / timed["seconds"],
        "first_call_s": timed["first_call_s"],
    }


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def measure_op(writer, shape_name, shape, impl, op, problems, samples, calls) -> None:
    """One (shape, impl, op) row: timed, checked, its failure caught."""
    key = f"{shape_name}/{impl}/{op}"
    if not writer.start(key):
        return
    try:
        if impl == "tokamax" and importlib.util.find_spec("tokamax") is None:
            writer.row(key, "skipped", reason="tokamax is not installed")
            return
        fn = _impl_fns(impl)[OPS.index(op)]
        if fn is None:
            writer.row(key, "skipped", reason=f"{impl} has no {op} on this platform")
            return
        block = _layout_block(impl)
        if block not in problems:
            problems[block] = Problem(shape, block)
        problem, extra = problems[block], {}
        if impl == "lax.ragged_dot" and op == "tgmm":
            extra["expansion_bytes"] = problem.expansion_bytes
            if problem.expansion_bytes > EXPANSION_LIMIT_BYTES:
                writer.row(key, "skipped", reason="XLA's dense expansion does not fit", **extra)
                return
        topo = problem.topo
        call = jax.jit(lambda a, b: fn(a, b, topo))
        args = problem.args(op)
        if impl == "lax.ragged_dot":
            extra["lowering"] = lowering(call, *args)
        dense = (_dense, problem.dense_args(op, shape))
        timed, out = time_against_dense(call, args, dense, samples, calls)
        error = problem.compare(op, out)
        writer.row(
            key, "ok", **_row_fields(timed, problem.useful_flops), max_rel_err=error, **extra
        )
    except Exception as error:  # noqa: BLE001 - this row failed; the others still run
        writer.row(key, "failed", reason=_failure(error))


def measure_layer(writer, shape_name, shape, impl, samples, calls) -> None:
    """The dMoE forward + backward next to the equal-FLOPs `DenseMLP`'s."""
    key = f"{shape_name}/{impl}/layer fwd+bwd"
    if not writer.start(key):
        return
    try:
        config = MoEConfig(
            d_model=shape.d_model,
            d_ff=shape.d_ff,
            num_experts=shape.num_experts,
            top_k=shape.top_k,
            expert_type=shape.expert_type,
            dtype=DTYPE,
            param_dtype=jnp.float32,
            impl=impl,
        )
        x = jax.random.normal(jax.random.key(0), (shape.tokens, shape.d_model), DTYPE)
        moe, moe_params = gpu_bench.fwd_bwd(DroplessMoE(config, rngs=nnx.Rngs(0)), x)
        dense_mlp = DenseMLP(config, d_ff=shape.top_k * shape.d_ff, rngs=nnx.Rngs(0))
        dense, dense_params = gpu_bench.fwd_bwd(dense_mlp, x)
        timed, _ = time_against_dense(
            moe, (x, moe_params), (dense, (x, dense_params)), samples, calls
        )
        matmuls = 3 if shape.expert_type == "glu" else 2
        flops = 3 * matmuls * 2.0 * shape.rows * shape.d_model * shape.d_ff
        writer.row(
            key,
            "ok",
            **_row_fields(timed, flops),
            resolved_impl=products.resolve_impl(impl, DTYPE),
        )
    except Exception as error:  # noqa: BLE001 - this row failed; the others still run
        writer.row(key, "failed", reason=_failure(error))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("kernels", "layer", "extra"))
    parser.add_argument("--shapes", nargs="+", required=True)
    parser.add_argument("--impls", nargs="+", help="default: the kind's impls")
    parser.add_argument("--samples", type=int, default=5, help="samples per row (median)")
    parser.add_argument("--calls", type=int, default=20, help="back-to-back calls per sample")
    parser.add_argument("--smoke", action="store_true", help="SMOKE_SHAPES (CPU, interpret mode)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    writer = RowWriter()
    writer.env(
        platform=device.platform,
        device=device.device_kind,
        jax_version=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        timing=TIMING_METHOD.format(calls=args.calls, samples=args.samples),
    )
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    default = {"kernels": KERNEL_IMPLS, "layer": ("auto",), "extra": EXTRA_IMPLS}[args.kind]
    impls = args.impls or default
    for shape_name in args.shapes:
        shape, problems = shapes[shape_name], {}
        for impl in impls:
            if args.kind == "layer":
                measure_layer(writer, shape_name, shape, impl, args.samples, args.calls)
                continue
            for op in OPS:
                measure_op(writer, shape_name, shape, impl, op, problems, args.samples, args.calls)


if __name__ == "__main__":
    main()
