"""`scripts/gpu_check.sh` on CPU: the step runner survives hangs, aborts and a spent
budget with the finished rows on disk (fast: stand-in steps without jax), the schedule
(``--plan``), the report's groups, the toolchain search, and (slow) the whole
pipeline with ``--smoke``."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import gpu_check, gpu_plan, gpu_report, gpu_toolchain, gpu_train
from benchmarks.gpu_rows import FAULT_ENV
from benchmarks.gpu_steps import Step

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A stand-in step: three rows through the real row writer (and its fault injection).
FAKE_STEP = """
import sys
from benchmarks.gpu_rows import RowWriter
writer = RowWriter()
for op in ("gmm", "tgmm", "dsd"):
    key = f"fake/{sys.argv[1]}/{op}"
    if writer.start(key):
        writer.row(key, "ok", ms=1.0, tflops=1.0, fraction_of_dense=0.5)
"""


def _fake(name: str, estimate_s: float) -> Step:
    return Step(
        name=name,
        what="stand-in",
        command=[sys.executable, "-c", FAKE_STEP, name],
        estimate_s=estimate_s,
        env={"PYTHONPATH": str(ROOT)},
    )


def _check(tmp_path, steps, budget, min_step) -> dict:
    meta = {"date": "d", "smoke": True, "budget_seconds": budget, "device": "cpu"}
    gpu_check.run_check(steps, tmp_path, "gpu_check_cpu_d", meta, min_step)
    assert (tmp_path / "gpu_check_cpu_d.md").read_text().startswith("gpu_check: cpu")
    return json.loads((tmp_path / "gpu_check_cpu_d.json").read_text())


def test_hang_and_abort_are_recorded_and_later_steps_still_run(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hangs:hang@1,aborts:abort@1")
    steps = [_fake("hangs", 3), _fake("aborts", 10), _fake("fine", 10)]
    report = _check(tmp_path, steps, budget=40, min_step=1)
    status = {name: step["status"] for name, step in report["steps"].items()}
    assert status == {"hangs": "timeout", "aborts": "failed", "fine": "ok"}
    assert "share" in report["steps"]["hangs"]["reason"]
    assert "SIGABRT during fake/aborts/tgmm" in report["steps"]["aborts"]["reason"]
    fake = report["results"]["fake"]
    assert fake["hangs"]["gmm"]["status"] == "ok"  # finished before the hang: kept
    assert fake["hangs"]["tgmm"]["status"] == "timeout"  # the row in flight, named
    assert "dsd" not in fake["hangs"]
    # The abort costs its row; the step started again measures the rest.
    assert [fake["aborts"][op]["status"] for op in ("gmm", "tgmm", "dsd")] == ["ok", "failed", "ok"]
    assert report["errors"] == ["fake/aborts/tgmm: killed by SIGABRT during fake/aborts/tgmm"]
    assert set(fake["fine"]) == {"gmm", "tgmm", "dsd"}
    assert (tmp_path / "gpu_check_cpu_d_hangs.log").read_text().count("injected fault: hang") == 1


def test_a_budget_spent_mid_way_keeps_the_finished_rows_and_names_the_cut_step(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(FAULT_ENV, "first:hang@1")
    report = _check(tmp_path, [_fake("first", 1), _fake("second", 1)], budget=10, min_step=6)
    first, second = report["steps"]["first"], report["steps"]["second"]
    assert first["status"] == "timeout" and first["seconds"] < 8, first
    assert second["status"] == "skipped" and second["reason"].startswith("budget spent"), second
    assert report["results"]["fake"]["first"]["gmm"]["status"] == "ok"
    assert "second" not in report["results"].get("fake", {})


def test_plan_lists_the_steps_with_kernels_and_shares_and_fits_seven_minutes(capsys):
    assert gpu_check.main(["--plan"]) is None
    text = capsys.readouterr().out
    names = [line.split()[0] for line in text.splitlines()[1:-2]]
    assert names == [
        "tests",
        "kernels-olmoe",
        "kernels-deepseek",
        "kernels-mixtral",
        "layer",
        "extra",
        "train-dense",
        "train-dmoe",
    ]
    total = text.splitlines()[-2].split()
    assert total[0] == "total" and int(total[1]) > 200 and float(total[3]) <= 420, total
    assert "fits the 420 s budget" in text
    docs = (ROOT / "docs" / "gpu.md").read_text()
    for line in text.splitlines()[:-1]:  # docs/gpu.md shows this very schedule
        assert f"    {line}\n" in docs, line
    capsys.readouterr()
    gpu_check.main(["--plan", "--only", "kernels", "--budget-seconds", "100"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:-2]] == [
        "kernels-olmoe",
        "kernels-deepseek",
        "kernels-mixtral",
    ]
    assert sum(float(line.split()[4]) for line in lines[1:-2]) == pytest.approx(100, abs=2)


def test_report_groups_tests_and_computes_all_correct_from_correctness_only():
    rows = [
        {"key": "test/tests/test_gpu.py::test_mosaic_products[bf16]", "status": "passed"},
        {"key": "test/tests/test_gpu.py::test_mosaic_kernels_do_not_spill", "status": "failed"},
        {"key": "test/tests/test_exchange_grad.py::test_real[a]", "status": "failed"},
    ]
    steps = {"tests": {"status": "ok"}}
    build = lambda missing: gpu_report.build_report({}, steps, {"tests": rows}, missing)
    report = build({"missing": []})
    assert report["all_correct"] is True and report["tests"]["passed"] == 1
    assert report["lint"]["ok"] is False
    assert list(report["infrastructure"]["tests"]) == ["tests/test_exchange_grad.py::test_real[a]"]
    # Without ptxas, the Mosaic tests are infrastructure, not kernel, results.
    report = build({"missing": ["ptxas"]})
    assert report["tests"]["tests"] == 0 and report["all_correct"] is False
    assert len(report["infrastructure"]["tests"]) == 3
    failed = [{**rows[0], "status": "failed", "reason": "AssertionError"}]
    report = gpu_report.build_report({}, steps, {"tests": failed}, {"missing": []})
    assert report["all_correct"] is False
    assert report["tests"]["failures"] == {rows[0]["key"][5:]: "AssertionError"}


def test_kernel_rows_make_the_result_table_and_minimum_fraction():
    row = lambda fraction: {"status": "ok", "ms": 1.0, "tflops": 10 * fraction,
                            "fraction_of_dense": fraction}  # fmt: skip
    rows = [
        {"key": "mixtral/mosaic/gmm", **row(0.9)},
        {"key": "olmoe/mosaic/gmm", **row(0.6)},
        {"key": "olmoe/mosaic/tgmm", "status": "failed", "reason": "ValueError: x"},
        {"key": "train/dense", "status": "ok", "tokens_per_s": 100.0},
        {"key": "train/dmoe", "status": "ok", "tokens_per_s": 90.0},
    ]
    meta = {"device": "NVIDIA H200", "platform": "gpu", "date": "d", "budget_seconds": 420}
    report = gpu_report.build_report(meta, {}, {"kernels": rows}, {"missing": []})
    assert report["mosaic_gmm_fraction_of_dense"] == 0.6
    assert report["mosaic_tgmm_fraction_of_dense"] is None
    assert report["errors"] == ["olmoe/mosaic/tgmm: ValueError: x"]
    assert report["training"]["dmoe_fraction_of_dense"] == 0.9
    table = gpu_report.summary_table(report)
    assert "| olmoe | mosaic | 6.0 | 60% | failed | failed | - |" in table
    assert "dMoE / dense: 90%" in table


def test_training_rows_come_from_the_runs_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert gpu_train.training_row("dmoe", metrics) == []
    records = [{"kind": "val", "step": 0}] + [
        {"kind": "train", "step": 10 * i, "tokens_per_s": tps, "train_time_s": 5.0 * i}
        for i, tps in ((1, 10.0), (2, 100.0), (3, 120.0), (4, 110.0))
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    (row,) = gpu_train.training_row("dmoe", metrics)
    assert row["tokens_per_s"] == 110.0  # the median after the compiling interval
    assert row["measured_s"] == 15.0 and row["steps"] == 40
    options = gpu_plan.default_options(False, train_seconds=15.0)
    step = gpu_train.train_step("dmoe", options, tmp_path)
    assert step.command[1:5] == ["-m", "experiments.train", "--ffn", "dmoe"]
    assert step.stop([row]) and not step.stop([{**row, "measured_s": 14.0}])


def _tool(path: pathlib.Path, version: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
    path.chmod(0o755)


def test_toolchain_found_in_cuda_root_and_split_roots_linked(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_ROOT", str(tmp_path / "cuda"))
    _tool(tmp_path / "cuda" / "bin" / "ptxas", "12.9")
    _tool(tmp_path / "cuda" / "bin" / "nvdisasm", "12.9")
    found = gpu_toolchain.find_toolchain()
    assert found["root"] == str(tmp_path / "cuda") and found["missing"] == []
    assert found["ptxas"]["version"] == "12.9 (V12.9.1)"
    assert gpu_toolchain.cuda_environment(found)["CUDA_ROOT"] == str(tmp_path / "cuda")
    # ptxas in one place, nvdisasm in another: one root linking both.
    (tmp_path / "cuda" / "bin" / "nvdisasm").unlink()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "other"))
    _tool(tmp_path / "other" / "bin" / "nvdisasm", "13.0")
    found = gpu_toolchain.find_toolchain()
    root = pathlib.Path(found["root"])
    assert (root / "bin" / "ptxas").resolve() == tmp_path / "cuda" / "bin" / "ptxas"
    assert (root / "bin" / "nvdisasm").resolve() == tmp_path / "other" / "bin" / "nvdisasm"


@pytest.mark.slow
def test_smoke_run_has_every_step_ok(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (written,) = tmp_path.glob("gpu_check_*.json")
    report = json.loads(written.read_text())
    assert {name: s["status"] for name, s in report["steps"].items()} == {
        name: "ok"
        for name in ("tests", "kernels-smoke", "layer", "extra", "train-dense", "train-dmoe")
    }, report["steps"]
    assert report["smoke"] and report["platform"] == "cpu" and report["jax_version"]
    assert report["all_correct"] is False  # every gpu test skips on CPU
    assert report["tests"]["skipped"] == report["tests"]["tests"] > 0
    ops = report["results"]["smoke"]
    for impl in ("mosaic", "lax.ragged_dot", "triton"):
        assert {ops[impl][op]["status"] for op in ("gmm", "tgmm")} == {"ok"}, ops[impl]
        assert ops[impl]["gmm"]["max_rel_err"] < 1e-2
    assert ops["ragged_dot_mgpu"]["gmm"]["status"] == "ok"
    assert ops["auto"]["layer fwd+bwd"]["resolved_impl"] == "xla"
    assert not report["ragged_dot_lowering"]["smoke"]["gmm"]["cudnn"]  # no GPU: no cuDNN
    assert report["training"]["dmoe"]["tokens_per_s"] > 0
    assert written.with_suffix(".md").read_text().startswith("gpu_check: cpu")


@pytest.mark.slow
def test_references_are_per_expert_dots_and_the_dense_expansion_is_not_run(tmp_path, monkeypatch):
    """The kernel step's reference (per-expert dense dots) against a NumPy loop over the
    experts, and lax.ragged_dot's weight gradient skipped where its expansion is too big."""
    import numpy as np

    from benchmarks import gpu_kernels
    from benchmarks.gpu_rows import RowWriter, read_rows
    from benchmarks.shapes import Shape

    shape = Shape(24, 16, 8, 4, 2)
    problem = gpu_kernels.Problem(shape, 1)
    x, dy, w = (np.asarray(a, np.float32) for a in (problem.x, problem.dy, problem.w))
    sizes = np.asarray(problem.topo.group_sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    want_tgmm = np.stack([x[a:b].T @ dy[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(problem.expert_dots("tgmm"), want_tgmm, rtol=1e-5, atol=1e-5)
    gmm = problem.expert_dots("gmm")
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.testing.assert_allclose(gmm[e, : b - a], x[a:b] @ w[e], rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(gpu_kernels, "EXPANSION_LIMIT_BYTES", problem.expansion_bytes - 1)
    writer = RowWriter(str(tmp_path / "rows.jsonl"), "kernels")
    for op in ("gmm", "tgmm"):
        gpu_kernels.measure_op(writer, "tiny", shape, "lax.ragged_dot", op, {}, 1, 2)
    rows = {row["key"]: row for row in read_rows(tmp_path / "rows.jsonl") if "status" in row}
    gmm_row, tgmm_row = rows["tiny/lax.ragged_dot/gmm"], rows["tiny/lax.ragged_dot/tgmm"]
    assert gmm_row["status"] == "ok" and gmm_row["max_rel_err"] < 1e-2, gmm_row
    assert gmm_row["lowering"]["flag"].startswith(gpu_kernels.RAGGED_DOT_FUSION_FLAG)
    assert gmm_row["lowering"]["cudnn"] is False  # CPU: no cuDNN
    assert tgmm_row["status"] == "skipped", tgmm_row
    assert tgmm_row["expansion_bytes"] == 4 * 48 * 16 * 2  # E * rows * d_model * bf16


def test_pytest_plugin_records_each_test_and_bounds_a_hung_one(tmp_path):
    """`benchmarks.pytest_rows`: outcomes appended as they are known; without
    pytest-timeout, ``JMOE_GPU_TEST_TIMEOUT`` ends a hung test's process."""
    from benchmarks.gpu_rows import ROWS_ENV, read_rows
    from benchmarks.pytest_rows import TIMEOUT_ENV

    (tmp_path / "test_stand_in.py").write_text(
        "import time\n\ndef test_a_passes():\n    pass\n\n"
        "def test_b_hangs():\n    time.sleep(600)\n"
    )
    rows = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), ROWS_ENV: str(rows), TIMEOUT_ENV: "2"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.pytest_rows"]
    command += ["-p", "no:cacheprovider", "-p", "no:timeout", str(tmp_path / "test_stand_in.py")]
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "test_b_hangs" in run.stderr, run.stdout + run.stderr
    recorded = {row["key"].split("::")[-1]: row["status"] for row in read_rows(rows)}
    assert recorded == {"test_a_passes": "passed"}
