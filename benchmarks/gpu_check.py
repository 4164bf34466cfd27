"""The one command for a lent GPU (``scripts/gpu_check.sh``): kernel correctness, kernel
speed next to the peers, the layer, and training throughput, in one report that is on
disk at every moment.

    scripts/gpu_check.sh --out "$OUT"     # on the GPU: within --budget-seconds (420)
    scripts/gpu_check.sh --plan           # the schedule: steps, kernels, shares, estimates
    scripts/gpu_check.sh --smoke          # the same pipeline on CPU, tiny shapes

This process imports no jax: it checks the CUDA toolchain (`benchmarks.gpu_toolchain`),
then runs the steps of `benchmarks.gpu_plan` in order, each in its own subprocess
(`benchmarks.gpu_steps`) with a hard timeout: its share of what is left of the budget,
in proportion to the estimates. It rewrites ``<out>/gpu_check_<device>_<date>.json``
and ``.md`` (`benchmarks.gpu_report`) whenever a row or a step finishes; each step's
rows (``<stem>_<step>.jsonl``) and output (``<stem>_<step>.log``) are kept next to them.
A step is not started with less than ``--min-step-seconds`` left: it and the rest are
``"skipped"``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import re
import tempfile
import time

from benchmarks import gpu_plan, gpu_report, gpu_toolchain
from benchmarks.gpu_rows import read_rows
from benchmarks.gpu_steps import run_step


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        help="report directory (default benchmarks/results; --smoke: a new temporary directory)",
    )
    parser.add_argument(
        "--budget-seconds", type=float, help="wall time for all steps (default 420; smoke 3600)"
    )
    parser.add_argument("--plan", action="store_true", help="print the schedule and exit")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU in interpret mode (checks the pipeline)",
    )
    parser.add_argument("--only", help="comma-separated steps (or prefixes, e.g. kernels)")
    parser.add_argument("--impls", nargs="+", help="kernel impls to measure (default: all)")
    parser.add_argument("--samples", type=int, help="timing samples per row (default 5)")
    parser.add_argument("--calls", type=int, help="back-to-back calls per sample (default 20)")
    parser.add_argument("--train-seconds", type=float, help="measured seconds per model (20)")
    parser.add_argument("--test-workers", type=int, help="pytest-xdist workers (default 8)")
    parser.add_argument(
        "--min-step-seconds",
        type=float,
        help="least time worth starting a step (default 15; smoke 1)",
    )
    return parser


def _select(steps: list, only: str | None) -> list:
    if not only:
        return steps
    wanted = only.split(",")
    chosen = [s for s in steps if any(s.name == w or s.name.startswith(w + "-") for w in wanted)]
    if not chosen:
        raise SystemExit(f"--only: no step matches {only!r}; steps: {[s.name for s in steps]}")
    return chosen


def plan_text(steps: list, budget: float) -> str:
    """The schedule: each step's kernels, estimate and share of ``budget``."""
    total = sum(step.estimate_s for step in steps)
    lines = [
        f"{'step':<18}{'kernels':>8}{'xla':>5}{'estimate s':>12}{'share s':>9}  what",
        *(
            f"{s.name:<18}{s.kernels:>8}{s.xla_programs:>5}{s.estimate_s:>12.0f}"
            f"{budget * s.estimate_s / total:>9.0f}  {s.what}"
            for s in steps
        ),
        f"{'total':<18}{sum(s.kernels for s in steps):>8}"
        f"{sum(s.xla_programs for s in steps):>5}{total:>12.0f}{budget:>9.0f}"
        f"  ({'fits' if total <= budget else 'OVER'} the {budget:.0f} s budget)",
        f"model: {gpu_plan.STARTUP_S:.0f} s per process, {gpu_plan.COMPILE_S} s per Mosaic/"
        f"Triton kernel, {gpu_plan.XLA_COMPILE_S} s per XLA program, timed calls at "
        f"{gpu_plan.ASSUMED_TFLOPS:.0f} TFLOP/s (assumptions: no GPU has run this yet)",
    ]
    return "\n".join(lines)


class Report:
    """Rewrites ``<stem>.json`` and ``.md`` from the steps' rows (atomic replaces)."""

    def __init__(self, out: pathlib.Path, stem: str, meta: dict, toolchain: dict, steps):
        self.out, self.stem, self.meta, self.toolchain = out, stem, meta, toolchain
        self.steps = {step.name: {"status": "pending"} for step in steps}
        self.readers = {
            step.name: step.rows or functools.partial(read_rows, self.rows_path(step.name))
            for step in steps
        }

    def rows_path(self, name: str) -> pathlib.Path:
        return self.out / f"{self.stem}_{name}.jsonl"

    def write(self) -> dict:
        rows = {name: reader() for name, reader in self.readers.items()}
        report = gpu_report.build_report(self.meta, self.steps, rows, self.toolchain)
        for suffix, text in (
            (".json", json.dumps(report, indent=1)),
            (".md", gpu_report.summary_table(report)),
        ):
            path = self.out / f"{self.stem}{suffix}"
            tmp = path.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return report


def run_check(steps: list, out: pathlib.Path, stem: str, meta: dict, min_step: float) -> dict:
    """Checks the toolchain, runs ``steps`` within ``meta["budget_seconds"]`` and returns
    the final report (written to ``out`` after every row and step)."""
    out.mkdir(parents=True, exist_ok=True)
    budget, start = meta["budget_seconds"], time.monotonic()
    toolchain = gpu_toolchain.find_toolchain()
    print(f"toolchain: {json.dumps(toolchain)}", flush=True)
    os.environ.update(gpu_toolchain.cuda_environment(toolchain))
    report = Report(out, stem, meta, toolchain, steps)
    report.write()
    for index, step in enumerate(steps):
        left = budget - (time.monotonic() - start)
        if left < min_step:
            report.steps[step.name] = {
                "status": "skipped",
                "seconds": 0.0,
                "reason": f"budget spent: {max(left, 0):.0f} s of {budget:.0f} s left, "
                f"under the {min_step:.0f} s a step needs",
            }
            report.write()
            continue
        share = left * step.estimate_s / sum(s.estimate_s for s in steps[index:])
        why = f"its share ({share:.0f} s) of the budget"
        if index == len(steps) - 1:
            why = "the budget ran out"
        print(f"== {step.name}: up to {share:.0f} s: {' '.join(step.command)}", flush=True)
        report.steps[step.name] = {"status": "running"}
        log = out / f"{stem}_{step.name}.log"
        result = run_step(step, share, report.rows_path(step.name), log, report.write, why)
        report.steps[step.name] = result
        report.write()
        print(f"== {step.name}: {json.dumps(result)}", flush=True)
    final = report.write()
    print(gpu_report.summary_table(final))
    print(f"wrote {out / stem}.json and .md")
    return final


def main(argv=None) -> dict | None:
    """The command line; the final report (None with ``--plan``)."""
    args = _parser().parse_args(argv)
    options = gpu_plan.default_options(
        args.smoke,
        samples=args.samples,
        calls=args.calls,
        impls=tuple(args.impls) if args.impls else None,
        train_seconds=args.train_seconds,
        test_workers=args.test_workers,
    )
    budget = args.budget_seconds or (3600.0 if args.smoke else 420.0)
    out = args.out or (
        pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))
        if args.smoke
        else pathlib.Path("benchmarks/results")
    )
    device = gpu_toolchain.gpu_name() or "cpu"
    date = datetime.date.today().isoformat()
    stem = f"gpu_check_{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}_{date}"
    train_dir = pathlib.Path(tempfile.gettempdir()) / f"{stem}_train_{os.getpid()}"
    steps = _select(gpu_plan.build_steps(options, out, stem, train_dir), args.only)
    if args.plan:
        print(plan_text(steps, budget))
        return None
    meta = {
        "platform": "cpu" if device == "cpu" else "gpu",
        "device": device,
        "date": date,
        "smoke": args.smoke,
        "budget_seconds": budget,
        "plan": {step.name: step.estimate_s for step in steps},
    }
    min_step = args.min_step_seconds
    return run_check(
        steps, out, stem, meta, min_step if min_step is not None else (1.0 if args.smoke else 15.0)
    )


if __name__ == "__main__":
    main()
