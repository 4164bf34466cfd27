"""The one command for a lent GPU (``scripts/gpu_check.sh``): correctness, kernel
speed next to the peers, and training throughput, in one report.

    scripts/gpu_check.sh            # on the GPU: <= 8 min on one H100 / H200
    scripts/gpu_check.sh --smoke    # the same pipeline on CPU, tiny shapes, interpret mode

Steps:

1. ``pytest -m gpu`` on `GPU_TEST_FILES` (the kernels compiled on the device
   vs the references, the layer vs ``impl="xla"``, a short LM run, ptxas /
   SASS, the real ``ragged_all_to_all`` exchange gradient);
2. at each shape of `benchmarks.shapes.PRODUCTION_SHAPES` (`SMOKE_SHAPES` with
   ``--smoke``), bfloat16, random top-k routing: ``gmm`` (``x @ W1``, jmoe's
   ``sdd``) and ``tgmm`` (``xᵀ dh``, jmoe's ``dstd``) for jmoe's ``triton``,
   ``mosaic`` (and its deeper-pipeline tile variant ``mosaic-bk32x6``,
   products only: `gpu_bench.MOSAIC_VARIANTS`) and ``ragged_dot``
   (``jax.lax.ragged_dot``, XLA's own path) and
   the peers of `benchmarks.peers`, each next to one dense bfloat16 GEMM of the
   same useful FLOPs (the 1.0 reference), plus jmoe's two other products and
   the whole `DroplessMoE` forward + backward next to a `DenseMLP` of equal FLOPs;
3. training throughput: a dense and a dMoE transformer (``impl="auto"``,
   bfloat16 compute), each trained for half of ``--train-seconds`` on random
   tokens, in tokens/s.

Writes ``gpu_check_<device>_<date>.json`` and ``.md`` (the summary table) to
``--out`` (default ``benchmarks/results``; with ``--smoke`` a new temporary
directory). JSON fields: ``platform``, ``device``, ``jax_version``, ``date``,
``smoke``, ``tests`` (pytest counts), ``all_correct`` (every gpu test passed,
at least one ran), ``mosaic_gmm_fraction_of_dense`` and
``mosaic_tgmm_fraction_of_dense`` (minimum over the shapes; null if mosaic
did not run), ``results[shape][impl][op]`` = ``{ms, tflops, fraction_of_dense}``
(peers also ``max_rel_err`` against ``jax.lax.ragged_dot``), ``errors``
(``"shape/impl: message"`` of what failed to run), ``training``
(``dense_tokens_per_s``, ``dmoe_tokens_per_s``, ``dmoe_fraction_of_dense``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import gpu_bench
from benchmarks.peers import available_peers
from benchmarks.shapes import PRODUCTION_SHAPES, SMOKE_SHAPES, Shape
from benchmarks.timing import median_seconds
from experiments.train import train_step
from jmoe import MoEConfig, permutation
from jmoe.transformer import MoETransformer, TransformerConfig
from pallas_kernels import products

JMOE_IMPLS = ("triton", "mosaic", *gpu_bench.MOSAIC_VARIANTS, "ragged_dot")
# gpu_bench's product rows -> the names of this report.
OPS = {
    "sdd x@W1": "gmm",
    "dstd xT@dh": "tgmm",
    "dsd h@W2": "dsd h@W2",
    "dsd dh@W1T": "dsd dh@W1T",
    "layer fwd+bwd": "layer fwd+bwd",
}
DTYPE = jnp.bfloat16
# The gpu-marked tests: the kernels, mosaic's float32 accumulation, and the real
# ragged_all_to_all exchange gradient.
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_accumulation.py", "tests/test_exchange_grad.py")


def run_gpu_tests(out: pathlib.Path, timeout: int) -> dict:
    """``pytest -m gpu`` on `GPU_TEST_FILES` in a fresh process: its counts and verdict
    (a run past ``timeout`` seconds is not correct; the counts come from what it wrote)."""
    report = out / "gpu_tests.xml"
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        *GPU_TEST_FILES,
        f"--junitxml={report}",
    ]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:  # counts as not correct; go on measuring
        run = subprocess.CompletedProcess(
            command,
            returncode=124,
            stdout=str(expired.stdout),
            stderr=f"pytest timed out after {timeout} s",
        )
    print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.exists():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        **counts,
        "passed": passed,
        "returncode": run.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "all_correct": run.returncode == 0
        and passed > 0
        and not counts["failures"]
        and not counts["errors"],
    }


def _row(seconds: float, dense: float, flops: float) -> dict:
    return {
        "ms": seconds * 1e3,
        "tflops": flops / seconds / 1e12,
        "fraction_of_dense": dense / seconds,
    }


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(1e-6, np.abs(want).max()))


def bench_jmoe(shape: Shape, impl: str, repeats: int) -> dict:
    """jmoe's four products and the layer: ``op -> row``."""
    rows = gpu_bench.bench_products(shape, impl, DTYPE, repeats)
    if impl not in gpu_bench.MOSAIC_VARIANTS:  # tile variants: the products only
        rows.append(("layer fwd+bwd", *gpu_bench.bench_layer(shape, impl, DTYPE, repeats)))
    return {OPS[name]: _row(seconds, dense, flops) for name, seconds, dense, flops in rows}


def bench_peer(shape: Shape, peer, repeats: int) -> dict:
    """A peer's ``gmm`` and ``tgmm`` (if it has one here) on the ragged layout
    of the same routing."""
    _, topo = permutation.dropless_dispatch(gpu_bench.random_indices(shape), shape.num_experts, 1)
    sizes, (m, d, f) = topo.group_sizes, (shape.rows, shape.d_model, shape.d_ff)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m, d), DTYPE)
    w = (jax.random.normal(keys[1], (shape.num_experts, d, f)) / np.sqrt(d)).astype(DTYPE)
    dy = jax.random.normal(keys[2], (m, f), DTYPE)
    want_gmm = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    want_tgmm = products.dstd(x, dy, topo, out_dtype=jnp.float32, impl="ragged_dot")
    out = {}
    for op, fn, args, want, dense_mkn in (
        ("gmm", peer.gmm, (x, w, sizes), want_gmm, (m, d, f)),
        ("tgmm", peer.tgmm, (x, dy, sizes), want_tgmm, (d, m, f)),
    ):
        if fn is None:
            continue
        fn = jax.jit(fn)
        seconds = median_seconds(fn, *args, repeats=repeats)
        dense = gpu_bench.dense_seconds(*dense_mkn, DTYPE, repeats)
        out[op] = {
            **_row(seconds, dense, 2.0 * m * d * f),
            "max_rel_err": _rel_err(fn(*args), want),
        }
    return out


def run_benchmarks(shapes: dict, repeats: int) -> tuple[dict, list[str]]:
    """``results[shape][impl][op]`` and the list of what failed to run."""
    results, errors = {}, []
    benches = {impl: functools.partial(bench_jmoe, impl=impl) for impl in JMOE_IMPLS}
    benches.update(
        {name: functools.partial(bench_peer, peer=peer) for name, peer in available_peers().items()}
    )
    for shape_name, shape in shapes.items():
        results[shape_name] = {}
        for impl, bench in benches.items():
            try:
                results[shape_name][impl] = bench(shape, repeats=repeats)
            except Exception as error:  # noqa: BLE001 - report it and measure the rest
                message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                errors.append(f"{shape_name}/{impl}: {message}")
                print(f"FAILED {shape_name}/{impl}: {message}", flush=True)
    return results, errors


def _lm_config(ffn: str, smoke: bool) -> TransformerConfig:
    """A transformer whose steps keep an H100 busy (``smoke``: a tiny one);
    ``ffn="dense"`` has ``top_k * d_ff`` hidden units: the same active FLOPs."""
    d_model, layers, heads, seq, d_ff = (128, 2, 2, 64, 128) if smoke else (1024, 4, 8, 1024, 2816)
    moe = MoEConfig(
        d_model=d_model,
        d_ff=d_ff,
        num_experts=8,
        top_k=2,
        expert_type="glu",
        dtype=DTYPE,
        param_dtype=jnp.float32,
        impl="auto",
    )
    return TransformerConfig(
        vocab_size=256,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        max_seq_len=seq,
        moe=moe,
        ffn=ffn,
    )


def train_tokens_per_second(ffn: str, smoke: bool, seconds: float) -> float:
    """Steps of `experiments.train.train_step` (AdamW) on random tokens for
    ``seconds`` after compilation (at least 3 steps): tokens per second."""
    import optax

    config = _lm_config(ffn, smoke)
    batch = 4 if smoke else 32
    model = MoETransformer(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)))
    tokens = jax.random.randint(jax.random.key(0), (batch, config.max_seq_len + 1), 0, 256)
    step = jax.jit(functools.partial(train_step, graphdef), donate_argnums=0)
    state, metrics = step(state, tokens)  # compile
    jax.block_until_ready(metrics)
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        state, metrics = step(state, tokens)
        steps += 1
        if steps % 10 == 0:
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    return steps * batch * config.max_seq_len / (time.perf_counter() - start)


def _min_fraction(results: dict, impl: str, op: str):
    values = [
        by_impl[impl][op]["fraction_of_dense"]
        for by_impl in results.values()
        if op in by_impl.get(impl, {})
    ]
    return min(values) if values else None


def summary_table(report: dict) -> str:
    """The markdown table printed at the end and written next to the JSON."""
    pct = lambda row: f"{100 * row['fraction_of_dense']:.0f}%" if row else "-"
    tf = lambda row: f"{row['tflops']:.1f}" if row else "-"
    lines = [
        f"gpu_check: {report['device']} ({report['platform']}), jax "
        f"{report['jax_version']}, {report['date']}"
        f"{' (SMOKE: CPU interpret mode, numbers meaningless)' if report['smoke'] else ''}",
        "",
        f"gpu tests: {report['tests']['passed']} passed, {report['tests']['failures']} "
        f"failed, {report['tests']['errors']} errors, {report['tests']['skipped']} skipped;"
        f" all_correct={report['all_correct']}",
        "",
        "| shape | impl | gmm TFLOP/s | gmm / dense | tgmm TFLOP/s | tgmm / dense "
        "| layer fwd+bwd / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, by_impl in report["results"].items():
        for impl, ops in by_impl.items():
            gmm, tgmm, layer = (ops.get(op) for op in ("gmm", "tgmm", "layer fwd+bwd"))
            lines.append(
                f"| {shape} | {impl} | {tf(gmm)} | {pct(gmm)} | {tf(tgmm)} | "
                f"{pct(tgmm)} | {pct(layer)} |"
            )
    train = report["training"]
    lines += [
        "",
        f"training (dense vs dMoE, {train['config']}): dense "
        f"{train['dense_tokens_per_s']:.0f} tokens/s, dMoE {train['dmoe_tokens_per_s']:.0f}"
        f" tokens/s ({100 * train['dmoe_fraction_of_dense']:.0f}% of dense)",
    ]
    lines += [f"- failed: {error}" for error in report["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU in interpret mode (checks the pipeline)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="result directory (default benchmarks/results; smoke: a temp dir)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="total training time, dense + dMoE (default 120; smoke 2)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="skip step 1 (pytest)")
    args = parser.parse_args(argv)
    out = args.out or (
        pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))
        if args.smoke
        else pathlib.Path("benchmarks/results")
    )
    out.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (1 if args.smoke else 5)
    train_seconds = (
        args.train_seconds if args.train_seconds is not None else (2.0 if args.smoke else 120.0)
    )

    device = jax.devices()[0]
    date = datetime.date.today().isoformat()
    tests = (
        {
            "tests": 0,
            "failures": 0,
            "errors": 0,
            "skipped": 0,
            "passed": 0,
            "returncode": None,
            "seconds": 0.0,
            "all_correct": False,
        }
        if args.skip_tests
        else run_gpu_tests(out, timeout=300 if args.smoke else 240)
    )
    results, errors = run_benchmarks(SMOKE_SHAPES if args.smoke else PRODUCTION_SHAPES, repeats)
    dense_tps = train_tokens_per_second("dense", args.smoke, train_seconds / 2)
    dmoe_tps = train_tokens_per_second("dmoe", args.smoke, train_seconds / 2)
    lm = _lm_config("dmoe", args.smoke)
    report = {
        "platform": device.platform,
        "device": device.device_kind,
        "jax_version": jax.__version__,
        "date": date,
        "smoke": args.smoke,
        "all_correct": tests["all_correct"],
        "tests": tests,
        "dense_reference": "one [m, k] @ [k, n] bfloat16 GEMM with the same useful FLOPs",
        "mosaic_gmm_fraction_of_dense": _min_fraction(results, "mosaic", "gmm"),
        "mosaic_tgmm_fraction_of_dense": _min_fraction(results, "mosaic", "tgmm"),
        "results": results,
        "errors": errors,
        "training": {
            "dense_tokens_per_s": dense_tps,
            "dmoe_tokens_per_s": dmoe_tps,
            "dmoe_fraction_of_dense": dmoe_tps / dense_tps,
            "config": f"d_model {lm.d_model}, {lm.num_layers} layers, seq "
            f"{lm.max_seq_len}, E {lm.moe.num_experts} top-"
            f"{lm.moe.top_k} d_ff {lm.moe.d_ff} glu, bf16",
        },
    }
    table = summary_table(report)
    print(table)
    stem = f"gpu_check_{re.sub(r'[^a-z0-9]+', '-', device.device_kind.lower()).strip('-')}_{date}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(table)
    print(f"wrote {out / stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
