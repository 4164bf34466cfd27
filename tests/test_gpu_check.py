"""``scripts/gpu_check.sh --smoke``: the GPU certification pipeline end to end on
CPU (tiny shapes, interpret mode), so the script cannot rot; and its summary."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import gpu_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_the_report_outside_benchmarks_results():
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", "--train-seconds", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = pathlib.Path(re.search(r"wrote (\S+)\.json", run.stdout).group(1) + ".json")
    assert (ROOT / "benchmarks" / "results") not in written.parents
    report = json.loads(written.read_text())
    assert {
        "platform",
        "device",
        "jax_version",
        "date",
        "all_correct",
        "mosaic_gmm_fraction_of_dense",
        "results",
        "training",
    } <= set(report)
    assert report["smoke"] and report["platform"] == "cpu"
    assert report["all_correct"] is False  # every gpu test skips on CPU
    assert report["tests"]["skipped"] == report["tests"]["tests"] > 0
    ops = report["results"]["smoke"]
    for impl in ("triton", "mosaic", "ragged_dot"):
        assert {"gmm", "tgmm", "layer fwd+bwd"} <= set(ops[impl]), impl
    assert {"gmm", "tgmm"} <= set(ops["mosaic-bk32x6"])  # the tile variant: products only
    assert ops["ragged_dot_mgpu"]["gmm"]["max_rel_err"] < 1e-2
    assert 0 < report["mosaic_gmm_fraction_of_dense"]
    assert report["training"]["dmoe_tokens_per_s"] > 0
    assert written.with_suffix(".md").read_text().startswith("gpu_check: cpu")
    for path in written.parent.iterdir():
        path.unlink()
    written.parent.rmdir()


def test_summary_table_and_minimum_fraction():
    row = lambda fraction: {"ms": 1.0, "tflops": 10.0 * fraction, "fraction_of_dense": fraction}
    results = {
        "mixtral": {"mosaic": {"gmm": row(0.9), "tgmm": row(0.8)}},
        "deepseek": {"mosaic": {"gmm": row(0.6)}, "tokamax": {"gmm": row(0.7)}},
    }
    assert gpu_check._min_fraction(results, "mosaic", "gmm") == 0.6
    assert gpu_check._min_fraction(results, "mosaic", "tgmm") == 0.8
    assert gpu_check._min_fraction(results, "triton", "gmm") is None
    report = {
        "device": "NVIDIA H200",
        "platform": "gpu",
        "jax_version": "0.11.2",
        "date": "2026-12-02",
        "smoke": False,
        "all_correct": True,
        "tests": {"passed": 26, "failures": 0, "errors": 0, "skipped": 0},
        "results": results,
        "errors": ["deepseek/triton: ValueError: x"],
        "training": {
            "config": "c",
            "dense_tokens_per_s": 100.0,
            "dmoe_tokens_per_s": 90.0,
            "dmoe_fraction_of_dense": 0.9,
        },
    }
    table = gpu_check.summary_table(report)
    assert "| deepseek | mosaic | 6.0 | 60% | - | - | - |" in table
    assert "| mixtral | mosaic | 9.0 | 90% | 8.0 | 80% | - |" in table
    assert "90% of dense" in table and "- failed: deepseek/triton" in table
