"""The report of `benchmarks.gpu_check`, rebuilt from the steps' rows after every row and
step (standard library only): `build_report` (the JSON) and `summary_table` (the .md).

Tests fall in three groups: correctness (``all_correct`` covers these only), the
performance lint (`LINT`: spills, serialized wgmma) and infrastructure (`INFRASTRUCTURE`:
the collectives; and the tests that need a CUDA tool the toolchain check did not find).
"""

from __future__ import annotations

import re

LINT = re.compile(r"spill|serialize")
INFRASTRUCTURE = re.compile(r"test_exchange_grad\.py")
# Tests that cannot run without each tool: Mosaic compiles with ptxas; the lint reads SASS.
NEEDS_TOOL = {"ptxas": re.compile(r"mosaic|\[auto\]|xs_lm"), "nvdisasm": LINT}


def _test_group(nodeid: str, missing_tools) -> str:
    if INFRASTRUCTURE.search(nodeid):
        return "infrastructure"
    if any(NEEDS_TOOL[tool].search(nodeid) for tool in missing_tools):
        return "infrastructure"
    return "lint" if LINT.search(nodeid) else "correctness"


def _tests(rows: list[dict], step: dict | None, missing_tools) -> dict:
    groups = {"correctness": {}, "lint": {}, "infrastructure": {}}
    for row in rows:
        if row.get("key", "").startswith("test/"):
            nodeid = row["key"][len("test/") :]
            entry = {"status": row["status"], "reason": row.get("reason", "")}
            groups[_test_group(nodeid, missing_tools)][nodeid] = entry
    correct = groups["correctness"]
    count = lambda status: sum(entry["status"] == status for entry in correct.values())
    tests = {
        "tests": len(correct),
        **{status: count(status) for status in ("passed", "failed", "error", "skipped")},
        "failures": {
            k: v["reason"] for k, v in correct.items() if v["status"] in ("failed", "error")
        },
    }
    all_correct = (
        step is not None
        and step["status"] == "ok"
        and tests["passed"] > 0
        and not tests["failed"]
        and not tests["error"]
    )
    lint_bad = [k for k, v in groups["lint"].items() if v["status"] in ("failed", "error")]
    lint = {
        "tests": groups["lint"],
        "ok": None if not groups["lint"] else not lint_bad,
    }
    infrastructure = {"missing_tools": list(missing_tools), "tests": groups["infrastructure"]}
    return {
        "tests": tests,
        "all_correct": all_correct,
        "lint": lint,
        "infrastructure": infrastructure,
    }


def _min_fraction(results: dict, impl: str, op: str):
    values = [
        by_impl[impl][op]["fraction_of_dense"]
        for by_impl in results.values()
        if by_impl.get(impl, {}).get(op, {}).get("status") == "ok"
    ]
    return min(values) if values else None


def build_report(meta: dict, steps: dict, rows_by_step: dict, toolchain: dict) -> dict:
    """The JSON report from the steps' statuses and rows (`benchmarks.gpu_rows`)."""
    rows = [row for step_rows in rows_by_step.values() for row in step_rows]
    env = next((row["env"] for row in rows if "env" in row), {})
    results, errors, lowering, training = {}, [], {}, {}
    for row in rows:
        key = row.get("key", "")
        if "status" not in row or key.startswith("test/"):
            continue
        fields = {k: v for k, v in row.items() if k != "key"}
        if key.startswith("train/"):
            training[key.split("/", 1)[1]] = fields
            continue
        shape, impl, op = key.split("/", 2)
        results.setdefault(shape, {}).setdefault(impl, {})[op] = fields
        if row["status"] == "failed":
            errors.append(f"{key}: {row.get('reason', '')}")
        if "lowering" in row:
            lowering.setdefault(shape, {})[op] = row["lowering"]
    if {"dense", "dmoe"} <= set(training):
        training["dmoe_fraction_of_dense"] = (
            training["dmoe"]["tokens_per_s"] / training["dense"]["tokens_per_s"]
        )
    return {
        **meta,
        "platform": env.get("platform", meta.get("platform")),
        "device": env.get("device", meta.get("device")),
        "jax_version": env.get("jax_version"),
        "xla_flags": env.get("xla_flags"),
        "timing": env.get("timing"),
        "dense_reference": "one [m, k] @ [k, n] bfloat16 GEMM with the same useful FLOPs",
        "toolchain": toolchain,
        "steps": steps,
        **_tests(rows_by_step.get("tests", []), steps.get("tests"), toolchain.get("missing", [])),
        "mosaic_gmm_fraction_of_dense": _min_fraction(results, "mosaic", "gmm"),
        "mosaic_tgmm_fraction_of_dense": _min_fraction(results, "mosaic", "tgmm"),
        "results": results,
        "errors": errors,
        "ragged_dot_lowering": lowering,
        "training": training,
    }


def _cell(row: dict | None, field: str, fmt: str) -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return row.get("status", "?")
    return fmt.format(row[field])


def summary_table(report: dict) -> str:
    """The markdown summary written next to the JSON."""
    smoke = " (SMOKE: CPU interpret mode, numbers meaningless)" if report.get("smoke") else ""
    tests = report["tests"]
    lines = [
        f"gpu_check: {report['device']} ({report['platform']}), jax {report['jax_version']},"
        f" {report['date']}{smoke}",
        "",
        f"budget {report['budget_seconds']:.0f} s; timing: {report['timing']}",
        "",
        "| step | status | seconds | reason |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {step['status']} | {step.get('seconds', '-')} | {step.get('reason', '')} |"
        for name, step in report["steps"].items()
    ]
    lines += [
        "",
        f"gpu tests (correctness): {tests['passed']} passed, {tests['failed']} failed, "
        f"{tests['error']} errors, {tests['skipped']} skipped; all_correct="
        f"{report['all_correct']}; lint ok={report['lint']['ok']}; missing tools: "
        f"{report['toolchain'].get('missing')}",
        "",
        "| shape | impl | gmm TFLOP/s | gmm / dense | tgmm TFLOP/s | tgmm / dense "
        "| layer fwd+bwd / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, by_impl in report["results"].items():
        for impl, ops in by_impl.items():
            gmm, tgmm, layer = (ops.get(op) for op in ("gmm", "tgmm", "layer fwd+bwd"))
            lines.append(
                f"| {shape} | {impl} | {_cell(gmm, 'tflops', '{:.1f}')} | "
                f"{_cell(gmm, 'fraction_of_dense', '{:.0%}')} | "
                f"{_cell(tgmm, 'tflops', '{:.1f}')} | "
                f"{_cell(tgmm, 'fraction_of_dense', '{:.0%}')} | "
                f"{_cell(layer, 'fraction_of_dense', '{:.0%}')} |"
            )
    for shape, ops in report["ragged_dot_lowering"].items():
        for op, how in ops.items():
            lines.append(
                f"- lax.ragged_dot {op} at {shape}: cuDNN={how['cudnn']} ({how['flag']}; "
                f"custom calls {how['custom_calls']})"
            )
    for ffn, row in report["training"].items():
        if isinstance(row, dict):
            lines.append(f"- training {ffn}: {row['tokens_per_s']:,.0f} tokens/s")
    if "dmoe_fraction_of_dense" in report["training"]:
        lines.append(f"- dMoE / dense: {report['training']['dmoe_fraction_of_dense']:.0%}")
    lines += [f"- failed: {error}" for error in report["errors"]]
    lines += [f"- test failed: {k}: {v}" for k, v in tests["failures"].items()]
    return "\n".join(lines) + "\n"
