"""`benchmarks.gpu_check`'s training steps: the main job's own command, timed by its log.

Each step runs ``python -m experiments.train --ffn {dense,dmoe}`` (the preset's model,
corpus and defaults; only run length, logging cadence and run directory are given) and
reads the run's ``metrics.jsonl`` as it grows. Once the logged training time after the
first (compiling) interval reaches ``train_seconds``, the step is stopped: its row is
the median ``tokens_per_s`` of the intervals after the first. With ``--smoke`` the run is
four steps of batch 2 instead.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys

from benchmarks import gpu_plan


def _records(metrics: pathlib.Path) -> list[dict]:
    if not metrics.exists():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            records.append(record)
    return records


def training_row(ffn: str, metrics: pathlib.Path) -> list[dict]:
    """``[]`` until an interval is logged, then one row ``train/<ffn>``: the median
    tokens/s of the intervals after the first (the first alone while it is the only one)."""
    records = _records(metrics)
    if not records:
        return []
    steady = records[1:] or records
    return [
        {
            "key": f"train/{ffn}",
            "status": "ok",
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "intervals": len(steady),
            "steps": records[-1]["step"],
            "measured_s": records[-1]["train_time_s"] - records[0]["train_time_s"],
        }
    ]


def train_step(ffn: str, options, train_dir: pathlib.Path):
    """The `benchmarks.gpu_steps.Step` training the preset's ``ffn`` model."""
    from benchmarks.gpu_steps import Step

    run = pathlib.Path(train_dir) / ffn
    command = [sys.executable, "-m", "experiments.train", "--ffn", ffn, "--out", str(run)]
    if options.smoke:
        length = ["--steps", "4", "--batch-size", "2", "--log-every", "2"]
        length += ["--eval-every", "4", "--checkpoint-every", "4", "--eval-batches", "1"]
        stop = None
    else:
        many = "1000000"  # stopped by time; no evaluation or checkpoint on the way
        length = ["--steps", many, "--eval-every", many, "--checkpoint-every", many]
        stop = lambda rows: bool(rows) and rows[0]["measured_s"] >= options.train_seconds
    return Step(
        name=f"train-{ffn}",
        what=f"python -m experiments.train --ffn {ffn}: tokens/s over "
        f"{options.train_seconds:.0f} s after compiling",
        command=command + length,
        estimate_s=gpu_plan.STARTUP_S + gpu_plan.TRAIN_SETUP_S + options.train_seconds,
        kernels=gpu_plan.LAYER_KERNELS,
        xla_programs=2,  # the train and eval steps
        rows=lambda: training_row(ffn, run / "metrics.jsonl"),
        stop=stop,
        restartable=False,
    )
