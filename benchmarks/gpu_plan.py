"""The schedule of `benchmarks.gpu_check`: its steps, most valuable first, each with the
kernels it compiles and its estimated seconds on one H100 / H200 (standard library only).

No GPU has run this yet, so the estimates are a model, not measurements:
``STARTUP_S`` per process (Python, jax import, CUDA context), ``COMPILE_S`` per Mosaic
or Triton kernel (LLVM + ptxas), ``XLA_COMPILE_S`` per XLA program, and the timed calls
at ``ASSUMED_TFLOPS``. The kernel counts are counted from the rows each step measures
(`kernel_counts`) and, for the tests, from the test functions (`TEST_KERNELS`). The
first GPU report records every row's first-call seconds (``first_call_s``:
compilation included) and every step's seconds, to replace these numbers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

from benchmarks.shapes import PRODUCTION_SHAPES, SMOKE_SHAPES

STARTUP_S = 10.0
COMPILE_S = 2.5
XLA_COMPILE_S = 0.5
ASSUMED_TFLOPS = 400.0
# Most valuable first: the many-small-experts shapes, then Mixtral's.
SHAPE_ORDER = ("olmoe", "deepseek", "mixtral")
KERNEL_IMPLS = ("mosaic", "mosaic-bk32x6", "ragged_dot_mgpu", "lax.ragged_dot")
SMOKE_KERNEL_IMPLS = ("mosaic", "ragged_dot_mgpu", "lax.ragged_dot")
EXTRA_IMPLS = ("triton", "tokamax")
MOSAIC_LIKE = {"mosaic", "mosaic-bk32x6", "ragged_dot_mgpu", "triton", "tokamax"}
LAYER_KERNELS = 6  # sdd, dsd, dsdᵀ and dstd variants of one forward + backward
# The gpu-marked tests: Pallas kernels each compiles (one per product and direction).
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_accumulation.py", "tests/test_exchange_grad.py")
TEST_KERNELS = {
    "test_triton_products (9 cases x 3 products x fwd + 2 VJPs)": 81,
    "test_mosaic_products (2 x 9)": 18,
    "test_edge_routings (triton, mosaic: 6 cases x 9)": 54,
    "test_layer_matches_xla_on_this_gpu (4 x 6)": 24,
    "test_xs_lm_loss_falls_in_20_steps": 6,
    "test_mosaic_kernel_tiles_match_ragged_dot (2 x 2)": 4,
    "test_mosaic_kernels_do_not_spill_or_serialize_wgmma": 4,
    "test_accumulation[mosaic], test_exchange_grad": 3,
    "test_benchmark_rows_on_this_gpu (3 Pallas impls x 2 ops)": 6,
}
TEST_WORKERS = 8  # pytest-xdist workers on the GPU machine (16 CPU cores compile)
TRAIN_MEASURE_S = 20.0
TRAIN_SETUP_S = 25.0  # corpus, model and the first (compiling) logged interval


@dataclasses.dataclass(frozen=True)
class Options:
    smoke: bool
    samples: int
    calls: int
    impls: tuple[str, ...] | None
    train_seconds: float
    test_workers: int
    test_timeout_s: float


def default_options(smoke: bool, **changes) -> Options:
    workers = 0 if smoke else TEST_WORKERS
    base = Options(
        smoke=smoke,
        samples=1 if smoke else 5,
        calls=1 if smoke else 20,
        impls=None,
        train_seconds=TRAIN_MEASURE_S,
        test_workers=workers if importlib.util.find_spec("xdist") else 0,
        test_timeout_s=600.0 if smoke else 120.0,
    )
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def _flops(shape_name: str) -> float:
    shape = PRODUCTION_SHAPES.get(shape_name) or SMOKE_SHAPES[shape_name]
    return 2.0 * shape.rows * shape.d_model * shape.d_ff


def kernel_counts(impls, ops=("gmm", "tgmm")) -> tuple[int, int]:
    """``(Pallas kernels, XLA programs)`` one shape's rows compile: a kernel per
    (impl, op); XLA: lax.ragged_dot's, and per op its dense GEMM, reference and check."""
    pallas = sum(len(ops) for impl in impls if impl in MOSAIC_LIKE)
    xla = sum(len(ops) for impl in impls if impl not in MOSAIC_LIKE) + 3 * len(ops)
    return pallas, xla


def _run_s(flops: float, rows: int, options: Options) -> float:
    calls = options.samples * (options.calls + 1) * 2 + 2  # kernel + dense, first call, check
    return rows * calls * flops / (ASSUMED_TFLOPS * 1e12)


def _estimate(pallas: int, xla: int, run_s: float) -> float:
    return round(STARTUP_S + pallas * COMPILE_S + xla * XLA_COMPILE_S + run_s, 1)


def build_steps(options: Options, out, stem: str, train_dir) -> list:
    """The steps in order (`benchmarks.gpu_steps.Step`), their commands and estimates."""
    from benchmarks import gpu_train
    from benchmarks.gpu_steps import Step

    python = sys.executable
    shapes = ("smoke",) if options.smoke else SHAPE_ORDER
    timing = ["--samples", str(options.samples), "--calls", str(options.calls)]
    smoke = ["--smoke"] if options.smoke else []
    steps = []

    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    pytest += ["-p", "benchmarks.pytest_rows", "-m", "gpu", *GPU_TEST_FILES]
    pytest += [f"--junitxml={out}/{stem}_tests.xml"]
    if options.test_workers:
        pytest += ["-n", str(options.test_workers)]
    if importlib.util.find_spec("pytest_timeout"):
        pytest += [f"--timeout={options.test_timeout_s:.0f}", "--timeout-method=thread"]
    test_kernels = sum(TEST_KERNELS.values())
    workers = max(1, options.test_workers)
    steps.append(
        Step(
            name="tests",
            what=f"pytest -m gpu ({workers} workers): kernel correctness, lint, collectives",
            command=pytest,
            estimate_s=round(STARTUP_S + test_kernels * COMPILE_S / workers, 1),
            kernels=test_kernels,
            env={
                "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.8 / (workers + 1):.2f}",
                "JMOE_GPU_TEST_TIMEOUT": f"{options.test_timeout_s:.0f}",
            },
            restartable=False,
            ok_returncodes=(0, 1),  # 1: some tests failed (they are in the report)
        )
    )
    kernel_impls = options.impls or (SMOKE_KERNEL_IMPLS if options.smoke else KERNEL_IMPLS)
    impls = [impl for impl in kernel_impls if impl not in EXTRA_IMPLS]
    for shape in shapes if impls else ():
        pallas, xla = kernel_counts(impls)
        steps.append(
            Step(
                name=f"kernels-{shape}",
                what=f"gmm, tgmm at {shape}: {', '.join(impls)}",
                command=[python, "-m", "benchmarks.gpu_kernels", "kernels", "--shapes", shape]
                + ["--impls", *impls, *timing, *smoke],
                estimate_s=_estimate(pallas, xla, _run_s(_flops(shape), 2 * len(impls), options)),
                kernels=pallas,
                xla_programs=xla,
            )
        )
    layer_flops = sum(9 * _flops(shape) for shape in shapes)
    steps.append(
        Step(
            name="layer",
            what=f"dMoE fwd+bwd (impl auto) vs dense MLP of equal FLOPs: {', '.join(shapes)}",
            command=[python, "-m", "benchmarks.gpu_kernels", "layer", "--shapes", *shapes]
            + [*timing, *smoke],
            estimate_s=_estimate(
                LAYER_KERNELS * len(shapes), 2 * len(shapes), _run_s(layer_flops, 1, options)
            ),
            kernels=LAYER_KERNELS * len(shapes),
            xla_programs=2 * len(shapes),
        )
    )
    extra = [impl for impl in options.impls or EXTRA_IMPLS if impl in EXTRA_IMPLS]
    if extra:
        present = [i for i in extra if i != "tokamax" or importlib.util.find_spec("tokamax")]
        pallas, xla = kernel_counts(present)
        run = sum(_run_s(_flops(shape), 2 * len(present), options) for shape in shapes)
        steps.append(
            Step(
                name="extra",
                what=f"gmm, tgmm of {', '.join(extra)} (where installed): {', '.join(shapes)}",
                command=[python, "-m", "benchmarks.gpu_kernels", "extra", "--shapes", *shapes]
                + ["--impls", *extra, *timing, *smoke],
                estimate_s=_estimate(pallas * len(shapes), xla * len(shapes), run),
                kernels=pallas * len(shapes),
                xla_programs=xla * len(shapes),
            )
        )
    for ffn in ("dense", "dmoe"):
        steps.append(gpu_train.train_step(ffn, options, train_dir))
    return steps
